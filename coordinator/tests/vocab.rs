//! Vocabularies and tokenizers (`tokenizer_source`, `tokenizer:`) against mergekit 0.1.5 on a
//! tiny Llama family with real tokenizers (tests/fixtures/vocab, made by its make.py): the
//! embedding rows of every token, the other tensors, the config's `vocab_size` and the
//! tokenizer files match mergekit's; the output is the same for any task layout.
//!
//! mergekit orders the tokens a union appends by Python set and Rust hash-map iteration, which
//! changes from run to run; shardmerge appends them in recipe order, each model's by id. So
//! union outputs are compared token by token (each token's row in ours against its row in
//! mergekit's), the other sources id by id.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use shardmerge::job::SubmitOptions;
use shardmerge_worker::format::dtype::DType;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vocab")
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// token → id of a tokenizer.json (model vocabulary and added tokens).
fn token_ids(t: &Value) -> BTreeMap<String, u64> {
    let mut m: BTreeMap<String, u64> = t["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    for a in t["added_tokens"].as_array().unwrap() {
        m.insert(
            a["content"].as_str().unwrap().to_string(),
            a["id"].as_u64().unwrap(),
        );
    }
    m
}

/// An added token's entry without its id.
fn without_id(e: &Value) -> Value {
    let mut e = e.clone();
    e.as_object_mut().unwrap().remove("id");
    e
}

/// The tokenizer files: everything but the added tokens as mergekit's, the same added tokens
/// (by id where `same_ids`, else as a set), ids 0..n. Returns (ours, mergekit's) token → id.
fn check_tokenizer(
    ours: &Path,
    theirs: &Path,
    same_ids: bool,
) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let o = json(&ours.join("tokenizer.json"));
    let t = json(&theirs.join("tokenizer.json"));
    for (k, v) in t.as_object().unwrap() {
        if k != "added_tokens" {
            assert_eq!(&o[k], v, "tokenizer.json `{k}` differs from mergekit's");
        }
    }
    let (oi, ti) = (token_ids(&o), token_ids(&t));
    if same_ids {
        assert_eq!(o["added_tokens"], t["added_tokens"]);
        assert_eq!(oi, ti);
    } else {
        let set = |v: &Value| {
            let mut s: Vec<String> = v["added_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| without_id(e).to_string())
                .collect();
            s.sort();
            s
        };
        assert_eq!(set(&o), set(&t), "added tokens differ from mergekit's");
        assert_eq!(
            oi.keys().collect::<Vec<_>>(),
            ti.keys().collect::<Vec<_>>(),
            "the output vocabularies hold different tokens"
        );
    }
    let mut ids: Vec<u64> = oi.values().copied().collect();
    ids.sort();
    assert!(
        ids.iter().enumerate().all(|(i, &id)| i as u64 == id),
        "ids are not 0..n"
    );
    // transformers loads it: its config names the same special tokens
    let oc = json(&ours.join("tokenizer_config.json"));
    let tc = json(&theirs.join("tokenizer_config.json"));
    for k in ["bos_token", "eos_token", "pad_token", "tokenizer_class"] {
        assert_eq!(oc[k], tc[k], "tokenizer_config.json `{k}`");
    }
    (oi, ti)
}

/// Whether `a` (ours) is within the golden tolerance of `b` (mergekit's) for a tensor of `dt`.
fn close(a: f32, b: f32, dt: DType) -> bool {
    let (rel, atol) = if dt == DType::F32 {
        (1e-4, 1e-5)
    } else {
        (2f64.powi(-7), 1e-6)
    };
    let d = (a as f64 - b as f64).abs();
    !d.is_nan() && d <= atol + rel * (b as f64).abs()
}

const EMBEDS: &[&str] = &["model.embed_tokens.weight", "lm_head.weight"];

