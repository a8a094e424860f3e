//! Read once over S3: workers reach the S3 server through a counting TCP proxy, so every byte
//! they read from object storage is counted (the coordinator, which plans from headers, talks
//! to the server directly). At default flags each method reads each input byte at most 1.25
//! times, and the plan's, the job status's and the proxy's figures agree within 1%; so does the
//! coordinator's Prometheus figure (`shardmerge_job_read_bytes`) summed over all the jobs. The
//! status's reads by input (each model's prefix) add up to its total and, at default flags,
//! each is the plan's figure for that input within 1%; the metric by input
//! (`shardmerge_job_input_read_bytes{input=...}`) adds up to the same total.
//!
//! With tensors cut into statistics units (`--memory-limit 8MiB`) the job status still agrees
//! with the proxy, but a write task (at least 5 MiB, S3's smallest part) that spans the ranges
//! of two units homed on different workers reads one of them again: TIES measured 1.28x here,
//! which the plan (one worker) does not foresee. Bounded at 1.5x so that it cannot grow.

use std::path::Path;

use shardmerge_tests::proxy::Proxy;
use shardmerge_tests::{
    free_port, generate_family, http_get, ok, shardmerge_bin, Cluster, S3Server,
};

const RECIPES: &[(&str, &str)] = &[
    ("task_arithmetic", "merge_method: task_arithmetic\nbase_model: M/m0\nmodels:\n- model: M/m1\n  parameters: {weight: 1.0}\n- model: M/m2\n  parameters: {weight: 0.7}\n"),
    ("ties", "merge_method: ties\nbase_model: M/m0\nmodels:\n- model: M/m1\n  parameters: {weight: 1.0, density: 0.5}\n- model: M/m2\n  parameters: {weight: 0.7, density: 0.5}\n"),
    ("dare_ties", "merge_method: dare_ties\nbase_model: M/m0\nmodels:\n- model: M/m1\n  parameters: {weight: 1.0, density: 0.3}\n- model: M/m2\n  parameters: {weight: 1.0, density: 0.5}\n"),
    ("della", "merge_method: della\nbase_model: M/m0\nmodels:\n- model: M/m1\n  parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\n- model: M/m2\n  parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\n"),
    ("breadcrumbs_ties", "merge_method: breadcrumbs_ties\nbase_model: M/m0\nmodels:\n- model: M/m1\n  parameters: {weight: 1.0, density: 0.8, gamma: 0.02}\n- model: M/m2\n  parameters: {weight: 1.0, density: 0.7, gamma: 0.05}\n"),
    ("model_stock", "merge_method: model_stock\nbase_model: M/m0\nmodels:\n- model: M/m1\n- model: M/m2\n"),
    ("slerp", "merge_method: slerp\nbase_model: M/m1\nmodels:\n- model: M/m1\n- model: M/m2\nparameters: {t: 0.4}\n"),
];

/// A number from `plan --json`'s output.
fn json_u64(text: &str, key: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(text).expect("plan --json");
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {text}"))
}

