//! LoRA inputs (`model+adapter`), through the `shardmerge` binary: each case of
//! tests/fixtures/lora equals what mergekit 0.1.5 wrote for it (the adapter merged by peft's
//! `merge_and_unload` into a `--lora-merge-cache` copy, then merged) within the golden
//! tolerances; the bytes are the same however the job is cut; no merged copy of the model is
//! written; unsupported adapters are refused naming the adapter and the key.

mod common;

use std::path::{Path, PathBuf};

use common::{compare, file_bytes};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora")
}

/// The exit code and stderr of `shardmerge ARGS` run in `dir`.
fn run_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let (code, _, err) = common::shardmerge_in(dir, args);
    (code, err)
}

/// Runs case `name`'s recipe into `out` with `extra` options.
fn run_case(name: &str, out: &Path, extra: &[&str]) {
    let recipe = fixtures().join("cases").join(name).join("config.yml");
    let mut args = vec!["run", "-q", recipe.to_str().unwrap(), out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, err) = run_in(&fixtures(), &args);
    assert_eq!(code, 0, "{name}: {err}");
}

const CASES: &[(&str, &str)] = &[
    ("plain_linear", "../golden/models/base"),
    ("patterns_task_arithmetic", "../golden/models/base"),
    ("embed_save_linear", "../golden/models/base"),
    ("bf16_task_arithmetic", "../../../examples/models/base"),
    ("bf16_alone", "../../../examples/models/base"),
];

#[test]
fn a_bf16_adapter_applies_bit_for_bit_as_peft_merges_it() {
    // one model, weight 1: mergekit's output is peft's merged model itself, so every tensor
    // the adapter touches (Linear: the f32 delta added and rounded once; the embedding: the
    // delta rounded first) must be the same bits
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    run_case("bf16_alone", &out, &[]);
    let ours = common::load(&out);
    let theirs = common::load(&fixtures().join("cases/bf16_alone/expected"));
    assert_eq!(ours.len(), theirs.len());
    for (n, e) in &theirs {
        assert_eq!(ours[n].raw, e.raw, "{n}");
    }
}

#[test]
fn every_case_equals_mergekit_with_peft_merged_adapters() {
    let t = tempfile::tempdir().unwrap();
    for (name, base) in CASES {
        let out = t.path().join(name);
        run_case(name, &out, &[]);
        let expected = fixtures().join("cases").join(name).join("expected");
        let bad = compare(&out, &expected, &fixtures().join(base), "exact");
        assert!(bad.is_empty(), "{name}: {bad:#?}");
        // nothing but the output was written: no merged copy of a model next to it
        let names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| CASES.iter().any(|(c, _)| c == n)),
            "{names:?}"
        );
    }
}

#[test]
fn the_bytes_do_not_depend_on_how_the_job_is_cut() {
    let t = tempfile::tempdir().unwrap();
    for (name, _) in CASES {
        let whole = t.path().join(format!("{name}-whole"));
        run_case(name, &whole, &["--workers", "1"]);
        let cut = t.path().join(format!("{name}-cut"));
        run_case(name, &cut, &["--workers", "3", "--task-size", "1KiB"]);
        let data = |d: &Path| {
            file_bytes(d)
                .into_iter()
                .filter(|(n, _)| n.ends_with(".safetensors"))
                .collect::<Vec<_>>()
        };
        assert_eq!(data(&whole), data(&cut), "{name}");
    }
}

/// `plan` says which adapter each input carries and what it does (text and `--json`).
#[test]
fn plan_names_each_inputs_adapter() {
    let case = "cases/embed_save_linear/config.yml";
    let (code, out, err) = common::shardmerge_in(&fixtures(), &["plan", case]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "+ adapter  adapters/embed (LoRA up to rank 4: a delta on 2 tensors, 2 replaced;"
        ) && out.contains(
            "+ adapter  adapters/save (LoRA up to rank 2: a delta on 4 tensors, 10 replaced;"
        ),
        "{out}"
    );
    let (code, out, err) = common::shardmerge_in(&fixtures(), &["plan", "--json", case]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let a = &v["models"][1]["adapter"];
    assert_eq!(a["reference"], "adapters/save", "{v}");
    assert_eq!(a["tensors_replaced"], 10);
    assert_eq!(a["max_rank"], 2);
}
