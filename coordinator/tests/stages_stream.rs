//! Multi-stage recipes run as one job, the earlier stages streamed (computed in the final
//! job's tasks, never written): the output byte-identical to running the stages one by one
//! with the intermediate written, for any task size and number of workers, nothing written in
//! the scratch folder, and a statistics stage too large to compute whole in a slot written as
//! an intermediate instead, `plan` saying why.

mod common;

use std::path::Path;

use common::family::{write_model, FamilySpec};
use common::file_bytes;
use common::shardmerge_in as run_in;
use shardmerge_worker::format::dtype::DType;

fn ok(dir: &Path, args: &[&str]) -> (String, String) {
    let (code, out, err) = run_in(dir, args);
    assert_eq!(code, 0, "shardmerge {args:?}: {err}");
    (out, err)
}

/// The data files (safetensors and index) of a checkpoint.
fn data(dir: &Path) -> Vec<(String, Vec<u8>)> {
    file_bytes(dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors") || n.ends_with("index.json"))
        .collect()
}

/// `6.8 MiB` in MiB.
fn mib(s: &str) -> f64 {
    let (v, unit) = s.split_once(' ').unwrap();
    let scale = match unit {
        "KiB" => 1.0 / 1024.0,
        "MiB" => 1.0,
        _ => panic!("unit {unit}"),
    };
    v.parse::<f64>().unwrap() * scale
}

/// A linear stage (float16, so its rounding shows) then TIES over it: the statistics method
/// in the final stage, the elementwise one streamed into it.
const LINEAR_THEN_TIES: &str = "name: mix
merge_method: linear
models:
  - model: lang_eu
    parameters: {weight: 0.6}
  - model: lang_ca
    parameters: {weight: 0.4}
dtype: float16
---
merge_method: ties
base_model: base
models:
  - model: mix
    parameters: {weight: 1.0, density: 0.5}
  - model: instruct
    parameters: {weight: 0.8, density: 0.7}
parameters: {normalize: true}
dtype: bfloat16
";

/// Runs `text`'s two stages one by one in `dir` (the first written to `dir/first`) into
/// `dir/manual`.
fn stage_by_stage(dir: &Path, text: &str, name: &str) -> Vec<(String, Vec<u8>)> {
    let first = dir.join("first");
    let parts: Vec<&str> = text.split("\n---\n").collect();
    let one: String = parts[0]
        .lines()
        .filter(|l| !l.starts_with("name:"))
        .collect::<Vec<_>>()
        .join("\n");
    let two = parts[1].replace(
        &format!("model: {name}\n"),
        &format!("model: {}\n", first.display()),
    );
    for (k, (part, out)) in [(one, &first), (two, &dir.join("manual"))]
        .iter()
        .enumerate()
    {
        let f = dir.join(format!("stage{k}.yml"));
        std::fs::write(&f, part).unwrap();
        ok(
            dir,
            &["run", "-q", f.to_str().unwrap(), out.to_str().unwrap()],
        );
    }
    data(&dir.join("manual"))
}

#[test]
fn an_elementwise_stage_streams_into_a_statistics_stage_for_any_cut_and_workers() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    wide_family(d);
    let want = stage_by_stage(d, LINEAR_THEN_TIES, "mix");
    std::fs::write(d.join("s.yml"), LINEAR_THEN_TIES).unwrap();
    // small tasks, and slots too small for a TIES tensor whole: its statistics run over row
    // ranges of rows computed from the linear stage's
    for (workers, limit) in [("1", "4MiB"), ("3", "12MiB")] {
        let opts = [
            "--task-size",
            "4KiB",
            "--workers",
            workers,
            "--memory-limit",
            limit,
        ];
        let (plan, _) = ok(d, &[&["plan", "s.yml"][..], &opts[..]].concat());
        assert!(plan.contains("stage `mix`: linear, streamed"), "{plan}");
        let line = plan.lines().rev().find(|l| l.starts_with("tasks")).unwrap();
        let n: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert!(
            n[0] > 100 && n[1] > 0,
            "not cut into many tasks and ranges: {line}"
        );
        let scratch = d.join(format!("scratch{workers}"));
        std::fs::create_dir(&scratch).unwrap();
        let out = format!("out{workers}");
        let s = scratch.to_str().unwrap();
        let (_, err) = ok(
            d,
            &[&["run", "s.yml", &out, "--scratch", s][..], &opts[..]].concat(),
        );
        assert!(
            err.contains("stage `mix`: streamed into the final stage's job (not written)"),
            "{err}"
        );
        // the plan counts a streamed stage's rows computed again for each statistics pass of
        // the final stage (a unit may need fewer passes than planned)
        let line = err.lines().find(|l| l.starts_with("read ")).unwrap();
        let (got, rest) = line["read ".len()..]
            .split_once(" from storage (planned ")
            .unwrap();
        let planned = rest.split(')').next().unwrap();
        assert!(mib(got) <= mib(planned) && mib(got) > 5.3, "{line}");
        let written = std::fs::read_dir(&scratch).unwrap().count();
        assert_eq!(written, 0, "something written in {scratch:?}");
        assert_eq!(
            data(&d.join(&out)),
            want,
            "{workers} worker(s): not the stage-by-stage bytes"
        );
    }
    // nothing but the outputs, the models and the stage-by-stage run's folders was written
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".yml"))
        .collect();
    names.sort();
    let want_names = [
        "base", "first", "instruct", "lang_ca", "lang_eu", "manual", "out1", "out3", "scratch1",
        "scratch3",
    ];
    assert_eq!(names, want_names);
}

