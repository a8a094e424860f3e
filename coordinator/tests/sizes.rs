//! Size limits of the product code, kept by a test so that a new offender fails the suite:
//! no function over 80 lines and no file over 500 lines in `coordinator/src` and `worker/src`.
//!
//! Test code does not count: a `#[cfg(test)]` item (a `mod tests { .. }`, a test helper) is
//! skipped, and so is a file that a `#[cfg(test)] mod name;` declaration brings in. A function is
//! measured from the line of its `fn` keyword to the line of its closing brace, found by brace
//! matching over a small lexer that skips comments, strings and character literals.
//!
//! `ALLOWED` lists the known offenders with the size they have today, as a ceiling: they may
//! shrink, never grow. Run `cargo test -p shardmerge --test sizes -- --nocapture` to see the
//! largest files and functions.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const MAX_FN_LINES: usize = 80;
const MAX_FILE_LINES: usize = 500;

/// Known offenders (path from the workspace root, or `path::fn`) and the ceiling each may not
/// pass. The kernels are one file per method whose contract lives with it; they belong to the
/// kernel owners and are listed rather than split here.
const ALLOWED: &[(&str, usize)] = &[("worker/src/kernels/gta.rs::plan", 122)];

#[derive(Debug, Default, PartialEq)]
struct Scan {
    /// (name, line of `fn`, lines from `fn` to its closing brace)
    fns: Vec<(String, usize, usize)>,
    /// Lines of the file that are not inside a `#[cfg(test)]` item.
    code_lines: usize,
    /// Modules declared as `#[cfg(test)] mod name;` (their files are test code).
    test_mods: Vec<String>,
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
}

/// Identifiers and punctuation with their 1-based line; comments and literals are dropped.
fn lex(src: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    // Advances over `c[from..to]`, counting newlines.
    let lines_in = |from: usize, to: usize| {
        c[from..to.min(c.len())]
            .iter()
            .filter(|&&x| x == '\n')
            .count()
    };
    while i < c.len() {
        let x = c[i];
        let next = c.get(i + 1).copied();
        if x == '\n' {
            line += 1;
            i += 1;
        } else if x.is_whitespace() {
            i += 1;
        } else if x == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if x == '/' && next == Some('*') {
            let (start, mut depth) = (i, 0usize);
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            line += lines_in(start, i);
        } else if x == '"' {
            let start = i;
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            line += lines_in(start, i);
        } else if x == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a, 'static).
            if next == Some('\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                out.push((Tok::Punct('\''), line));
                i += 1;
            }
        } else if x.is_alphanumeric() || x == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let raw = matches!(word.as_str(), "r" | "br" | "cr");
            if raw && matches!(c.get(i), Some('"') | Some('#')) {
                // A raw string: r"..", r#".."#, with any number of hashes.
                let from = i;
                let mut hashes = 0;
                while c.get(i) == Some(&'#') {
                    hashes += 1;
                    i += 1;
                }
                if c.get(i) != Some(&'"') {
                    // `r#ident`, a raw identifier.
                    out.push((Tok::Ident(word), line));
                    continue;
                }
                i += 1;
                loop {
                    if i >= c.len() {
                        break;
                    }
                    if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                        i += 1 + hashes;
                        break;
                    }
                    i += 1;
                }
                line += lines_in(from, i);
            } else if !x.is_numeric() {
                out.push((Tok::Ident(word), line));
            }
        } else {
            out.push((Tok::Punct(x), line));
            i += 1;
        }
    }
    out
}

fn is_punct(t: Option<&(Tok, usize)>, p: char) -> bool {
    matches!(t, Some((Tok::Punct(q), _)) if *q == p)
}