/// Compares every tensor with mergekit's (embedding rows by token), allowing `share` of a
/// tensor's elements outside the tolerance. Returns the mismatches and the count of elements
/// that are not bit-identical.
fn check_tensors(
    ours: &Path,
    theirs: &Path,
    oi: &BTreeMap<String, u64>,
    ti: &BTreeMap<String, u64>,
    share: f64,
) -> (Vec<String>, usize) {
    let o = load(ours);
    let t = load(theirs);
    assert_eq!(
        o.keys().collect::<Vec<_>>(),
        t.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    let mut bad = Vec::new();
    let mut inexact = 0;
    for (n, tt) in &t {
        let ot = &o[n];
        assert_eq!((ot.dtype, &ot.shape), (tt.dtype, &tt.shape), "{n}");
        // ours, in mergekit's row order
        let ov: Vec<f32> = if EMBEDS.contains(&n.as_str()) {
            let w = tt.shape[1] as usize;
            let mut v = ot.values.clone();
            for (tok, &their_id) in ti {
                let our_id = oi[tok] as usize;
                let their_id = their_id as usize;
                v[their_id * w..(their_id + 1) * w]
                    .copy_from_slice(&ot.values[our_id * w..(our_id + 1) * w]);
            }
            v
        } else {
            ot.values.clone()
        };
        inexact += ov
            .iter()
            .zip(&tt.values)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let off = ov
            .iter()
            .zip(&tt.values)
            .filter(|(a, b)| !close(**a, **b, tt.dtype))
            .count();
        if off > (share * tt.values.len() as f64) as usize {
            bad.push(format!("{n}: {off}/{} elements off", tt.values.len()));
        }
    }
    (bad, inexact)
}

/// How a case is held to mergekit's output.
#[derive(Clone, Copy, PartialEq)]
enum Bar {
    /// Every element bit-identical.
    Exact,
    /// The golden tolerance (at most 1e-4 of a tensor's elements outside it).
    Tolerance,
    /// Top-k methods: elements at the sparsification threshold may differ (shardmerge breaks
    /// magnitude ties by position, mergekit by torch's unstable sort; docs/methods.md), so
    /// at most 1% of a tensor's elements outside the tolerance.
    TopK,
}

/// Runs a case whole (1 worker) and cut (3 workers, 4 KiB tasks), checks both give the same
/// bytes, and compares with mergekit's output.
async fn case(name: &str, same_ids: bool, bar: Bar) {
    let f = fixtures();
    let dir = f.join("cases").join(name);
    let recipe = std::fs::read_to_string(dir.join("config.yml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = |task_size, slot_memory| SubmitOptions {
        task_size,
        slot_memory,
        base_dir: f.clone(),
        ..Default::default()
    };
    let whole = tmp.path().join("whole");
    run_opts(&recipe, &whole, 1, opts(64 << 20, 512 << 20))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let cut = tmp.path().join("cut");
    run_opts(&recipe, &cut, 3, opts(4096, 64 << 10))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        file_bytes(&whole),
        file_bytes(&cut),
        "{name}: output depends on the task layout"
    );
    let expected = dir.join("expected");
    let (oi, ti) = check_tokenizer(&whole, &expected, same_ids);
    let oc = json(&whole.join("config.json"));
    let tc = json(&expected.join("config.json"));
    assert_eq!(oc["vocab_size"], tc["vocab_size"], "{name}: vocab_size");
    let share = if bar == Bar::TopK { 1e-2 } else { 1e-4 };
    let (bad, inexact) = check_tensors(&whole, &expected, &oi, &ti, share);
    assert!(
        bad.is_empty(),
        "{name}: {} tensors differ from mergekit:\n{}",
        bad.len(),
        bad.join("\n")
    );
    eprintln!("{name}: {inexact} elements not bit-identical to mergekit's");
    if bar == Bar::Exact {
        assert_eq!(
            inexact, 0,
            "{name}: elements not bit-identical to mergekit's"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_task_arithmetic_bf16() {
    case("union_task_arithmetic_bf16", false, Bar::Exact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_task_arithmetic_f32() {
    case("union_task_arithmetic_f32", false, Bar::Tolerance).await;
}

/// No base model: tokens only lang and lang2 have are their rows' mean (rounded op by op in
/// bfloat16); linear accumulates in f32 as mergekit 0.1.5 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_linear_bf16() {
    case("union_linear_bf16", false, Bar::Exact).await;
}

/// No base model: tokens only lang and lang2 have are their rows' mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_linear_f32() {
    case("union_linear_f32", false, Bar::Tolerance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_task_arithmetic_bf16() {
    case("base_task_arithmetic_bf16", true, Bar::Exact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_source_linear_f32() {
    case("model_source_linear_f32", true, Bar::Tolerance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_task_arithmetic_bf16() {
    case("tokens_task_arithmetic_bf16", false, Bar::Exact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pad_linear_f32() {
    case("pad_linear_f32", false, Bar::Tolerance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_ties_bf16() {
    case("union_ties_bf16", false, Bar::TopK).await;
}

/// Models of different vocabulary sizes without tokenizer settings: refused with mergekit's
/// guidance, naming the ways out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_vocabularies_are_refused_by_default() {
    let f = fixtures();
    let recipe = "merge_method: linear\nmodels:\n  - model: models/base\n    parameters: {weight: 0.5}\n  - model: models/lang\n    parameters: {weight: 0.5}\n";
    let tmp = tempfile::tempdir().unwrap();
    let e = run(recipe, &f, &tmp.path().join("o"), 1, 1 << 20, 1 << 26)
        .await
        .unwrap_err();
    for want in [
        "vocabularies differ",
        "tokenizer_source: union",
        "--unsafe-truncate-embeddings",
    ] {
        assert!(e.contains(want), "{want:?} missing from: {e}");
    }
}

/// A tokenizer whose ids reach past the model's embedding rows (a config `vocab_size` larger
/// than the tensor): refused while planning, naming the model, token and tensor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_ids_past_the_rows_are_refused() {
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    for m in ["base", "lang"] {
        let d = tmp.path().join(m);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(f.join("models").join(m)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    let lang = tmp.path().join("lang");
    let mut cfg = json(&lang.join("config.json"));
    cfg["vocab_size"] = serde_json::json!(300);
    std::fs::write(lang.join("config.json"), cfg.to_string()).unwrap();
    let mut tok = json(&lang.join("tokenizer.json"));
    tok["model"]["vocab"]["zzzz"] = serde_json::json!(290);
    std::fs::write(lang.join("tokenizer.json"), tok.to_string()).unwrap();
    let recipe = "merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: base\n    parameters: {weight: 0.5}\n  - model: lang\n    parameters: {weight: 0.5}\n";
    let e = run(
        recipe,
        tmp.path(),
        &tmp.path().join("o"),
        1,
        1 << 20,
        1 << 26,
    )
    .await
    .unwrap_err();
    for want in ["model lang", "\"zzzz\"", "290", "288 rows"] {
        assert!(e.contains(want), "{want:?} missing from: {e}");
    }
}
