//! A multi-stage recipe submitted to a coordinator with S3 inputs and output: one job, its
//! earlier stage streamed (computed by the worker processes in the final job's tasks), the
//! final checkpoint byte-identical to the embedded run of the same file, and no intermediate
//! written next to OUT or anywhere else in the bucket.

use shardmerge_tests::{checkpoint_files, generate_family, is_checkpoint_file, ok, run_cli};
use shardmerge_tests::{shardmerge_bin, Cluster, S3Server};

const STAGES: &str = "name: mid
merge_method: ties
base_model: M/m0
models:
- model: M/m1
  parameters: {weight: 1.0, density: 0.5}
- model: M/m2
  parameters: {weight: 0.5, density: 0.5}
---
merge_method: task_arithmetic
base_model: M/m0
models:
- model: mid
  parameters: {weight: 1.0}
- model: M/m1
  parameters: {weight: 0.5}
";

#[test]
fn a_submitted_multi_stage_recipe_equals_the_embedded_run_and_leaves_no_intermediate() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    generate_family(&dir.join("M"), 3, 2, 256);
    s3.create_bucket("stages", true);
    let bucket = s3.bucket("stages");
    for m in ["m0", "m1", "m2"] {
        bucket.upload_dir(&dir.join("M").join(m), &format!("M/{m}"));
    }
    std::fs::write(dir.join("local.yml"), STAGES).expect("write");
    let remote = STAGES.replace("M/", &bucket.uri("M/"));
    std::fs::write(dir.join("s3.yml"), remote).expect("write");
    let cluster = Cluster::start(&bin, s3.env(), 10.0, 2);
    let args = [
        "submit",
        "s3.yml",
        &bucket.uri("out/final"),
        "--coordinator",
        &cluster.url,
        "--wait",
        "-q",
    ];
    let ids = ok(&cluster.cli(dir, &args), "shardmerge submit (stages)");
    assert_eq!(ids.lines().count(), 1, "one job for both stages: {ids}");
    ok(
        &run_cli(&bin, &s3.env(), dir, &["run", "local.yml", "local", "-q"]),
        "shardmerge run (stages)",
    );
    let want = checkpoint_files(&dir.join("local"));
    let got = bucket.output_objects("out/final");
    let got: Vec<(&String, &Vec<u8>)> = got.iter().filter(|(n, _)| is_checkpoint_file(n)).collect();
    assert_eq!(
        got.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (n, bytes) in got {
        assert!(*bytes == want[n], "{n} differs from the embedded run");
    }
    let left: Vec<String> = bucket
        .list("out")
        .into_iter()
        .filter(|k| !k.starts_with("final/"))
        .collect();
    assert!(left.is_empty(), "the intermediate was left: {left:?}");
}
