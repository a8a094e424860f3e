//! The `shardmerge` binary on bad input: a one-line error naming the file, tensor or key,
//! exit code 1, no panic, and nothing left behind that looks like a finished checkpoint.
//! Also: run + verify on a good recipe, plan --json, and verify rejecting a damaged file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::golden;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shardmerge"))
}

struct Outcome {
    code: i32,
    stderr: String,
    stdout: String,
}

fn run_in(dir: &Path, args: &[&str]) -> Outcome {
    let o = bin().current_dir(dir).args(args).output().unwrap();
    Outcome {
        code: o.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
    }
}

/// A scratch folder holding a copy of the golden models.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let models = t.path().join("models");
    for m in ["base", "instruct", "lang_eu"] {
        let d = models.join(m);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(golden().join("models").join(m).join(f), d.join(f)).unwrap();
        }
    }
    let p = t.path().to_path_buf();
    (t, p)
}

const TA: &str = "merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters:\n    weight: 1.0\n- model: models/lang_eu\n  parameters:\n    weight: 0.5\n";

/// Runs `recipe` into `out` and checks the failure contract; returns stderr.
fn fails(dir: &Path, recipe: &str) -> String {
    std::fs::write(dir.join("r.yml"), recipe).unwrap();
    let out = dir.join("out");
    let o = run_in(dir, &["run", "r.yml", out.to_str().unwrap(), "--quiet"]);
    assert_eq!(o.code, 1, "expected exit 1; stderr: {}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "one line of error expected, got: {}",
        o.stderr
    );
    assert!(lines[0].starts_with("error: "), "{}", o.stderr);
    assert!(
        !out.join("model.safetensors.index.json").exists(),
        "an index was left behind"
    );
    if out.exists() {
        for e in std::fs::read_dir(&out).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !n.ends_with(".safetensors"),
                "finished-looking file {n} left behind"
            );
        }
    }
    o.stderr
}

/// Writes a safetensors file from a raw header JSON and `data` bytes.
fn raw_file(path: &Path, header: &str, data: usize) {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data));
    std::fs::write(path, v).unwrap();
}

fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h);
    let mut hs = serde_json::to_vec(&h).unwrap();
    while hs.len() < n {
        hs.push(b' ');
    }
    assert!(hs.len() == n, "edited header must keep its length");
    let mut out = bytes.clone();
    out[8..8 + n].copy_from_slice(&hs);
    std::fs::write(path, out).unwrap();
}

