//! Sweeps through the `shardmerge` binary: a grid of weights, densities and methods run into
//! one folder per point, each point's checkpoint byte-identical to running its expanded recipe
//! alone (DARE points draw the masks of their single runs), `index.json` listing the points,
//! `--points` picking a subset and adding it to an existing sweep folder, and `plan` listing
//! the points with what each reads and writes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::golden;

use common::shardmerge_in as run_in;

fn ok(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = run_in(dir, args);
    assert_eq!(code, 0, "shardmerge {args:?}: {err}");
    out
}

/// The files of a checkpoint folder that hold its bytes.
fn checkpoint(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".safetensors") || n.ends_with(".json")
        })
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn models(dir: &Path) {
    for m in ["base", "instruct", "lang_eu"] {
        let d = dir.join("models").join(m);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(golden().join("models").join(m).join(f), d.join(f)).unwrap();
        }
    }
}

const GRID: &str = "sweep_methods: [ties, dare_ties]
base_model: models/base
random_seed: 7
parameters:
  density: {sweep: [0.3, 0.7]}
models:
- model: models/instruct
  parameters: {weight: 1.0}
- model: models/lang_eu
  parameters:
    weight: {sweep: [0.5, 1.0]}
";

#[test]
fn every_point_is_exactly_its_own_merge() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    models(dir);
    std::fs::write(dir.join("grid.yml"), GRID).unwrap();
    ok(
        dir,
        &["run", "grid.yml", "out", "-q", "--task-size", "4KiB"],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/index.json")).unwrap()).unwrap();
    let points = index["points"].as_array().unwrap();
    assert_eq!(points.len(), 8, "{index}");
    assert_eq!(
        points[0]["name"],
        "method=ties,density=0.3,lang_eu.weight=0.5"
    );
    for p in points {
        let name = p["name"].as_str().unwrap();
        let recipe = p["recipe"].as_str().unwrap();
        assert!(!recipe.contains("sweep"), "{recipe}");
        // the point's expanded recipe run alone, with other task sizes
        let alone = dir.join("alone.yml");
        std::fs::write(&alone, recipe).unwrap();
        let single = dir.join(format!("single-{name}"));
        ok(dir, &["run", "alone.yml", single.to_str().unwrap(), "-q"]);
        let got = checkpoint(&dir.join("out").join(name));
        let want = checkpoint(&single);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (f, bytes) in &want {
            if f.ends_with(".safetensors") {
                assert!(
                    got[f] == *bytes,
                    "{name}/{f} differs from the point run alone"
                );
            }
        }
        // the model card holds the point's own recipe
        let card = std::fs::read_to_string(dir.join("out").join(name).join("README.md")).unwrap();
        assert!(
            card.contains(recipe.trim()),
            "{name}: model card lacks its recipe"
        );
    }
}

#[test]
fn points_are_picked_added_and_planned() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    models(dir);
    std::fs::write(dir.join("grid.yml"), GRID).unwrap();
    let plan = ok(dir, &["plan", "grid.yml"]);
    assert!(plan.contains("8 point(s) of 8"), "{plan}");
    assert!(
        plan.contains("point        method=dare_ties,density=0.7,lang_eu.weight=1/"),
        "{plan}"
    );
    assert!(plan.contains("total        8 merges"), "{plan}");
    let json = ok(
        dir,
        &["plan", "grid.yml", "--json", "--points", "method=ties"],
    );
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["plans"].as_array().unwrap().len(), 4);
    let read: u64 = j["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plan"]["bytes_read"].as_u64().unwrap())
        .sum();
    assert_eq!(j["bytes_read"].as_u64(), Some(read));

    ok(
        dir,
        &[
            "run",
            "grid.yml",
            "out",
            "-q",
            "--points",
            "method=ties,density=0.3,lang_eu.weight=1.0",
        ],
    );
    ok(
        dir,
        &[
            "run",
            "grid.yml",
            "out",
            "-q",
            "--points",
            "method=dare_ties,lang_eu.weight=0.5,density=0.3",
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/index.json")).unwrap()).unwrap();
    let names: Vec<&str> = index["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "method=ties,density=0.3,lang_eu.weight=1",
            "method=dare_ties,density=0.3,lang_eu.weight=0.5"
        ]
    );
    // a point already there is not overwritten without --overwrite
    let (code, _, err) = run_in(
        dir,
        &[
            "run",
            "grid.yml",
            "out",
            "-q",
            "--points",
            "method=ties,density=0.3,lang_eu.weight=1",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("already holds") && err.contains("--overwrite"),
        "{err}"
    );
    // nor an index.json that is not a sweep's
    std::fs::create_dir_all(dir.join("mine")).unwrap();
    std::fs::write(dir.join("mine/index.json"), "{\"mine\": true}").unwrap();
    let (code, _, err) = run_in(dir, &["run", "grid.yml", "mine", "-q"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a shardmerge sweep index"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("mine/index.json")).unwrap(),
        "{\"mine\": true}"
    );
    // unknown labels and values say what there is
    let (code, _, err) = run_in(dir, &["run", "grid.yml", "x", "-q", "--points", "weight=1"]);
    assert_eq!(code, 1);
    assert!(err.contains("lang_eu.weight"), "{err}");
    let (code, _, err) = run_in(
        dir,
        &["run", "grid.yml", "x", "-q", "--points", "density=0.4"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("no point matches"), "{err}");
}
