//! The merge report as users see it (`shardmerge report`, `run --report`): its figures against
//! an independent numpy computation on the example family, the same report however tensors
//! are cut, each input byte read once, the HTML page opened in headless Chromium and checked
//! against report.json, and the refusals.
//!
//! The numpy and browser checks need Python with numpy, and Playwright with a Chromium
//! (`.ci/run` installs them). Without them a check is skipped with a loud message, except
//! under CI (`CI` set), where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::family::{write_model, FamilySpec};
use serde_json::Value;
use shardmerge_worker::format::dtype::DType;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The exit code and stderr of `shardmerge ARGS` run in `dir`.
fn run_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let (code, _, err) = common::shardmerge_in(dir, args);
    (code, err)
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (code, err) = run_in(dir, args);
    assert_eq!(code, 0, "shardmerge {args:?}: {err}");
    err
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skips a check whose tools are missing: loudly, and never under CI.
fn missing(what: &str) {
    assert!(
        !in_ci(),
        "{what} is missing under CI (.ci/run installs it): the check cannot be skipped there"
    );
    eprintln!("\n*** SKIPPED: {what} is missing; install it to run this check (see .ci/run) ***\n");
}

/// A Python with `module`: $SHARDMERGE_TEST_PYTHON, else python3.
fn python_with(module: &str) -> Option<String> {
    let py = std::env::var("SHARDMERGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// The sweep the numpy check reports on: TIES over the whole example family (lang_ca is
/// sharded) at two densities, so every figure kind is there.
const SWEEP: &str = "merge_method: ties
base_model: examples/models/base
models:
  - model: examples/models/instruct
    parameters: {weight: 1.0, density: {sweep: [0.3, 0.5]}}
  - model: examples/models/lang_eu
    parameters: {weight: 0.7, density: 0.9}
  - model: examples/models/lang_ca
    parameters: {weight: 0.7, density: 0.5}
  - model: examples/models/lang_gl
    parameters: {weight: 0.7, density: 0.5}
dtype: bfloat16
";

#[test]
fn figures_match_numpy_on_the_example_family() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("sweep.yml");
    std::fs::write(&recipe, SWEEP).unwrap();
    let out = tmp.path().join("report");
    // the sweep's two points written first, so the report measures their distances too
    let sweep = tmp.path().join("sweep");
    let (r, s) = (recipe.to_str().unwrap(), sweep.to_str().unwrap());
    ok(&repo(), &["run", r, s, "--quiet"]);
    let o = out.to_str().unwrap();
    ok(&repo(), &["report", r, o, "--sweep-out", s]);
    let r = json(&out.join("report.json"));
    assert_eq!(r["schema"], "shardmerge.report/1");
    assert_eq!(r["distance_points"], r["points"]);
    assert!(r["total"]["distance"][1].as_f64().unwrap() > 0.0);
    assert_eq!(r["densities"], serde_json::json!([0.3, 0.5, 0.9]));
    assert_eq!(r["points"].as_array().unwrap().len(), 2);
    assert_eq!(r["models"].as_array().unwrap().len(), 4);
    assert_eq!(r["layers"].as_array().unwrap().len(), 4);
    // the layer-0 norm is the same in every model: no task vector, undefined cosines
    let norm = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.input_layernorm.weight")
        .unwrap();
    assert_eq!(norm["norm"][0], 0.0);
    assert!(norm["cosine"][0].is_null());
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert!(csv.starts_with("scope,name,layer,kind,metric,subject,value\n"));
    let Some(py) = python_with("numpy") else {
        return missing("Python with numpy");
    };
    let o = Command::new(py)
        .current_dir(repo())
        .arg(repo().join("coordinator/tests/report/numpy_check.py"))
        .arg(out.join("report.json"))
        .arg(&sweep)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{said}");
}

/// Three models of the suites' family, large enough that a 1 MiB slot cuts their tensors.
fn family(dir: &Path) {
    let spec = FamilySpec {
        hidden: 256,
        intermediate: 640,
        layers: 2,
        heads: 4,
        kv_heads: 4,
        vocab: 1000,
        dtype: DType::BF16,
        seed: 3,
        rms_norm_eps: 1e-5,
    };
    for m in ["base", "instruct", "lang_eu"] {
        write_model(&spec, m, 1000, &dir.join(m), None, 1).unwrap();
    }
    std::fs::write(
        dir.join("r.yml"),
        "merge_method: ties\nbase_model: base\nmodels:\n- model: instruct\n  parameters: {weight: 1.0, density: 0.4}\n- model: lang_eu\n  parameters: {weight: 0.7, density: 0.4}\n",
    )
    .unwrap();
}

#[test]
fn the_same_report_however_tensors_are_cut_and_inputs_read_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    ok(d, &["report", "r.yml", "whole", "--workers", "2"]);
    ok(
        d,
        &[
            "report",
            "r.yml",
            "cut",
            "--workers",
            "1",
            "--memory-limit",
            "1MiB",
        ],
    );
    let (mut whole, mut cut) = (
        json(&d.join("whole/report.json")),
        json(&d.join("cut/report.json")),
    );
    let plan: Value = {
        let o = Command::new(env!("CARGO_BIN_EXE_shardmerge"))
            .current_dir(d)
            .args(["plan", "r.yml", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // whole tensors: every input byte once; cut ones: once per pass (2 selection passes + 1)
    assert_eq!(whole["bytes_read"], plan["bytes_input"]);
    assert!(cut["bytes_read"].as_u64().unwrap() > plan["bytes_input"].as_u64().unwrap());
    whole["bytes_read"] = Value::Null;
    cut["bytes_read"] = Value::Null;
    assert_eq!(whole, cut);
    assert_eq!(
        std::fs::read(d.join("whole/report.html")).unwrap(),
        std::fs::read(d.join("cut/report.html")).unwrap()
    );
}

#[test]
fn run_report_writes_it_next_to_the_checkpoint_and_refusals_name_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    ok(d, &["run", "r.yml", "out", "--report", "--quiet"]);
    ok(d, &["verify", "out"]);
    assert!(d.join("out/report/report.html").exists());
    // a second report into the same folder needs --overwrite
    let (code, err) = run_in(d, &["report", "r.yml", "out/report"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("report.json") && err.contains("--overwrite"),
        "{err}"
    );
    ok(
        d,
        &["report", "r.yml", "out/report", "--overwrite", "--quiet"],
    );
    // never into an input model's folder
    let (code, err) = run_in(d, &["report", "r.yml", "instruct/rep"]);
    assert_eq!(code, 1);
    assert!(err.contains("instruct"), "{err}");
    assert!(!d.join("instruct/rep").exists());
    // task vectors need a base
    std::fs::write(d.join("nobase.yml"), "merge_method: linear\nmodels:\n- model: instruct\n  parameters: {weight: 1}\n- model: lang_eu\n  parameters: {weight: 1}\n").unwrap();
    let (code, err) = run_in(d, &["report", "nobase.yml", "rep"]);
    assert_eq!(code, 1);
    assert!(err.contains("base_model"), "{err}");
    // --sweep-out measures a sweep's points: refused for a recipe that sweeps nothing, and
    // for a folder whose index.json lists none of them
    let (code, err) = run_in(d, &["report", "r.yml", "rep", "--sweep-out", "out"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("sweeps nothing"), "{err}");
    let sweep = std::fs::read_to_string(d.join("r.yml")).unwrap().replacen(
        "weight: 1.0",
        "weight: {sweep: [0.5, 1.0]}",
        1,
    );
    std::fs::write(d.join("sweep.yml"), sweep).unwrap();
    let (code, err) = run_in(d, &["report", "sweep.yml", "rep", "--sweep-out", "out"]);
    assert_ne!(code, 0, "{err}");
    assert!(!d.join("rep/report.json").exists());
}

/// `run --report` computes the report from the merge's own reads (a sweep's points' distances
/// from the values the merge wrote): it reads nothing itself, and its figures are those
/// `report` computes reading every input (and, of a sweep, every point's checkpoint).
#[test]
fn run_report_reads_only_what_the_merge_did_not() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    let ta = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n- model: instruct\n  parameters: {weight: 1.0}\n- model: lang_eu\n  parameters: {weight: 0.7}\n";
    std::fs::write(d.join("ta.yml"), ta).unwrap();
    let sweep = ta.replacen("weight: 0.7", "weight: {sweep: [0.5, 1.0]}", 1);
    std::fs::write(d.join("sweep.yml"), sweep).unwrap();
    // (every recipe reads the same three models)
    let input = {
        let o = Command::new(env!("CARGO_BIN_EXE_shardmerge"))
            .current_dir(d)
            .args(["plan", "ta.yml", "--json"])
            .output()
            .unwrap();
        let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
        plan["bytes_input"].as_u64().unwrap()
    };
    // (recipe, merge flags)
    let small = ["--task-size", "64KiB"];
    let cases: [(&str, &[&str]); 6] = [
        ("r.yml", &[]),
        ("ta.yml", &[]),
        ("ta.yml", &small),
        ("r.yml", &small),
        ("sweep.yml", &[]),
        ("sweep.yml", &small),
    ];
    for (k, (recipe, flags)) in cases.into_iter().enumerate() {
        let out = format!("out{k}");
        let mut args = vec!["run", recipe, &out, "--report", "--quiet", "--workers", "2"];
        args.extend(flags);
        ok(d, &args);
        let rep = format!("rep{k}");
        let mut args = vec!["report", recipe, &rep, "--quiet"];
        if recipe == "sweep.yml" {
            args.extend(["--sweep-out", &out]);
        }
        ok(d, &args);
        let mut tapped = json(&d.join(&out).join("report/report.json"));
        let mut alone = json(&d.join(&rep).join("report.json"));
        assert!(alone["bytes_read"].as_u64().unwrap() >= input);
        assert_eq!(
            tapped["bytes_read"], 0,
            "{recipe} {flags:?}: the report read again"
        );
        tapped["bytes_read"] = Value::Null;
        alone["bytes_read"] = Value::Null;
        assert_eq!(tapped, alone, "{recipe} {flags:?}");
    }
}

/// Chromium: $SHARDMERGE_CHROMIUM, else `chromium` (Debian's) or `chromium-headless-shell`.
fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SHARDMERGE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-headless-shell"].map(|n| d.join(n)))
        .find(|p| p.is_file())
}

#[test]
fn the_page_renders_in_a_headless_browser_with_the_json_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report");
    ok(
        &repo(),
        &[
            "report",
            "examples/multilingual-ties.yml",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    // self-contained: nothing to fetch, no script
    for bad in ["http://", "https://", "<script", "<link", "src="] {
        let stripped = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        assert!(!stripped.contains(bad), "report.html holds {bad}");
    }
    browser_check(&out);
}

/// The page in `dir` opened in headless Chromium against its report.json (browser_check.py).
fn browser_check(dir: &Path) {
    let (Some(py), Some(chrome)) = (python_with("playwright"), chromium()) else {
        return missing("Playwright (PyPI) or Chromium (Debian's chromium)");
    };
    let o = Command::new(py)
        .arg(repo().join("coordinator/tests/report/browser_check.py"))
        .arg(dir)
        .arg(chrome)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{said}");
}

/// The worked example (examples/README.md): the 3 x 3 weight sweep of the Basque transfer
/// with its report.
#[test]
fn the_worked_example_sweeps_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("eu-sweep");
    let o = out.to_str().unwrap();
    ok(
        &repo(),
        &[
            "run",
            "examples/instruct-transfer-eu-sweep.yml",
            o,
            "--report",
            "--quiet",
        ],
    );
    let index = json(&out.join("index.json"));
    assert_eq!(index["points"].as_array().unwrap().len(), 9);
    ok(
        &repo(),
        &[
            "verify",
            &format!("{o}/instruct.weight=0.75,lang_eu.weight=1"),
        ],
    );
    let r = json(&out.join("report/report.json"));
    assert_eq!(r["points"].as_array().unwrap().len(), 9);
    assert_eq!(r["models"].as_array().unwrap().len(), 2);
    assert_eq!(r["densities"], serde_json::json!([]));
    assert!(r["total"]["cosine"][0].is_f64());
    // every point run is measured against the base, and the page plots it
    assert_eq!(r["distance_points"], r["points"]);
    assert_eq!(r["total"]["distance"].as_array().unwrap().len(), 9);
    let page = std::fs::read_to_string(out.join("report/report.html")).unwrap();
    assert!(page.contains("data-metric=\"distance_ratio\""));
    browser_check(&out.join("report"));
}
