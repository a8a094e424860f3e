//! Multi-stage recipes (mergekit-multi's file format) through the `shardmerge` binary: the
//! final output byte-identical to running the stages one by one, equal to mergekit-multi's
//! within the golden tolerances, no intermediate left behind, kept intermediates reused only
//! when their content key matches, every stage an output when all are named, `plan` listing
//! the stages, and errors naming the stage.

mod common;

use std::path::{Path, PathBuf};

use common::{compare, file_bytes, golden};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

use common::shardmerge_in as run_in;

fn ok(dir: &Path, args: &[&str]) -> (String, String) {
    let (code, out, err) = run_in(dir, args);
    assert_eq!(code, 0, "shardmerge {args:?}: {err}");
    (out, err)
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let (code, _, err) = run_in(dir, args);
    assert_eq!(code, 1, "shardmerge {args:?} should fail: {err}");
    err
}

/// The data files (safetensors and index) of a checkpoint.
fn data(dir: &Path) -> Vec<(String, Vec<u8>)> {
    file_bytes(dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors") || n.ends_with("index.json"))
        .collect()
}

/// A file's recipes, `name:` lines dropped, with `langs` replaced by `langs_at`.
fn stage_texts(text: &str, langs_at: &str) -> Vec<String> {
    text.split("\n---\n")
        .map(|s| {
            s.lines()
                .filter(|l| !l.starts_with("name:"))
                .map(|l| l.replace("model: langs", &format!("model: {langs_at}")))
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        })
        .collect()
}

#[test]
fn the_example_equals_its_stages_run_one_by_one_and_leaves_no_intermediate() {
    let t = tempfile::tempdir().unwrap();
    let scratch = t.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let out = t.path().join("final");
    let (s, o) = (scratch.to_str().unwrap(), out.to_str().unwrap());
    let (_, err) = ok(
        &root(),
        &[
            "run",
            "examples/multilingual-stages.yml",
            o,
            "--scratch",
            s,
            "--scratch-limit",
            "0",
        ],
    );
    assert!(
        err.contains("stage 1/2: stage `langs`") && err.contains("stage 2/2"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "the intermediate was left in {s}"
    );
    // the same recipes, run one by one with the intermediate written
    let text = std::fs::read_to_string(root().join("examples/multilingual-stages.yml")).unwrap();
    let langs = t.path().join("langs");
    let parts = stage_texts(&text, langs.to_str().unwrap());
    assert_eq!(parts.len(), 2);
    for (k, (part, dir)) in parts
        .iter()
        .zip([&langs, &t.path().join("manual")])
        .enumerate()
    {
        let f = t.path().join(format!("stage{k}.yml"));
        std::fs::write(&f, part).unwrap();
        ok(
            &root(),
            &["run", "-q", f.to_str().unwrap(), dir.to_str().unwrap()],
        );
    }
    let ours = data(&out);
    assert!(ours.iter().any(|(n, _)| n == "model.safetensors"));
    assert_eq!(
        ours,
        data(&t.path().join("manual")),
        "the one-file run differs from the stage-by-stage run"
    );
}

#[test]
fn equals_mergekit_multi_within_the_golden_tolerances() {
    let t = tempfile::tempdir().unwrap();
    let case = root().join("tests/fixtures/stages/ties_then_task_arithmetic");
    let recipe = std::fs::read_to_string(case.join("config.yml")).unwrap();
    let f = t.path().join("config.yml");
    std::fs::write(&f, common::retarget(&recipe, &golden().join("models"))).unwrap();
    let out = t.path().join("out");
    ok(
        t.path(),
        &["run", "-q", f.to_str().unwrap(), out.to_str().unwrap()],
    );
    let bad = compare(
        &out,
        &case.join("expected"),
        &golden().join("models/base"),
        "exact",
    );
    assert!(bad.is_empty(), "{bad:#?}");
}

const KEPT: &str = "name: langs
merge_method: ties
base_model: models/base
models:
  - model: models/lang_eu
    parameters: {density: 0.5, weight: 1.0}
  - model: models/lang_ca
    parameters: {density: DENSITY, weight: 1.0}
dtype: float32
---
merge_method: task_arithmetic
base_model: models/base
models:
  - model: langs
  - model: models/instruct
parameters: {weight: 1.0}
dtype: float32
";

#[test]
fn a_kept_intermediate_is_reused_only_when_its_key_matches() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let models = golden().join("models");
    let write = |density: &str| {
        let text = common::retarget(&KEPT.replace("DENSITY", density), &models);
        std::fs::write(dir.join("r.yml"), text).unwrap();
    };
    let run = |out: &str, extra: &[&str]| {
        let mut a = vec!["run", "r.yml", out, "--keep-intermediates", "kept"];
        a.extend_from_slice(extra);
        ok(dir, &a).1
    };
    write("0.5");
    let err = run("a", &[]);
    assert!(!err.contains("reused"), "{err}");
    let key = std::fs::read_to_string(dir.join("kept/langs/shardmerge.stage.json")).unwrap();
    assert!(dir.join("kept/langs/model.safetensors").exists());
    let first = data(&dir.join("a"));
    // the same recipe: the kept stage is reused, and the final output is the same
    let err = run("b", &[]);
    assert!(
        err.contains("stage `langs` -> ") && err.contains("reused"),
        "{err}"
    );
    assert_eq!(data(&dir.join("b")), first);
    // a changed stage recipe: never reused; the new output is the new recipe's
    write("0.3");
    let err = run("c", &[]);
    assert!(!err.contains("reused"), "{err}");
    let key2 = std::fs::read_to_string(dir.join("kept/langs/shardmerge.stage.json")).unwrap();
    assert_ne!(key, key2);
    let changed = data(&dir.join("c"));
    assert_ne!(changed, first);
    // a run without keeping gives the same bytes as the kept run of the same recipe
    ok(dir, &["run", "-q", "r.yml", "d"]);
    assert_eq!(data(&dir.join("d")), changed);
    // another option that shapes the bytes (the seed) changes the key too
    let err = run("e", &["--random-seed", "3"]);
    assert!(!err.contains("reused"), "{err}");
}

#[test]
fn a_kept_intermediate_is_not_reused_when_an_input_adapter_changes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let models = golden().join("models");
    // the stage's lang_eu input gets a LoRA adapter, a copy the test then trains "again"
    let ad = dir.join("ad");
    std::fs::create_dir(&ad).unwrap();
    let src = root().join("tests/fixtures/lora/adapters/plain");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), ad.join(f)).unwrap();
    }
    let eu = format!("{}/lang_eu\n", models.display());
    let text = common::retarget(&KEPT.replace("DENSITY", "0.5"), &models).replacen(
        &eu,
        &format!("{}/lang_eu+{}\n", models.display(), ad.display()),
        1,
    );
    assert!(text.contains("+"), "{text}");
    std::fs::write(dir.join("r.yml"), text).unwrap();
    let run = |out: &str| ok(dir, &["run", "r.yml", out, "--keep-intermediates", "kept"]).1;
    let key_of = || std::fs::read_to_string(dir.join("kept/langs/shardmerge.stage.json")).unwrap();
    let err = run("a");
    assert!(!err.contains("reused"), "{err}");
    let key = key_of();
    let err = run("b");
    assert!(err.contains("reused"), "{err}");
    // the same shapes, other values (the last weight's low byte): a new key, not reused
    let w = ad.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&w, bytes).unwrap();
    let err = run("c");
    assert!(!err.contains("reused"), "{err}");
    assert_ne!(key_of(), key);
}