/// Four models of the suites' Llama-layout family, wide enough that a TIES tensor computed
/// whole does not fit a small slot.
fn wide_family(dir: &Path) {
    let spec = FamilySpec {
        hidden: 256,
        intermediate: 512,
        layers: 1,
        heads: 4,
        kv_heads: 4,
        vocab: 64,
        dtype: DType::BF16,
        seed: 3,
        rms_norm_eps: 1e-5,
    };
    for m in ["base", "instruct", "lang_eu", "lang_ca"] {
        write_model(&spec, m, 64, &dir.join(m), None, 1).unwrap();
    }
}

const TIES_THEN_SUM: &str = "name: langs
merge_method: ties
base_model: base
models:
  - model: lang_eu
    parameters: {weight: 1.0, density: 0.5}
  - model: lang_ca
    parameters: {weight: 1.0, density: 0.5}
dtype: bfloat16
---
merge_method: task_arithmetic
base_model: base
models:
  - model: langs
    parameters: {weight: 1.0}
  - model: instruct
    parameters: {weight: 1.0}
dtype: bfloat16
";

#[test]
fn a_statistics_stage_too_large_for_a_slot_is_written_and_plan_says_why() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    wide_family(d);
    std::fs::write(d.join("s.yml"), TIES_THEN_SUM).unwrap();
    let small = ["--memory-limit", "8MiB", "--workers", "2"];
    let (plan, _) = ok(d, &[&["plan", "s.yml"][..], &small[..]].concat());
    assert!(
        plan.contains("stage `langs`: ties, intermediate -> a scratch folder, removed at the end (written: tensor "),
        "{plan}"
    );
    assert!(plan.contains("more than a worker slot's"), "{plan}");
    let (plan, _) = ok(d, &["plan", "s.yml"]);
    assert!(plan.contains("stage `langs`: ties, streamed"), "{plan}");
    // both ways, the same bytes as the stages run one by one
    let scratch = d.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let s = scratch.to_str().unwrap();
    let (_, err) = ok(
        d,
        &[&["run", "s.yml", "written", "--scratch", s][..], &small[..]].concat(),
    );
    assert!(err.contains("stage 1/2: stage `langs` -> "), "{err}");
    let (_, err) = ok(d, &["run", "s.yml", "streamed", "--scratch", s]);
    assert!(err.contains("streamed into the final stage's job"), "{err}");
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    let want = stage_by_stage(d, TIES_THEN_SUM, "langs");
    assert_eq!(data(&d.join("written")), want);
    assert_eq!(data(&d.join("streamed")), want);
}