#[test]
fn every_method_reads_each_input_byte_once_over_s3() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let models = work.path().join("models");
    // 3 models of 2 layers of 1024x1024 f32 projections: 32 MiB each
    generate_family(&models, 3, 2, 1024);
    s3.create_bucket("readonce", true);
    let b = s3.bucket("readonce");
    for m in ["m0", "m1", "m2"] {
        b.upload_dir(&models.join(m), &format!("models/{m}"));
    }
    let inputs: u64 = (0..3)
        .map(|i| tensor_bytes(&models.join(format!("m{i}/model.safetensors"))))
        .sum();
    let endpoint = s3
        .env()
        .into_iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .map(|(_, v)| v)
        .expect("endpoint");
    let proxy = Proxy::start(endpoint.trim_start_matches("http://"));
    let metrics = free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let mut cluster = Cluster::start_with(&bin, s3.env(), 10.0, 0, &["--metrics-listen", &listen]);
    for (k, v) in cluster.env.iter_mut() {
        if k == "AWS_ENDPOINT_URL" {
            *v = proxy.url();
        }
    }
    cluster.add_worker();
    cluster.add_worker();
    let (mut all_read, mut all_reported) = (0u64, 0u64);
    // default flags, then 8 MiB slots (projections cut into statistics units)
    for (layout, flags) in [
        ("default flags", &[][..]),
        ("cut", &["--memory-limit", "8MiB"][..]),
    ] {
        for (name, recipe) in RECIPES {
            let r = recipe.replace("M/", "s3://readonce/models/");
            std::fs::write(work.path().join("r.yml"), &r).expect("recipe");
            let out = format!("s3://readonce/out-{name}-{}", layout.len());
            let before = proxy.bytes_from_target();
            let args = [
                &[
                    "submit",
                    "r.yml",
                    &out,
                    "--wait",
                    "--coordinator",
                    &cluster.url,
                ][..],
                flags,
            ]
            .concat();
            let id = ok(&cluster.cli(work.path(), &args), &format!("submit {name}"));
            let read = proxy.bytes_from_target() - before;
            let status = cluster.job(id.trim());
            let reported = status.bytes_read;
            let by_input: u64 = status.inputs.iter().map(|i| i.bytes_read).sum();
            assert_eq!(
                by_input, reported,
                "{name} ({layout}): reads by input {:?}",
                status.inputs
            );
            for i in status.inputs.iter().filter(|_| flags.is_empty()) {
                let off = (i.bytes_read as f64 - i.bytes_read_total as f64).abs()
                    / (i.bytes_read_total as f64).max(1.0);
                assert!(
                    off <= 0.01 && i.input.starts_with("s3://readonce/models/"),
                    "{name} ({layout}): {} read {} B, planned {} B",
                    i.input,
                    i.bytes_read,
                    i.bytes_read_total
                );
            }
            all_read += read;
            all_reported += reported;
            let plan_mem = if flags.is_empty() { "512MiB" } else { "8MiB" };
            let plan = ok(
                &cluster.cli(
                    work.path(),
                    &[
                        "plan",
                        "r.yml",
                        "--json",
                        "--workers",
                        "1",
                        "--memory-limit",
                        plan_mem,
                    ],
                ),
                "plan",
            );
            let planned = json_u64(&plan, "bytes_read");
            let ratio = read as f64 / inputs as f64;
            eprintln!("{name:17} {layout:14} proxy counted {read:9} B for {inputs:9} B of input ({ratio:.3}x), status {reported:9} B, plan {planned:9} B");
            let off = |x: u64| (x as f64 - read as f64).abs() / read as f64;
            assert!(
                off(reported) <= 0.01,
                "{name} ({layout}): the job status says {reported} B read, the proxy counted {read} B"
            );
            if flags.is_empty() {
                assert!(
                    ratio <= 1.25,
                    "{name} ({layout}): read {ratio:.2}x the input bytes"
                );
                assert!(
                    off(planned) <= 0.01,
                    "{name} ({layout}): plan says {planned} B, the proxy counted {read} B"
                );
            } else {
                assert!(
                    ratio <= 1.5,
                    "{name} ({layout}): read {ratio:.2}x the input bytes"
                );
            }
        }
    }
    let (code, page) = http_get(metrics, "/metrics");
    assert_eq!(code, 200, "{page}");
    let exported: u64 = page
        .lines()
        .find_map(|l| l.strip_prefix("shardmerge_job_read_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shardmerge_job_read_bytes in {page}"));
    assert_eq!(
        exported, all_reported,
        "the metric is the jobs' statuses summed"
    );
    let by_input: u64 = page
        .lines()
        .filter(|l| l.starts_with("shardmerge_job_input_read_bytes{"))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        })
        .sum();
    assert_eq!(
        by_input, all_reported,
        "the metric by input adds up: {page}"
    );
    let off = (exported as f64 - all_read as f64).abs() / all_read as f64;
    assert!(
        off <= 0.01,
        "shardmerge_job_read_bytes says {exported} B, the proxy counted {all_read} B"
    );
}

/// Bytes of a safetensors file past its header.
fn tensor_bytes(p: &Path) -> u64 {
    let bytes = std::fs::read(p).expect("model file");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    bytes.len() as u64 - 8 - n
}