#[test]
fn all_named_stages_are_each_an_output() {
    let t = tempfile::tempdir().unwrap();
    let text = KEPT.replace("DENSITY", "0.5").replacen(
        "merge_method: task_arithmetic",
        "name: top\nmerge_method: task_arithmetic",
        1,
    );
    std::fs::write(
        t.path().join("r.yml"),
        common::retarget(&text, &golden().join("models")),
    )
    .unwrap();
    ok(t.path(), &["run", "-q", "r.yml", "out"]);
    assert!(t
        .path()
        .join("out/langs/model.safetensors.index.json")
        .exists());
    assert!(t
        .path()
        .join("out/top/model.safetensors.index.json")
        .exists());
    let err = fails(
        t.path(),
        &["run", "r.yml", "o2", "--keep-intermediates", "k"],
    );
    assert!(err.contains("--keep-intermediates"), "{err}");
}

#[test]
fn plan_lists_the_stages() {
    let (out, _) = ok(&root(), &["plan", "examples/multilingual-stages.yml"]);
    assert!(
        out.contains("stage 1      stage `langs`: ties, streamed -> computed in the final stage's tasks, never written"),
        "{out}"
    );
    assert!(out.contains("stage 2      the final (unnamed) stage: task_arithmetic, final output -> OUT; uses `langs`"), "{out}");
    assert!(out.contains("method       ties"), "{out}");
    let (j, _) = ok(
        &root(),
        &["plan", "--json", "examples/multilingual-stages.yml"],
    );
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(v["stages"][1]["uses"][0], "langs");
    assert_eq!(v["stages"][0]["role"], "streamed");
}

#[test]
fn bad_files_are_errors_naming_the_stage() {
    let t = tempfile::tempdir().unwrap();
    let models = golden().join("models");
    let try_ = |text: &str| {
        std::fs::write(t.path().join("r.yml"), common::retarget(text, &models)).unwrap();
        fails(t.path(), &["run", "r.yml", "out"])
    };
    let e = try_("name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\nname: b\nmerge_method: linear\nmodels: [{model: a}]\n");
    assert!(e.contains("`a` -> `b` -> `a`"), "{e}");
    let e = try_("name: a\nmerge_method: linear\nmodels: [{model: models/base}]\n---\nname: a\nmerge_method: linear\nmodels: [{model: models/base}]\n");
    assert!(e.contains("stage `a`") && e.contains("unique"), "{e}");
    let e = try_("name: a\nmerge_method: linear\nmodels: [{model: models/base}]\nwieght: 1\n---\nmerge_method: linear\nmodels: [{model: a}]\n");
    assert!(
        e.contains("stage `a`") && e.contains("unknown key `wieght`"),
        "{e}"
    );
    // a missing model in the second stage is found before the first stage runs
    let e = try_("name: a\nmerge_method: linear\nparameters: {weight: 1}\nmodels: [{model: models/base}]\n---\nmerge_method: linear\nparameters: {weight: 1}\nmodels: [{model: a}, {model: models/nope}]\n");
    assert!(
        e.contains("the final (unnamed) stage") && e.contains("nope"),
        "{e}"
    );
    assert!(!t.path().join("out").exists());
}
