//! `run --report` from the merge's own reads: the workers hand the input rows their kernels are
//! given to a report tap, and the report reads only what the tap did not see. Whatever the
//! method, the cut (tensors whole, or cut into small tasks and statistics units) or the number
//! of points run together, its figures are those of a report that reads every input, and a
//! tensor the merge read whole (or, without trim densities, in any pieces) is not read again.

mod common;

use std::sync::Arc;

use common::*;
use shardmerge::embedded::{self, GridPoint, RunOptions};
use shardmerge::job::SubmitOptions;
use shardmerge::report::{self, Report, ReportOptions};
use shardmerge_worker::storage::Resolver;

const TA: &str = "merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters: {weight: 1.0}\n- model: models/lang_eu\n  parameters: {weight: 0.7}\n";
const TIES: &str = "merge_method: ties\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters: {weight: 1.0, density: 0.5}\n- model: models/lang_eu\n  parameters: {weight: 0.7, density: 0.5}\n- model: models/lang_ca\n  parameters: {weight: 0.7, density: 0.5}\n";
const DARE: &str = "merge_method: dare_linear\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters: {weight: 1.0, density: 0.3}\n- model: models/lang_eu\n  parameters: {weight: 1.0, density: 0.5}\n";
const STOCK: &str = "merge_method: model_stock\nbase_model: models/base\nmodels:\n- model: models/instruct\n- model: models/lang_eu\n- model: models/lang_ca\n";

/// Default flags (tensors whole) and small tasks and slots (cut into pieces and statistics
/// units): (task size, slot memory, name).
const LAYOUTS: [(u64, u64, &str); 2] = [(4 << 20, 512 << 20, "whole"), (4096, 64 << 10, "cut")];

fn options(task_size: u64, slot_memory: u64) -> ReportOptions {
    ReportOptions {
        submit: SubmitOptions {
            task_size,
            slot_memory,
            base_dir: golden(),
            ..Default::default()
        },
        workers: 2,
        points: Vec::new(),
    }
}

/// The merge of `recipes` (one, or the points of a grid) fed to a tap, then the report from
/// the tap and the report reading everything.
async fn both(recipes: &[&str], task_size: u64, slot_memory: u64) -> (Report, Report) {
    let resolver = Resolver::new();
    let mut o = options(task_size, slot_memory);
    let tap = Arc::new(report::tap_for(recipes[0], &o, &resolver).await.unwrap());
    let run = RunOptions {
        workers: 2,
        submit: o.submit.clone(),
        quiet: true,
        cache: Some(row_cache()),
        tap: Some(tap.clone()),
    };
    let tmp = tempfile::tempdir().unwrap();
    let outs: Vec<String> = (0..recipes.len())
        .map(|k| {
            tmp.path()
                .join(format!("out{k}"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    if let [recipe] = recipes {
        embedded::run(recipe, &outs[0], &run, resolver.clone())
            .await
            .unwrap();
    } else {
        let points: Vec<GridPoint<'_>> = recipes
            .iter()
            .zip(&outs)
            .map(|(recipe, out)| GridPoint { recipe, out })
            .collect();
        for r in embedded::run_grid(&points, &run, resolver.clone())
            .await
            .unwrap()
        {
            r.unwrap();
        }
    }
    if recipes.len() > 1 {
        // a grid's points measured against the base (as `run --report` of a sweep does)
        o.points = outs
            .iter()
            .enumerate()
            .map(|(k, out)| {
                (
                    format!("p{k}"),
                    resolver.resolve(out, &golden()).unwrap().uri(),
                )
            })
            .collect();
    }
    let at = resolver
        .resolve(&tmp.path().join("rep").to_string_lossy(), &golden())
        .unwrap();
    let tapped = report::compute(recipes[0], &at, &o, &resolver, Some(&tap))
        .await
        .unwrap();
    let alone = report::compute(recipes[0], &at, &o, &resolver, None)
        .await
        .unwrap();
    (tapped, alone)
}

/// The report's JSON without its bytes read.
fn figures(r: &Report) -> serde_json::Value {
    let mut v = report::to_json(r);
    v["bytes_read"] = serde_json::Value::Null;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tapped_report_is_the_report_and_reads_what_the_merge_did_not() {
    for (name, recipe) in [("ta", TA), ("ties", TIES), ("dare", DARE), ("stock", STOCK)] {
        for (task, slot, layout) in LAYOUTS {
            let (tapped, alone) = both(&[recipe], task, slot).await;
            assert_eq!(figures(&tapped), figures(&alone), "{name} {layout}");
            assert!(alone.bytes_read > 0);
            // read again: only tensors the report trims at a density (the recipe's) that the
            // merge read in pieces (its tasks' rows, or its statistics units)
            let again = recipe.contains("density") && layout == "cut";
            eprintln!(
                "{name} {layout}: the tapped report read {} B, alone {} B",
                tapped.bytes_read, alone.bytes_read
            );
            if again {
                assert!(tapped.bytes_read > 0, "{name} {layout}");
                assert!(tapped.bytes_read < alone.bytes_read, "{name} {layout}");
            } else {
                assert_eq!(tapped.bytes_read, 0, "{name} {layout}: read again");
            }
        }
    }
}

/// A grid's points (leased together, their rows read once) feed the tap as one merge does,
/// and each point's distance from the base is measured from the values it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_feeds_the_tap_as_its_points_run_together() {
    let grid = |recipe: &str, from: &str, to: &[&str]| -> Vec<String> {
        to.iter().map(|v| recipe.replacen(from, v, 1)).collect()
    };
    let grids = [
        (
            "ta",
            grid(
                TA,
                "weight: 0.7",
                &["weight: 0.3", "weight: 0.7", "weight: 1.1"],
            ),
        ),
        (
            "ties",
            grid(
                TIES,
                "weight: 1.0, density: 0.5",
                &["weight: 1.0, density: 0.3", "weight: 0.5, density: 0.5"],
            ),
        ),
    ];
    for (name, points) in &grids {
        let recipes: Vec<&str> = points.iter().map(String::as_str).collect();
        for (task, slot, layout) in LAYOUTS {
            let (tapped, alone) = both(&recipes, task, slot).await;
            assert_eq!(figures(&tapped), figures(&alone), "{name} {layout}");
            eprintln!(
                "grid {name} {layout}: the tapped report read {} B, alone {} B",
                tapped.bytes_read, alone.bytes_read
            );
            // (TIES cut into units: its tensors trimmed at densities are read again)
            if !(*name == "ties" && layout == "cut") {
                assert_eq!(tapped.bytes_read, 0, "{name} {layout}: read again");
            }
            assert_eq!(tapped.distance_points.len(), recipes.len());
            assert!(tapped.total.figures.distances.iter().all(|d| *d > 0.0));
        }
    }
}
