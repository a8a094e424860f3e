//! A sweep submitted to a coordinator with S3 inputs and output: one job per point into
//! `OUT/NAME`, each point's checkpoint byte-identical to the embedded run of its expanded recipe,
//! and the sweep's `index.json` written next to them.

use shardmerge_tests::{checkpoint_files, generate_family, is_checkpoint_file, ok, run_cli};
use shardmerge_tests::{shardmerge_bin, Cluster, S3Server};

const GRID: &str = "merge_method: ties
base_model: M/m0
models:
- model: M/m1
  parameters: {weight: 1.0, density: {sweep: [0.3, 0.7]}}
- model: M/m2
  parameters: {weight: 0.5, density: 0.5}
";

#[test]
fn a_submitted_sweep_writes_every_point_and_its_index() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    generate_family(&dir.join("M"), 3, 2, 256);
    s3.create_bucket("sweep", true);
    let bucket = s3.bucket("sweep");
    for m in ["m0", "m1", "m2"] {
        bucket.upload_dir(&dir.join("M").join(m), &format!("M/{m}"));
    }
    std::fs::write(dir.join("local.yml"), GRID).expect("write");
    std::fs::write(dir.join("s3.yml"), GRID.replace("M/", &bucket.uri("M/"))).expect("write");
    let cluster = Cluster::start(&bin, s3.env(), 10.0, 2);
    let args = [
        "submit",
        "s3.yml",
        &bucket.uri("grid"),
        "--coordinator",
        &cluster.url,
        "--wait",
        "-q",
    ];
    let ids = ok(&cluster.cli(dir, &args), "shardmerge submit (sweep)");
    assert_eq!(ids.lines().count(), 2, "one job per point: {ids}");
    // the embedded reference: the local sweep, point by point
    ok(
        &run_cli(&bin, &s3.env(), dir, &["run", "local.yml", "local", "-q"]),
        "shardmerge run (sweep)",
    );
    for name in ["m1.density=0.3", "m1.density=0.7"] {
        let want = checkpoint_files(&dir.join("local").join(name));
        let got = bucket.output_objects(&format!("grid/{name}"));
        let got: Vec<(&String, &Vec<u8>)> =
            got.iter().filter(|(n, _)| is_checkpoint_file(n)).collect();
        assert_eq!(
            got.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}: other files than the embedded run's"
        );
        for (n, bytes) in got {
            assert!(
                *bytes == want[n],
                "{name}/{n} differs from the embedded run"
            );
        }
    }
    let index = bucket.get("grid/index.json").expect("grid/index.json");
    let index: serde_json::Value = serde_json::from_slice(&index).expect("index.json");
    let names: Vec<&str> = index["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["m1.density=0.3", "m1.density=0.7"]);
}
