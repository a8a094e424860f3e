//! Real architectures against mergekit: tiny random models of eleven Hugging Face architectures
//! (saved by transformers 5 in bfloat16), each merged with linear, task_arithmetic, ties,
//! dare_ties (seeded), slerp and a `slices:` frankenmerge, with `dtype: bfloat16` and
//! `float32`. `tests/fixtures/archs/make.py` made them with mergekit 0.1.5; every output tensor
//! must be bit-identical to mergekit's (CRC-32 of its bytes) and the config must carry
//! mergekit's values. Top-k selections (ties) are compared with mergekit run with ties among
//! equal magnitudes broken by position (the rule shardmerge documents); frankenmerges mergekit
//! refuses (per-layer config arrays it cannot resize) against the reference make.py builds.
//! `tests/archs.sh` additionally loads every output in transformers and compares logits.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/archs")
}

fn cases() -> Vec<Value> {
    let raw = std::fs::read(fixtures().join("cases.json")).unwrap();
    serde_json::from_slice::<Vec<Value>>(&raw).unwrap()
}

fn json_file(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn dtype_name(d: &str) -> &'static str {
    match d {
        "BF16" => "bfloat16",
        "F16" => "float16",
        "F32" => "float32",
        "F64" => "float64",
        "BOOL" => "bool",
        "I64" => "int64",
        "I32" => "int32",
        _ => "other",
    }
}

/// What differs between our output folder and mergekit's recorded tensors and config;
/// `values`: compare the tensors' bytes too.
fn differences(out: &Path, case: &Path, values: bool) -> Vec<String> {
    let expected = json_file(&case.join("expected.json"));
    let expected = expected.as_object().unwrap();
    let ours = load(out);
    let mut bad = Vec::new();
    for (name, e) in expected {
        let Some(t) = ours.get(name) else {
            bad.push(format!("{name}: missing"));
            continue;
        };
        let shape: Vec<u64> = serde_json::from_value(e["shape"].clone()).unwrap();
        let dt = dtype_name(t.dtype.name());
        let sum: f64 = t.values.iter().map(|&v| v as f64).sum();
        if !t.dtype.is_float() && e["dtype"] != dt && shape == t.shape {
            // a BOOL/integer buffer: mergekit writes it in the recipe's dtype, shardmerge keeps
            // the input's dtype (docs/methods.md); the values must agree
            if Some(sum) != e["sum"].as_f64() {
                bad.push(format!(
                    "{name}: values differ (sum {sum}, mergekit {})",
                    e["sum"]
                ));
            }
            continue;
        }
        if dt != e["dtype"] || shape != t.shape {
            bad.push(format!(
                "{name}: {dt} {:?}, mergekit {} {shape:?}",
                t.shape, e["dtype"]
            ));
            continue;
        }
        if values && u64::from(crc32fast::hash(&t.raw)) != e["crc32"] {
            bad.push(format!(
                "{name}: values differ (sum {sum}, mergekit {})",
                e["sum"]
            ));
        }
    }
    for name in ours.keys() {
        if !expected.contains_key(name) {
            bad.push(format!("{name}: not in mergekit's output"));
        }
    }
    let ours: Value = json_file(&out.join("config.json"));
    let theirs = json_file(&case.join("config.json"));
    for (k, v) in theirs.as_object().unwrap() {
        if k == "transformers_version" {
            continue;
        }
        if ours.get(k) != Some(v) {
            bad.push(format!(
                "config {k}: {}, mergekit {v}",
                ours.get(k).unwrap_or(&Value::Null)
            ));
        }
    }
    bad
}

async fn arch(name: &str) {
    let all = cases();
    let mine: Vec<&Value> = all.iter().filter(|c| c["arch"] == name).collect();
    assert!(!mine.is_empty(), "no cases for {name} in cases.json");
    let tmp = tempfile::tempdir().unwrap();
    let mut failed = BTreeMap::new();
    for c in mine {
        let case = c["name"].as_str().unwrap();
        let dir = fixtures().join("cases").join(case);
        let recipe = std::fs::read_to_string(dir.join("config.yml")).unwrap();
        let out = tmp.path().join(case);
        if let Err(e) = run(&recipe, &fixtures(), &out, 2, 16 << 10, 64 << 20).await {
            failed.insert(case.to_string(), vec![format!("merge failed: {e}")]);
            continue;
        }
        let values = matches!(c["kind"].as_str(), Some("exact" | "refused"));
        let bad = differences(&out, &dir, values);
        if !bad.is_empty() {
            failed.insert(case.to_string(), bad);
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: cases that differ from mergekit:\n{}",
        failed
            .iter()
            .map(|(c, b)| format!("  {c}:\n    {}", b.join("\n    ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

macro_rules! archs {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                arch(stringify!($name)).await;
            }
        )*
        const LISTED: &[&str] = &[$(stringify!($name)),*];
    };
}

archs! {
    llama, llama_tied, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, gpt2, gpt_neox,
}

/// Every architecture in cases.json has a test above.
#[test]
fn every_fixture_architecture_is_tested() {
    for c in cases() {
        let a = c["arch"].as_str().unwrap();
        assert!(LISTED.contains(&a), "{a}: add it to archs! {{..}}");
    }
}
