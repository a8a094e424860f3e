//! The conformance suite every merge method runs: for each of mergekit's golden cases, the
//! merge matches mergekit within the golden tolerances, and the output bytes are identical
//! between one worker with whole tensors and three workers with 4 KiB tasks (tensors cut into
//! many row ranges, statistics reduced across them).

mod common;

use common::*;

const BIG: u64 = 64 << 20;

async fn case(name: &str, kind: &str) {
    let g = golden();
    let recipe = std::fs::read_to_string(g.join("cases").join(name).join("config.yml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    run(&recipe, &g, &whole, 1, BIG, 512 << 20).await.unwrap();
    let bad = compare(
        &whole,
        &g.join("cases").join(name).join("expected"),
        &g.join("models/base"),
        kind,
    );
    assert!(
        bad.is_empty(),
        "{name}: {} tensors differ from mergekit:\n{}",
        bad.len(),
        bad.join("\n")
    );
    if kind == "stat" {
        // with mergekit's draws (the default) the randomised cases match mergekit's masks,
        // so they hold to the deterministic cases' tolerance too
        let bad = compare(
            &whole,
            &g.join("cases").join(name).join("expected"),
            &g.join("models/base"),
            "exact",
        );
        assert!(
            bad.is_empty(),
            "{name}: mergekit's draws should give mergekit's values:\n{}",
            bad.join("\n")
        );
    }
    if BIT_EXACT.contains(&name) {
        let (ours, theirs) = (
            load(&whole),
            load(&g.join("cases").join(name).join("expected")),
        );
        let differ: Vec<&String> = theirs
            .iter()
            .filter(|(n, t)| ours.get(*n).map(|o| &o.raw) != Some(&t.raw))
            .map(|(n, _)| n)
            .collect();
        assert!(
            differ.is_empty(),
            "{name}: mergekit's output bit for bit expected; differs in {differ:?}"
        );
    }
    let cut = tmp.path().join("cut");
    run(&recipe, &g, &cut, 3, 4096, 64 << 10).await.unwrap();
    assert_eq!(
        file_bytes(&whole),
        file_bytes(&cut),
        "{name}: output depends on the task layout"
    );
}

/// Cases whose every output byte equals mergekit's (deterministic arithmetic in the same order
/// as torch's). The others differ from mergekit in the last bits of some elements, within the
/// tolerances: torch reduces whole tensors (norms, dot products, L1 sums) in a blocked,
/// multi-threaded order of its own (docs/methods.md).
const BIT_EXACT: &[&str] = &[
    "linear_soup",
    "task_arithmetic_instruct_transfer",
    "task_arithmetic_lambda_bf16",
    "ties_multilingual",
    "breadcrumbs",
    "breadcrumbs_ties",
    "ram",
    "passthrough_frankenmerge",
    "nearswap",
];

macro_rules! cases {
    ($($name:ident: $kind:literal),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                case(stringify!($name), $kind).await;
            }
        )*
        const LISTED: &[&str] = &[$(stringify!($name)),*];
    };
}

cases! {
    linear_soup: "exact",
    task_arithmetic_instruct_transfer: "exact",
    task_arithmetic_lambda_bf16: "exact",
    ties_multilingual: "exact",
    breadcrumbs_ties: "exact",
    breadcrumbs: "exact",
    slerp_gradient: "exact",
    nuslerp_task_vectors: "exact",
    nuslerp_rowwise: "exact",
    multislerp: "exact",
    karcher: "exact",
    model_stock: "exact",
    sce: "exact",
    nearswap: "exact",
    ram: "exact",
    passthrough_frankenmerge: "exact",
    dare_ties: "stat",
    dare_linear: "stat",
    della: "stat",
}

/// The counter-based generator (`--rng counter`) draws other masks than mergekit: the
/// randomised cases stay within sampling noise of mergekit's, and bytes do not depend on the
/// task layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_rng_is_close_to_mergekit_and_split_invariant() {
    let g = golden();
    for name in ["dare_ties", "dare_linear", "della"] {
        let recipe =
            std::fs::read_to_string(g.join("cases").join(name).join("config.yml")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (whole, cut, default) = (
            tmp.path().join("whole"),
            tmp.path().join("cut"),
            tmp.path().join("default"),
        );
        let counter = pb::Rng::Counter;
        run_with(&recipe, &g, &whole, 1, BIG, 512 << 20, counter)
            .await
            .unwrap();
        let bad = compare(
            &whole,
            &g.join("cases").join(name).join("expected"),
            &g.join("models/base"),
            "stat-band",
        );
        assert!(bad.is_empty(), "{name}:\n{}", bad.join("\n"));
        run_with(&recipe, &g, &cut, 3, 4096, 64 << 10, counter)
            .await
            .unwrap();
        assert_eq!(file_bytes(&whole), file_bytes(&cut), "{name}");
        run(&recipe, &g, &default, 1, BIG, 512 << 20).await.unwrap();
        assert_ne!(
            file_bytes(&whole),
            file_bytes(&default),
            "{name}: --rng counter should draw differently from mergekit"
        );
    }
}

#[test]
fn every_golden_case_is_listed() {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden().join("cases.json")).unwrap()).unwrap();
    let mut want: Vec<String> = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["case"].as_str().unwrap().to_string())
        .collect();
    want.sort();
    let mut have: Vec<String> = LISTED.iter().map(|s| s.to_string()).collect();
    have.sort();
    assert_eq!(want, have);
}

/// The grid's run of `recipe` as every point of a 3-point grid (`embedded::run_grid`: the
/// points' tasks leased together, their rows read once) into `outs`.
async fn grid(recipe: &str, outs: &[std::path::PathBuf], workers: usize, task: u64, slot: u64) {
    use shardmerge::embedded::{self, GridPoint, RunOptions};
    let o = RunOptions {
        workers,
        submit: shardmerge::job::SubmitOptions {
            task_size: task,
            slot_memory: slot,
            base_dir: golden(),
            ..Default::default()
        },
        quiet: true,
        cache: Some(row_cache()),
        tap: None,
    };
    let outs: Vec<String> = outs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let points: Vec<GridPoint<'_>> = outs.iter().map(|out| GridPoint { recipe, out }).collect();
    let r = embedded::run_grid(&points, &o, shardmerge_worker::storage::Resolver::new())
        .await
        .unwrap();
    for p in r {
        p.unwrap();
    }
}

/// Sweep outputs in the parity and split-invariance suites: every golden case run as each of
/// the points of a grid (their rows read once for all of them) writes, point by point, the
/// bytes of its single run (which the cases above check against mergekit), with whole tensors
/// on one worker and with 4 KiB tasks on three (tensors cut into row ranges and statistics
/// units, whose passes are shared too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_as_points_of_a_grid_is_its_single_run() {
    let g = golden();
    for name in LISTED {
        let recipe =
            std::fs::read_to_string(g.join("cases").join(name).join("config.yml")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let single = tmp.path().join("single");
        run(&recipe, &g, &single, 1, BIG, 512 << 20).await.unwrap();
        let want = file_bytes(&single);
        for (layout, workers, task, slot) in [
            ("whole", 1, BIG, 3 * (512 << 20)),
            ("cut", 3, 4096, 3 * (64 << 10)),
        ] {
            let outs: Vec<_> = (0..3)
                .map(|k| tmp.path().join(format!("{layout}{k}")))
                .collect();
            grid(&recipe, &outs, workers, task, slot).await;
            for o in &outs {
                assert!(
                    file_bytes(o) == want,
                    "{name}: a point of the grid ({layout}) differs from the single run"
                );
            }
        }
    }
}
