//! The commit of an `--overwrite` job, on real files: run again after an interruption (a
//! restarted coordinator resuming the job), it completes what is left, recognising a file the
//! interrupted commit already completed by its size and CRC-32C, and refusing a file at the
//! final name that holds other bytes (the old checkpoint's file of the same size).

mod common;

use bytes::Bytes;
use common::{golden, pb};
use shardmerge::commit::commit_checkpoint;
use shardmerge::plan::{self, PlanOptions};
use shardmerge::recipe::Recipe;
use shardmerge_worker::storage::{Location, Receipt, Resolver, Upload};

const TA: &str = "merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters:\n    weight: 1.0\n- model: models/lang_eu\n  parameters:\n    weight: 0.5\n";

/// Starts every output file of `plan` in `out` and writes it whole as one part of `fill`.
async fn written(plan: &plan::Plan, out: &Location, fill: u8) -> Vec<(Upload, Vec<Receipt>)> {
    let mut files = Vec::new();
    for f in &plan.files {
        let l = out.join(&f.name);
        let size = f.layout.total_size;
        let up = l.store.begin_upload(&l.path, size).await.unwrap();
        let data = Bytes::from(vec![fill; size as usize]);
        let r = l.store.write_part(&up, 0, 0, data).await.unwrap();
        files.push((up, vec![r]));
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_overwrite_commit_completes_when_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let resolver = Resolver::new();
    let opts = PlanOptions {
        out_shard_size: 300_000,
        seed: None,
        rng: pb::Rng::Mergekit,
        unsafe_truncate_embeddings: false,
        compute_float32: false,
        given: Default::default(),
    };
    let plan = plan::plan(Recipe::parse(TA).unwrap(), &resolver, &golden(), &opts)
        .await
        .unwrap();
    assert!(plan.files.len() >= 2);
    let dir = tmp.path().join("out");
    let out = resolver.resolve(dir.to_str().unwrap(), tmp.path()).unwrap();
    // the old checkpoint: files of the same names and sizes, other bytes, and a stale shard
    std::fs::create_dir_all(&dir).unwrap();
    for f in &plan.files {
        std::fs::write(dir.join(&f.name), vec![1u8; f.layout.total_size as usize]).unwrap();
    }
    std::fs::write(dir.join("model-00009-of-00009.safetensors"), b"old").unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), b"{}").unwrap();
    let files = written(&plan, &out, 0x5a).await;
    // the interrupted commit had completed the first file
    out.store
        .finish_upload(&files[0].0, &files[0].1)
        .await
        .unwrap();
    commit_checkpoint(&plan, &out, &files, true).await.unwrap();
    for f in &plan.files {
        let b = std::fs::read(dir.join(&f.name)).unwrap();
        assert!(
            b.iter().all(|&x| x == 0x5a),
            "{} is not the new file",
            f.name
        );
    }
    assert!(!dir.join("model-00009-of-00009.safetensors").exists());
    let idx = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    assert!(idx.contains("weight_map"), "{idx}");
    // a second overwrite whose first upload is gone while its final name holds other bytes of
    // the same size (here: the previous checkpoint's): refused, not taken as completed
    let files = written(&plan, &out, 0x33).await;
    out.store.abort_upload(&files[0].0).await.unwrap();
    let e = commit_checkpoint(&plan, &out, &files, true)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("completing"), "{e}");
    assert!(e.contains(&plan.files[0].name), "{e}");
}