fn ident(t: Option<&(Tok, usize)>) -> Option<&str> {
    match t {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

/// The index of the token closing the bracket opened at `open`.
fn closing(toks: &[(Tok, usize)], open: usize) -> usize {
    let mut depth = 0i64;
    for (k, (t, _)) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Punct('{' | '(' | '[') => depth += 1,
            Tok::Punct('}' | ')' | ']') => {
                depth -= 1;
                if depth == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    toks.len() - 1
}

/// From `from`, the end of an item: its `;` or the closing brace of its body, whichever comes
/// first outside parentheses and brackets, or the brace that closes the block around it (a
/// bodiless `fn` in a macro's input, `simd::wide! { fn f(x: &[f32]) => g }`). Returns (index
/// of the end, whether it had a body).
fn item_end(toks: &[(Tok, usize)], from: usize) -> (usize, bool) {
    let mut k = from;
    while k < toks.len() {
        match toks[k].0 {
            Tok::Punct('(' | '[') => k = closing(toks, k),
            Tok::Punct(';') => return (k, false),
            Tok::Punct('{') => return (closing(toks, k), true),
            Tok::Punct('}') => return (k, false),
            _ => {}
        }
        k += 1;
    }
    (toks.len() - 1, false)
}

/// Is `#[cfg(test)]` at `k`? Returns the index of its `]`.
fn cfg_test(toks: &[(Tok, usize)], k: usize) -> Option<usize> {
    let at = |d: usize| toks.get(k + d);
    (is_punct(at(0), '#')
        && is_punct(at(1), '[')
        && ident(at(2)) == Some("cfg")
        && is_punct(at(3), '(')
        && ident(at(4)) == Some("test")
        && is_punct(at(5), ')')
        && is_punct(at(6), ']'))
    .then_some(k + 6)
}

fn scan(src: &str) -> Scan {
    let toks = lex(src);
    let mut s = Scan {
        code_lines: src.lines().count(),
        ..Scan::default()
    };
    let mut k = 0;
    while k < toks.len() {
        if let Some(mut j) = cfg_test(&toks, k) {
            // Further attributes, then the item they all apply to.
            j += 1;
            while is_punct(toks.get(j), '#') && is_punct(toks.get(j + 1), '[') {
                j = closing(&toks, j + 1) + 1;
            }
            let (end, body) = item_end(&toks, j);
            if !body && ident(toks.get(j)) == Some("mod") {
                if let Some(name) = ident(toks.get(j + 1)) {
                    s.test_mods.push(name.to_string());
                }
            }
            s.code_lines -= toks[end].1 - toks[k].1 + 1;
            k = end + 1;
            continue;
        }
        if ident(toks.get(k)) == Some("fn") {
            if let Some(name) = ident(toks.get(k + 1)) {
                let (end, body) = item_end(&toks, k + 2);
                if body {
                    s.fns
                        .push((name.to_string(), toks[k].1, toks[end].1 - toks[k].1 + 1));
                }
            }
        }
        k += 1;
    }
    s
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Where `mod name;` declared in `file` lives.
fn module_files(file: &Path, name: &str) -> [PathBuf; 2] {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let dir = match stem {
        "mod" | "lib" | "main" => file.parent().unwrap().to_path_buf(),
        _ => file.with_extension(""),
    };
    [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ]
}

/// A measured file or function: what it is, its lines and, for an offender, its limit.
type Measured = (String, usize);
type Over = (String, usize, usize);

/// Every file and function over its limit, and every one measured.
fn offenders(root: &Path) -> (Vec<Over>, Vec<Measured>) {
    let mut files = Vec::new();
    for dir in ["coordinator/src", "worker/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    let scans: Vec<(PathBuf, Scan)> = files
        .iter()
        .map(|f| (f.clone(), scan(&std::fs::read_to_string(f).unwrap())))
        .collect();
    let test_files: BTreeSet<PathBuf> = scans
        .iter()
        .flat_map(|(f, s)| s.test_mods.iter().flat_map(|m| module_files(f, m)))
        .collect();
    let (mut over, mut all) = (Vec::new(), Vec::new());
    for (f, s) in &scans {
        if test_files.contains(f) {
            continue;
        }
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        all.push((rel.clone(), s.code_lines));
        if s.code_lines > MAX_FILE_LINES {
            over.push((rel.clone(), s.code_lines, MAX_FILE_LINES));
        }
        for (name, line, n) in &s.fns {
            all.push((format!("{rel}::{name} (line {line})"), *n));
            if *n > MAX_FN_LINES {
                over.push((format!("{rel}::{name}"), *n, MAX_FN_LINES));
            }
        }
    }
    (over, all)
}

#[test]
fn no_function_over_80_lines_and_no_file_over_500() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap();
    let (over, mut all) = offenders(&root);
    all.sort_by_key(|m| std::cmp::Reverse(m.1));
    println!("largest files and functions (test code excluded):");
    for (what, n) in all.iter().take(25) {
        println!("  {n:5}  {what}");
    }
    let mut errors = Vec::new();
    for (what, n, limit) in &over {
        match ALLOWED.iter().find(|(w, _)| w == what) {
            Some((_, ceiling)) if n <= ceiling => {}
            Some((_, ceiling)) => errors.push(format!(
                "{what}: {n} lines, over its allowed ceiling of {ceiling}; it may shrink, not grow"
            )),
            None => errors.push(format!("{what}: {n} lines, over the limit of {limit}")),
        }
    }
    for (what, _) in ALLOWED {
        if !over.iter().any(|(w, _, _)| w == what) {
            errors.push(format!(
                "{what} is within the limit now: remove it from ALLOWED in {}",
                file!()
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "size limits (see {}):\n  {}\nsplit the function into named helpers, or move a cohesive \
         part of the file into its own module",
        file!(),
        errors.join("\n  ")
    );
}

#[test]
fn the_scanner_measures_functions_and_skips_test_code() {
    let src = r##"
fn one() {
    let s = "}}} fn fake() {";
    let c = '}';
    let r = r#"{ "quoted" }"#;
    // fn commented() {
    /* { /* nested */ } */
    let f: fn(u32) -> u32 = |x| x;
}

trait T {
    fn decl(&self) -> [u8; 2];
    fn provided<'a>(&'a self) -> &'a str {
        "x"
    }
}

wide! {
    fn declared(x: &[f32]) -> bool => one
}

#[cfg(test)]
#[allow(dead_code)]
mod tests {
    fn hidden() {}
}

#[cfg(test)]
mod more;
"##;
    let s = scan(src);
    let fns: Vec<(&str, usize, usize)> =
        s.fns.iter().map(|(n, a, b)| (n.as_str(), *a, *b)).collect();
    assert_eq!(fns, vec![("one", 2, 8), ("provided", 13, 3)]);
    assert_eq!(s.test_mods, vec!["more".to_string()]);
    assert_eq!(s.code_lines, src.lines().count() - 5 - 2);
}
