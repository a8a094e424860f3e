//! `docs/methods.md` against the methods' declarations (`MethodSpec` in
//! `worker/src/kernels/`): its "Parameters by method" table lists every parameter of every
//! method with its level, type and default, and nothing else. On a mismatch the test prints the
//! table the declarations give, to paste over the old one.

use std::collections::BTreeSet;
use std::path::Path;

use shardmerge_worker::kernels::{registry, ParamDef, ParamType};

const SECTION: &str = "## Parameters by method";

/// `required`, `unset`, `true`/`false`, or the number as Rust's `{:?}` writes it (`1e-5`).
fn default_of(p: &ParamDef) -> String {
    match (p.default, p.ty) {
        (None, _) => "required".into(),
        (Some(v), _) if v.is_nan() => "unset".into(),
        (Some(v), ParamType::Bool) => (v != 0.0).to_string(),
        (Some(v), ParamType::Int { .. }) => format!("{v}"),
        (Some(v), ParamType::Number { .. }) => format!("{v:?}"),
    }
}

/// The table's rows as the declarations give them, in registry order.
fn declared() -> Vec<String> {
    let mut rows = Vec::new();
    for m in registry() {
        let s = m.spec();
        let levels = [("method", s.params), ("per model", s.tensor_params)];
        for (level, params) in levels {
            for p in params {
                rows.push(format!(
                    "| `{}` | `{}` | {level} | {} | {} |",
                    s.name,
                    p.name,
                    p.ty,
                    default_of(p)
                ));
            }
        }
    }
    rows
}

/// The rows of the table under [`SECTION`] in `text`.
fn documented(text: &str) -> Vec<String> {
    let Some(start) = text.find(SECTION) else {
        return Vec::new();
    };
    let body = &text[start + SECTION.len()..];
    let end = body.find("\n## ").unwrap_or(body.len());
    body[..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn methods_md_documents_every_declared_parameter_and_no_other() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/methods.md");
    let text = std::fs::read_to_string(&path).expect("docs/methods.md");
    let want = declared();
    let got = documented(&text);
    let (w, g): (BTreeSet<_>, BTreeSet<_>) = (want.iter().collect(), got.iter().collect());
    let missing: Vec<_> = w.difference(&g).collect();
    let extra: Vec<_> = g.difference(&w).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && got.len() == want.len(),
        "docs/methods.md's \"{SECTION}\" table differs from the declarations.\n\
         declared but not documented: {missing:#?}\ndocumented but not declared: {extra:#?}\n\
         the table the declarations give:\n\
         | method | parameter | level | type | default |\n|---|---|---|---|---|\n{}",
        want.join("\n")
    );
    // every method has its own section
    for m in registry() {
        let name = m.spec().name;
        assert!(
            text.lines()
                .any(|l| l.starts_with('#') && l.contains(&format!(" {name}"))),
            "docs/methods.md has no section for {name}"
        );
    }
}

#[test]
fn a_table_row_that_is_not_declared_is_found() {
    let doc = format!(
        "x\n{SECTION}\n\n| method | parameter |\n|---|---|\n| `linear` | `wieght` | per model | number | required |\n\n## next\n| `x` |\n"
    );
    let got = documented(&doc);
    assert_eq!(
        got,
        ["| `linear` | `wieght` | per model | number | required |"]
    );
    assert!(!declared().contains(&got[0]));
}
