//! The hostile-input corpus (tests/fixtures/hostile, written by its make.py): malformed
//! safetensors headers, indexes and recipes, each refused with an error that contains its
//! expected text (`expect.tsv`), or accepted when marked OK; never a panic.
//!
//! Headers go through the parser the planner uses; index cases are model folders loaded as
//! the planner loads them; recipes run through `shardmerge plan` against the golden models.

use std::path::{Path, PathBuf};
use std::process::Command;

use shardmerge::plan;
use shardmerge_worker::format::safetensors as st;
use shardmerge_worker::storage::Resolver;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hostile")
}

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden")
}

/// The header parse of a whole file, as `plan::read_header` does it over range reads.
fn parse_file(bytes: &[u8]) -> Result<st::Header, String> {
    let size = bytes.len() as u64;
    let n = st::header_len(bytes, size).map_err(|e| e.0)?;
    st::parse_header(&bytes[8..8 + n as usize], size).map_err(|e| e.0)
}

fn check(case: &str, want: &str, got: Result<(), String>, failures: &mut Vec<String>) {
    match (want, got) {
        ("OK", Ok(())) => {}
        ("OK", Err(e)) => failures.push(format!("{case}: should be accepted, got: {e}")),
        (_, Ok(())) => failures.push(format!("{case}: accepted, expected an error with {want:?}")),
        (_, Err(e)) if e.contains("panicked") => failures.push(format!("{case}: panic: {e}")),
        (_, Err(e)) if !e.contains(want) => {
            failures.push(format!("{case}: error lacks {want:?}: {e}"))
        }
        _ => {}
    }
}

#[tokio::test]
async fn hostile_corpus() {
    let dir = corpus();
    let manifest = std::fs::read_to_string(dir.join("expect.tsv")).expect("expect.tsv");
    let resolver = Resolver::new();
    let mut failures = Vec::new();
    let mut seen = [0usize; 3];
    for line in manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (case, want) = line.split_once('\t').expect("case<TAB>expected");
        let path = dir.join(case);
        let got: Result<(), String> = if case.starts_with("safetensors/") {
            seen[0] += 1;
            let bytes = std::fs::read(&path).expect("read case");
            parse_file(&bytes).map(|_| ())
        } else if case.starts_with("index/") {
            seen[1] += 1;
            plan::load_model(&resolver, &dir, case)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            seen[2] += 1;
            let o = Command::new(env!("CARGO_BIN_EXE_shardmerge"))
                .current_dir(golden())
                .args(["plan", path.to_str().expect("utf-8 path")])
                .output()
                .expect("run shardmerge plan");
            let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
            match o.status.code() {
                Some(0) => Ok(()),
                Some(1) => Err(stderr),
                other => Err(format!("panicked or killed ({other:?}): {stderr}")),
            }
        };
        check(case, want, got, &mut failures);
    }
    assert!(seen.iter().all(|&n| n >= 10), "corpus too small: {seen:?}");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The recipe size cap, configured lower through its variable.
#[test]
fn recipe_over_the_size_cap_is_refused() {
    let o = Command::new(env!("CARGO_BIN_EXE_shardmerge"))
        .current_dir(golden())
        .env("SHARDMERGE_MAX_RECIPE_BYTES", "64")
        .args([
            "plan",
            corpus()
                .join("recipes/good_ok.yml")
                .to_str()
                .expect("utf-8"),
        ])
        .output()
        .expect("run shardmerge plan");
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("more than the 64 accepted") && e.contains("SHARDMERGE_MAX_RECIPE_BYTES"),
        "{e}"
    );
}

/// The tensors-per-checkpoint cap, configured lower through its variable: a header with more
/// entries is refused while it is read.
#[test]
fn tensors_over_the_cap_are_refused() {
    let o = Command::new(env!("CARGO_BIN_EXE_shardmerge"))
        .current_dir(golden())
        .env("SHARDMERGE_MAX_TENSORS", "10")
        .args([
            "plan",
            corpus()
                .join("recipes/good_ok.yml")
                .to_str()
                .expect("utf-8"),
        ])
        .output()
        .expect("run shardmerge plan");
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("more than 10 tensors") && e.contains("SHARDMERGE_MAX_TENSORS"),
        "{e}"
    );
}
