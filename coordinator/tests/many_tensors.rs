//! Planning inputs with very many tensors stays linear. Finding each layer's tensors used to
//! scan every tensor name once per layer: 200k tiny tensors took 32 s and 1.1 GB to plan.
//! Here, 20,000 layers of one tensor each (400 million name scans the quadratic way, several
//! minutes in a debug build) must plan in a few seconds.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::writer;

use shardmerge::plan::{self, PlanOptions};
use shardmerge::recipe::Recipe;
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::format::safetensors::LayoutEntry;
use shardmerge_worker::storage::Resolver;

fn model(dir: &Path, layers: usize) {
    let mut entries: Vec<LayoutEntry> = (0..layers)
        .map(|l| writer::entry(&format!("model.layers.{l}.mlp.weight"), DType::F32, &[1]))
        .collect();
    entries.push(writer::entry("model.norm.weight", DType::F32, &[1]));
    writer::write_checkpoint(dir, &entries, None, &mut |_, _, out| out.fill(0)).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!("{{\"num_hidden_layers\": {layers}}}"),
    )
    .unwrap();
}

#[tokio::test]
async fn planning_twenty_thousand_layers_is_linear() {
    let t = tempfile::tempdir().unwrap();
    let layers = 20_000;
    model(&t.path().join("a"), layers);
    model(&t.path().join("b"), layers);
    let recipe = Recipe::parse(
        "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: 0.5\n- model: b\n  parameters:\n    weight: 0.5\n",
    )
    .unwrap();
    let start = Instant::now();
    let p = plan::plan(
        recipe,
        &Resolver::new(),
        t.path(),
        &PlanOptions {
            out_shard_size: plan::DEFAULT_SHARD_SIZE,
            seed: None,
            rng: shardmerge_proto::Rng::Mergekit,
            unsafe_truncate_embeddings: false,
            compute_float32: false,
            given: Default::default(),
        },
    )
    .await
    .unwrap();
    let took = start.elapsed();
    assert_eq!(p.tensors.len(), layers + 1);
    assert_eq!(p.out_layers, layers as u64);
    // linear: well under a second in release, a few seconds in debug on a loaded machine
    assert!(
        took < Duration::from_secs(20),
        "planning {} tensors took {took:?}",
        layers + 1
    );
    eprintln!("planned {} tensors in {took:?}", layers + 1);
}