#[test]
fn good_run_verifies_and_plans() {
    let (_t, d) = scratch();
    std::fs::write(d.join("r.yml"), TA).unwrap();
    let o = run_in(&d, &["run", "r.yml", "out", "--quiet"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = run_in(&d, &["verify", "out"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(v.stdout.contains("39 tensors"), "{}", v.stdout);
    for f in ["config.json", "README.md", "model.safetensors.index.json"] {
        assert!(d.join("out").join(f).exists(), "{f}");
    }
    let card = std::fs::read_to_string(d.join("out/README.md")).unwrap();
    assert!(card.contains("merge_method: task_arithmetic"));
    let p = run_in(&d, &["plan", "r.yml", "--json"]);
    assert_eq!(p.code, 0, "{}", p.stderr);
    let j: serde_json::Value = serde_json::from_str(&p.stdout).unwrap();
    assert_eq!(j["tensors"].as_array().unwrap().len(), 39);
    assert!(j["peak_memory_per_worker"].as_u64().unwrap() > 0);
    // a sharded output: several files, the index maps every tensor
    let o = run_in(
        &d,
        &[
            "run",
            "r.yml",
            "out2",
            "--quiet",
            "--out-shard-size",
            "200K",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(d.join("out2/model-00001-of-00005.safetensors").exists());
    assert_eq!(run_in(&d, &["verify", "out2"]).code, 0);
}

/// `shardmerge plan … | head -1`, `verify … | head -1`: a reader that goes away ends the program
/// quietly (it panicked with "failed printing to stdout: Broken pipe").
#[test]
fn a_closed_pipe_on_stdout_ends_quietly() {
    let (_t, d) = scratch();
    std::fs::write(d.join("r.yml"), TA).unwrap();
    for args in [&["plan", "r.yml"][..], &["plan", "r.yml", "--json"]] {
        let mut c = bin()
            .current_dir(&d)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(c.stdout.take()); // the reader is gone before anything is written
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {:?} {err}", o.status);
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

#[test]
fn missing_model_folder() {
    let (_t, d) = scratch();
    let e = fails(&d, &TA.replace("models/lang_eu", "models/lang_xx"));
    assert!(
        e.contains("models/lang_xx") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn missing_tensor_in_one_model() {
    let (_t, d) = scratch();
    let f = d.join("models/lang_eu/model.safetensors");
    edit_header(&f, |h| {
        let o = h.as_object_mut().unwrap();
        let v = o.remove("model.layers.1.mlp.up_proj.weight").unwrap();
        o.insert("model.layers.1.mlp.up_proj.weigh_".into(), v);
    });
    let e = fails(&d, TA);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight")
            && e.contains("missing")
            && e.contains("lang_eu"),
        "{e}"
    );
}

#[test]
fn shape_mismatch() {
    let (_t, d) = scratch();
    let f = d.join("models/lang_eu/model.safetensors");
    edit_header(&f, |h| {
        h["model.layers.0.self_attn.q_proj.weight"]["shape"] = serde_json::json!([32, 128]);
    });
    let e = fails(&d, TA);
    assert!(e.contains("shape mismatch") && e.contains("q_proj"), "{e}");
}

#[test]
fn unsupported_dtype() {
    let (_t, d) = scratch();
    let f = d.join("models/lang_eu/model.safetensors");
    edit_header(&f, |h| {
        // same byte length: 64 F32 == 64 I32
        h["model.norm.weight"]["dtype"] = serde_json::json!("I32");
    });
    let e = fails(&d, TA);
    assert!(e.contains("model.norm.weight") && e.contains("I32"), "{e}");
}

#[test]
fn malformed_yaml() {
    let (_t, d) = scratch();
    let e = fails(&d, "merge_method: [ties\nmodels: {");
    assert!(e.contains("YAML"), "{e}");
}

#[test]
fn header_length_past_end() {
    let (_t, d) = scratch();
    let f = d.join("models/lang_eu/model.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let past = b.len() as u64 * 2;
    b[..8].copy_from_slice(&past.to_le_bytes());
    std::fs::write(&f, b).unwrap();
    let e = fails(&d, TA);
    assert!(
        e.contains("lang_eu/model.safetensors") && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn out_of_bounds_offsets() {
    let (_t, d) = scratch();
    let f = d.join("models/lang_eu/model.safetensors");
    // truncate the file: the last tensors' offsets now point past its end
    let b = std::fs::read(&f).unwrap();
    std::fs::write(&f, &b[..b.len() - 1000]).unwrap();
    let e = fails(&d, TA);
    assert!(
        e.contains("lang_eu/model.safetensors") && e.contains("out of bounds"),
        "{e}"
    );
}

#[test]
fn overlapping_offsets() {
    let (_t, d) = scratch();
    let dir = d.join("models/lang_eu");
    raw_file(
        &dir.join("model.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    );
    let e = fails(&d, TA);
    assert!(e.contains("overlap") && e.contains("lang_eu"), "{e}");
}

#[test]
fn recipe_rule_errors_name_method_and_parameter() {
    let (_t, d) = scratch();
    let e = fails(&d, &TA.replace("task_arithmetic", "frobnicate"));
    assert!(e.contains("unknown method `frobnicate`"), "{e}");
    let e = fails(&d, &TA.replace("weight: 0.5", "wieght: 0.5"));
    assert!(
        e.contains("models[1].parameters.wieght") && e.contains("task_arithmetic"),
        "{e}"
    );
    let e = fails(&d, &TA.replace("base_model: models/base\n", ""));
    assert!(e.contains("task_arithmetic needs base_model"), "{e}");
    let slerp = "merge_method: slerp\nbase_model: models/base\nparameters:\n  t: 0.5\nmodels:\n- model: models/base\n- model: models/instruct\n- model: models/lang_eu\n";
    let e = fails(&d, slerp);
    assert!(e.contains("slerp takes exactly 2 models"), "{e}");
    let ties = TA
        .replace("task_arithmetic", "ties")
        .replace("weight: 0.5", "weight: 0.5\n    density: 0");
    let e = fails(&d, &ties);
    assert!(
        e.contains("ties") && e.contains("density must be greater than 0"),
        "{e}"
    );
    let della = TA.replace("task_arithmetic", "della").replace(
        "weight: 0.5",
        "weight: 0.5\n    density: 0.5\n    epsilon: 0.6",
    );
    let e = fails(&d, &della);
    assert!(e.contains("della") && e.contains("epsilon"), "{e}");
    let stock =
        "merge_method: model_stock\nbase_model: models/base\nmodels:\n- model: models/instruct\n";
    let e = fails(&d, stock);
    assert!(e.contains("model_stock"), "{e}");
}

#[test]
fn verify_rejects_damage() {
    let (_t, d) = scratch();
    std::fs::write(d.join("r.yml"), TA).unwrap();
    assert_eq!(run_in(&d, &["run", "r.yml", "out", "--quiet"]).code, 0);
    // trailing garbage after the last tensor
    let f = d.join("out/model.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    b.extend_from_slice(&[0; 16]);
    std::fs::write(&f, &b).unwrap();
    let v = run_in(&d, &["verify", "out"]);
    assert_eq!(v.code, 1);
    assert!(v.stderr.contains("after the last tensor"), "{}", v.stderr);
    // an index that names a tensor the file doesn't hold
    b.truncate(b.len() - 16);
    std::fs::write(&f, &b).unwrap();
    let idx = d.join("out/model.safetensors.index.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&idx).unwrap()).unwrap();
    j["weight_map"]["ghost.weight"] = serde_json::json!("model.safetensors");
    std::fs::write(&idx, serde_json::to_vec(&j).unwrap()).unwrap();
    let v = run_in(&d, &["verify", "out"]);
    assert_eq!(v.code, 1);
    assert!(v.stderr.contains("ghost.weight"), "{}", v.stderr);
}

/// Tokenizer files and generation_config.json come from `tokenizer_source` (default: the base
/// model); config.json from the base with the output dtype and layer count.
#[test]
fn tokenizer_and_config_come_from_the_right_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let t = tempfile::tempdir().unwrap();
    let recipe = |extra: &str| {
        format!(
            "merge_method: task_arithmetic\nbase_model: examples/models/base\ndtype: float16\n{extra}models:\n- model: examples/models/instruct\n  parameters:\n    weight: 1.0\n- model: examples/models/lang_eu\n  parameters:\n    weight: 1.0\n"
        )
    };
    for (extra, want) in [
        ("", "base"),
        ("tokenizer_source: examples/models/lang_eu\n", "lang_eu"),
    ] {
        let r = t.path().join("r.yml");
        std::fs::write(&r, recipe(extra)).unwrap();
        let out = t.path().join(format!("out-{want}"));
        let o = run_in(
            &root,
            &["run", r.to_str().unwrap(), out.to_str().unwrap(), "--quiet"],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        let tc = std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap();
        assert!(
            tc.contains(&format!("\"{want}\"")) || tc.contains(&format!("/{want}")),
            "{want}: {tc}"
        );
        assert!(out.join("tokenizer.json").exists() && out.join("generation_config.json").exists());
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], "float16");
        assert_eq!(cfg["num_hidden_layers"], 4);
    }
}

/// Every file directly in `dir`, by name.
fn files_in(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut m = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            m.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    m
}

/// An output that is, contains or sits inside an input model's folder is refused (even with
/// --overwrite, through a symlink or `..`), and the input is untouched.
#[test]
fn output_overlapping_an_input_is_refused() {
    let (_t, d) = scratch();
    std::fs::write(d.join("r.yml"), TA).unwrap();
    std::os::unix::fs::symlink(d.join("models/lang_eu"), d.join("link")).unwrap();
    let before = files_in(&d.join("models/instruct"));
    let cases = [
        ("models/instruct", "is the folder"),
        ("models/instruct/merged", "is inside the folder"),
        ("models/base/../instruct/", "is the folder"),
        ("models", "contains the folder"),
        ("link", "is the folder"),
        ("link/out", "is inside the folder"),
    ];
    for (out, rel) in cases {
        for extra in [&[][..], &["--overwrite"][..]] {
            let o = run_in(&d, &[&["run", "r.yml", out, "--quiet"][..], extra].concat());
            assert_eq!(o.code, 1, "{out} {extra:?}: {}", o.stderr);
            assert!(
                o.stderr.contains(rel) && o.stderr.contains("input model"),
                "{out}: {}",
                o.stderr
            );
        }
    }
    assert_eq!(files_in(&d.join("models/instruct")), before);
    assert!(!d.join("models/instruct/merged").exists());
    assert!(!d.join("models/lang_eu/out").exists());
    for m in ["base", "lang_eu"] {
        let names: Vec<String> = files_in(&d.join("models").join(m)).into_keys().collect();
        assert_eq!(names, ["config.json", "model.safetensors"], "{m}");
    }
}

/// An output that holds files (a finished checkpoint, or anything else) is refused without
/// --overwrite, and stays as it was.
#[test]
fn non_empty_output_needs_overwrite() {
    let (_t, d) = scratch();
    std::fs::write(d.join("r.yml"), TA).unwrap();
    assert_eq!(run_in(&d, &["run", "r.yml", "out", "--quiet"]).code, 0);
    let before = files_in(&d.join("out"));
    let o = run_in(&d, &["run", "r.yml", "out", "--quiet"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("already holds") && o.stderr.contains("--overwrite"),
        "{}",
        o.stderr
    );
    assert_eq!(files_in(&d.join("out")), before);
    // any file counts, not only a checkpoint; an empty folder is fine
    std::fs::create_dir(d.join("notes")).unwrap();
    std::fs::write(d.join("notes/todo.txt"), "keep me").unwrap();
    let o = run_in(&d, &["run", "r.yml", "notes", "--quiet"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("todo.txt"), "{}", o.stderr);
    assert_eq!(std::fs::read(d.join("notes/todo.txt")).unwrap(), b"keep me");
    std::fs::create_dir(d.join("empty")).unwrap();
    assert_eq!(run_in(&d, &["run", "r.yml", "empty", "--quiet"]).code, 0);
}

/// `--overwrite` leaves exactly the new checkpoint: an old run sharded into several files,
/// replaced by one file, leaves no stale shard; the bytes equal a run into a fresh folder, and
/// `verify --data` accepts them.
#[test]
fn overwrite_leaves_exactly_the_new_checkpoint() {
    let (_t, d) = scratch();
    std::fs::write(d.join("r.yml"), TA).unwrap();
    let sharded = ["run", "r.yml", "out", "--quiet", "--out-shard-size", "300K"];
    assert_eq!(run_in(&d, &sharded).code, 0);
    assert!(d.join("out/model-00001-of-00003.safetensors").exists());
    let other = TA.replace("weight: 0.5", "weight: 0.25");
    std::fs::write(d.join("r2.yml"), &other).unwrap();
    let args = ["run", "r2.yml", "out", "--quiet", "--task-size", "64K"];
    let o = run_in(&d, &[&args[..], &["--overwrite"]].concat());
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = run_in(
        &d,
        &["run", "r2.yml", "fresh", "--quiet", "--task-size", "64K"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let got = files_in(&d.join("out"));
    let want = files_in(&d.join("fresh"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(
        got == want,
        "overwritten checkpoint differs from a fresh run"
    );
    assert!(got.contains_key("shardmerge.checksums.json"));
    let v = run_in(&d, &["verify", "--data", "out"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(v.stdout.contains("data ok: 1 file(s)"), "{}", v.stdout);
    // and back to three shards: the one-file checkpoint's model.safetensors goes
    let o = run_in(&d, &[&sharded[..], &["--overwrite"]].concat());
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!d.join("out/model.safetensors").exists());
    assert_eq!(run_in(&d, &["verify", "--data", "out"]).code, 0);
}

/// `verify --data` re-reads the data: one flipped byte in a tensor (which plain `verify`,
/// reading headers only, cannot see) fails it, naming the file; so does a checkpoint without
/// a checksum manifest.
#[test]
fn verify_data_catches_a_flipped_byte() {
    let (_t, d) = scratch();
    std::fs::write(d.join("r.yml"), TA).unwrap();
    let o = run_in(
        &d,
        &["run", "r.yml", "out", "--quiet", "--task-size", "100K"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = run_in(&d, &["verify", "--data", "out"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let f = d.join("out/model.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let at = b.len() - 1000;
    b[at] ^= 0x10;
    std::fs::write(&f, &b).unwrap();
    assert_eq!(run_in(&d, &["verify", "out"]).code, 0);
    let v = run_in(&d, &["verify", "--data", "out"]);
    assert_eq!(v.code, 1, "{}", v.stdout);
    assert!(
        v.stderr
            .contains("model.safetensors: data checksum mismatch"),
        "{}",
        v.stderr
    );
    std::fs::remove_file(d.join("out/shardmerge.checksums.json")).unwrap();
    let v = run_in(&d, &["verify", "--data", "out"]);
    assert_eq!(v.code, 1);
    assert!(v.stderr.contains("no checksum manifest"), "{}", v.stderr);
}

/// Non-finite and out-of-f32 parameter values are refused before anything is read, at every
/// level a parameter can be set (model, global, gradient, filter list, slice source), with the
/// key and the model named.
#[test]
fn bad_numbers_are_refused_with_key_and_model() {
    let (_t, d) = scratch();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "merge_method: linear\nmodels:\n- model: models/base\n  parameters:\n    weight: .nan\n- model: models/instruct\n  parameters:\n    weight: 1\n".into(),
            vec!["models[0].parameters.weight", "models/base", ".nan"],
        ),
        (
            "merge_method: linear\nmodels:\n- model: models/base\n  parameters:\n    weight: 1\n- model: models/instruct\n  parameters:\n    weight: .inf\n".into(),
            vec!["models[1].parameters.weight", "models/instruct", ".inf"],
        ),
        (
            TA.replace("weight: 0.5", "weight: 1e39"),
            vec!["models[1].parameters.weight", "models/lang_eu", "1e39", "32-bit float"],
        ),
        (
            TA.replace("models:\n", "parameters:\n  weight: [0.1, -.inf]\nmodels:\n"),
            vec!["parameters.weight[1]", "-.inf"],
        ),
        (
            TA.replace("weight: 0.5", "weight:\n    - filter: mlp\n      value: .nan\n    - value: 0.5"),
            vec!["models[1].parameters.weight[0].value", "models/lang_eu", ".nan"],
        ),
        (
            "merge_method: slerp\nbase_model: models/base\nslices:\n- sources:\n  - model: models/base\n    layer_range: [0, 2]\n  - model: models/instruct\n    layer_range: [0, 2]\n    parameters:\n      t: -1e300\n".into(),
            vec!["slices[0].sources[1].parameters.t", "models/instruct", "32-bit float"],
        ),
        (
            "merge_method: slerp\nbase_model: models/base\nslices:\n- sources:\n  - model: models/base\n    layer_range: [0, 2]\n  - model: models/instruct\n    layer_range: [0, 2]\n  parameters:\n    t: 1e30\n".into(),
            vec!["slerp", "t must be in [0, 1]", "1000000000000000000000000000000"],
        ),
        (
            "merge_method: karcher\nparameters:\n  tol: .nan\nmodels:\n- model: models/base\n- model: models/instruct\n".into(),
            vec!["parameters.tol", ".nan"],
        ),
    ];
    for (recipe, want) in cases {
        let e = fails(&d, &recipe);
        for w in want {
            assert!(e.contains(w), "{w:?} missing from: {e}");
        }
    }
}

/// karcher with `tol: 0` over equal and parallel inputs (mergekit divides 0 by 0 there) gives
/// finite output, and the expected one: the mean of equal inputs is the input.
#[test]
fn karcher_tol_zero_stays_finite_on_degenerate_inputs() {
    let (_t, d) = scratch();
    let base = d.join("models/base");
    let twin = d.join("models/twin");
    std::fs::create_dir_all(&twin).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(base.join(f), twin.join(f)).unwrap();
    }
    for (i, tol) in ["0", "0.0", "1e-5"].iter().enumerate() {
        let r = format!(
            "merge_method: karcher\nparameters:\n  tol: {tol}\n  max_iter: 50\nmodels:\n- model: models/base\n- model: models/twin\n- model: models/base\n"
        );
        std::fs::write(d.join("k.yml"), r).unwrap();
        let out = format!("kout{i}");
        let o = run_in(&d, &["run", "k.yml", &out, "--quiet"]);
        assert_eq!(o.code, 0, "tol {tol}: {}", o.stderr);
        let got = common::load(&d.join(&out));
        let want = common::load(&base);
        for (name, t) in &got {
            assert!(
                t.values.iter().all(|v| v.is_finite()),
                "tol {tol}: {name} is not finite"
            );
            let w = &want[name];
            let worst = t
                .values
                .iter()
                .zip(&w.values)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
                .fold(0f32, f32::max);
            assert!(worst < 1e-2, "tol {tol}: {name} differs by {worst}");
        }
    }
}

/// linear weights that cancel cannot be normalised: refused at plan time, naming the method.
#[test]
fn linear_weights_summing_to_zero_are_refused() {
    let (_t, d) = scratch();
    let e = fails(
        &d,
        "merge_method: linear\nmodels:\n- model: models/base\n  parameters:\n    weight: 0.5\n- model: models/instruct\n  parameters:\n    weight: -0.5\n",
    );
    assert!(e.contains("linear") && e.contains("sum to 0"), "{e}");
}

/// Finite inputs and parameters whose result does not fit the output dtype (here float16,
/// whose largest value is 65504): the job fails naming the tensor instead of writing inf.
#[test]
fn output_turning_non_finite_fails_naming_the_tensor() {
    let (_t, d) = scratch();
    let e = fails(
        &d,
        "merge_method: linear\nout_dtype: float16\nparameters:\n  normalize: false\nmodels:\n- model: models/base\n  parameters:\n    weight: 1e30\n",
    );
    assert!(
        e.contains("tensor ") && e.contains("non-finite output") && e.contains("linear"),
        "{e}"
    );
}

/// Logs once carried ANSI colour codes into redirected files; the summary once said
/// "405.1 KiB in 0.0s (15.0 MiB/s)".
#[test]
fn logs_redirected_have_no_colour_and_the_summary_keeps_its_digits() {
    let (_t, dir) = scratch();
    std::fs::write(dir.join("r.yml"), TA).unwrap();
    let o = bin()
        .current_dir(&dir)
        .args(["run", "r.yml", "out"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("planned"), "an info log line: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes: {stderr:?}");
    let summary = stderr.lines().find(|l| l.starts_with("merged")).unwrap();
    assert!(
        !summary.contains(" 0.0s") && !summary.contains(" 0.0 s"),
        "{summary}"
    );
}

/// `SHARDMERGE_TOKEN_FILE=` (empty) once gave clap's error about `--token-file` alone.
#[test]
fn an_empty_environment_variable_is_named_in_the_error() {
    for (var, args) in [
        (
            "SHARDMERGE_TOKEN_FILE",
            &["status", "--coordinator", "http://127.0.0.1:9"][..],
        ),
        ("SHARDMERGE_COORDINATOR", &["status"][..]),
    ] {
        let o = bin().args(args).env(var, "").output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{var}: {stderr}");
        assert!(stderr.contains(var), "{var} not named: {stderr}");
    }
}

/// `SHARDMERGE_SIMD` caps the vector build the merge loops run (kernels/simd.rs): every cap
/// gives the same bytes as the widest build, a value it does not know is ignored with a
/// warning, and the run still succeeds.
#[test]
fn every_simd_cap_writes_the_same_bytes() {
    let (_t, d) = scratch();
    let ties = "merge_method: ties\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters:\n    weight: 1.0\n    density: 0.5\n- model: models/lang_eu\n  parameters:\n    weight: 0.7\n    density: 0.3\nparameters:\n  normalize: true\n";
    for (name, recipe) in [
        ("ta", TA.to_string()),
        ("ties", ties.to_string()),
        ("ties_bf16", format!("{ties}dtype: bfloat16\n")),
    ] {
        std::fs::write(d.join("r.yml"), &recipe).unwrap();
        let mut want = None;
        for cap in ["", "base", "avx2", "avx512", "sse9"] {
            let out = format!("out-{name}-{cap}");
            let o = bin()
                .current_dir(&d)
                .env("SHARDMERGE_SIMD", cap)
                .args(["run", "r.yml", &out, "--quiet"])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{name} {cap}: {stderr}");
            assert_eq!(
                stderr.contains("is not one of base, avx2, avx512"),
                cap == "sse9",
                "{name} {cap}: {stderr}"
            );
            let bytes = std::fs::read(d.join(&out).join("model.safetensors")).unwrap();
            match &want {
                None => want = Some(bytes),
                Some(w) => assert!(
                    w == &bytes,
                    "{name}: SHARDMERGE_SIMD={cap} changed the output"
                ),
            }
        }
    }
}
