//! The module graph of `coordinator/src` and `worker/src` has no cycles, kept by a test as
//! `sizes.rs` keeps sizes: two modules that use each other can't be read, tested or moved one
//! at a time.
//!
//! Each file is a module (`plan/vocab/rows.rs` is `plan::vocab::rows`, `exec.rs` and
//! `exec/scratch.rs` are `exec` and `exec::scratch`). A path a file names (`crate::a::b::item`,
//! `super::x`, `shardmerge_worker::...` is another crate and not counted) is an edge to the
//! deepest module it reaches. A module using its ancestors (`use super::*`) or its descendants
//! is how a module and its parts work, not a cycle; any other edge is lifted to the two
//! siblings under the modules' common ancestor (`plan::vocab::rows` using `recipe` is
//! `plan -> recipe`), and among the children of each module those edges form no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The module path of `file` under `src` (`lib.rs` and `main.rs` are the crate root).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text of `src` without comments, string literals and `#[cfg(test)]` modules' bodies
/// (tests may reach anywhere).
fn code_of(src: &str) -> String {
    let mut out = String::new();
    let c: Vec<char> = src.chars().collect();
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            i += 2;
            while i + 1 < c.len() && !(c[i] == '*' && c[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c[i] == '\'' && c.get(i + 1) == Some(&'\\') {
            // an escaped character literal
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
            i += 3; // a character literal (a lifetime has no closing quote)
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    match out.find("#[cfg(test)]\nmod tests") {
        Some(k) => out[..k].to_string(),
        None => out,
    }
}

/// Every module path the code names, resolved against module `me`.
fn references(me: &[String], code: &str) -> Vec<Vec<String>> {
    let mut refs = Vec::new();
    let toks: Vec<&str> = code
        .split(|ch: char| !(ch.is_alphanumeric() || ch == '_' || ch == ':'))
        .filter(|t| t.contains("::"))
        .collect();
    for t in toks {
        let segs: Vec<&str> = t.split("::").filter(|s| !s.is_empty()).collect();
        let (mut path, rest): (Vec<String>, &[&str]) = match segs.first() {
            Some(&"crate") => (Vec::new(), &segs[1..]),
            Some(&"super") => {
                let mut p = me.to_vec();
                let mut k = 0;
                while segs.get(k) == Some(&"super") {
                    p.pop();
                    k += 1;
                }
                (p, &segs[k..])
            }
            Some(&"self") => (me.to_vec(), &segs[1..]),
            _ => continue,
        };
        path.extend(rest.iter().map(|s| s.to_string()));
        refs.push(path);
    }
    // `use super::{a, b}` and `use crate::{x::y, z}`: each name in the braces
    for (k, _) in code.match_indices("::{") {
        let head_start = code[..k]
            .rfind(|ch: char| !(ch.is_alphanumeric() || ch == '_' || ch == ':'))
            .map_or(0, |p| p + 1);
        let head = &code[head_start..k];
        let Some(end) = code[k..].find('}') else {
            continue;
        };
        for item in code[k + 3..k + end].split(',') {
            let item = item.split_whitespace().next().unwrap_or("");
            if !item.is_empty() && item != "self" {
                let joined = format!("{head}::{item}");
                refs.extend(references(me, &joined));
            }
        }
    }
    refs
}

/// The cycles among each module's children, as `a -> b -> a` strings.
fn cycles(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    // (parent, from child, to child)
    let mut edges: BTreeMap<Vec<String>, BTreeSet<(String, String)>> = BTreeMap::new();
    for f in &files {
        let me = module_of(src, f);
        let code = code_of(&std::fs::read_to_string(f).expect("read"));
        for r in references(&me, &code) {
            // the deepest module the path reaches
            let mut to = r.clone();
            while !to.is_empty() && !modules.contains(&to) {
                to.pop();
            }
            let common = me.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == me.len() || common == to.len() {
                continue; // an ancestor or a descendant
            }
            edges
                .entry(me[..common].to_vec())
                .or_default()
                .insert((me[common].clone(), to[common].clone()));
        }
    }
    let mut found = Vec::new();
    for (parent, es) in &edges {
        for (a, b) in es {
            // a cycle through edge a -> b: b reaches a
            let mut seen = BTreeSet::new();
            let mut stack = vec![(b.clone(), vec![a.clone(), b.clone()])];
            while let Some((n, path)) = stack.pop() {
                if n == *a {
                    let name = format!("{}{}", prefix(parent), path.join(" -> "));
                    found.push(name);
                    break;
                }
                if !seen.insert(n.clone()) {
                    continue;
                }
                for (_, y) in es.iter().filter(|(x, _)| *x == n) {
                    let mut p = path.clone();
                    p.push(y.clone());
                    stack.push((y.clone(), p));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

fn prefix(parent: &[String]) -> String {
    if parent.is_empty() {
        String::new()
    } else {
        format!("{}::", parent.join("::"))
    }
}

#[test]
fn no_module_uses_a_module_that_uses_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut all = Vec::new();
    for krate in ["coordinator/src", "worker/src"] {
        for c in cycles(&root.join(krate)) {
            all.push(format!("{krate}: {c}"));
        }
    }
    assert!(all.is_empty(), "import cycles:\n{}", all.join("\n"));
}

#[test]
fn a_cycle_is_found() {
    let dir = std::env::temp_dir().join(format!("sm-modules-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("a")).expect("mkdir");
    std::fs::write(dir.join("lib.rs"), "mod a; mod b;\n").expect("write");
    std::fs::write(dir.join("a/mod.rs"), "use super::b::x;\nmod c;\n").expect("write");
    std::fs::write(dir.join("a/c.rs"), "use super::*;\n").expect("write");
    std::fs::write(dir.join("b.rs"), "use crate::a::{c::y, z};\n").expect("write");
    let found = cycles(&dir);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(found, ["a -> b -> a", "b -> a -> b"]);
}
