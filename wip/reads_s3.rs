//! Read once over S3: workers reach the S3 server through a counting TCP proxy, so every byte
//! they read from object storage is counted (the coordinator, which plans from headers, talks
//! to the server directly). Each statistics method reads each input byte at most 1.25 times,
//! at default flags and with tensors cut into statistics units, and the plan's, the job
//! status's and the proxy's figures agree within 1%.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shardmerge_tests::{generate_family, ok, shardmerge_bin, Cluster, S3Server};

/// A proxy on loopback in front of `target` (`host:port`); returns its URL and the count of
/// bytes the server sent back through it (response bodies and their headers).
fn counting_proxy(target: String) -> (String, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let url = format!("http://{}", l.local_addr().expect("proxy address"));
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let (Ok(mut c), Ok(mut s)) = (c, TcpStream::connect(&target)) else {
                continue;
            };
            let (Ok(mut c2), Ok(mut s2)) = (c.try_clone(), s.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
            let n = n2.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(k) = s2.read(&mut buf) {
                    if k == 0 || c2.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    n.fetch_add(k as u64, Ordering::SeqCst);
                }
                let _ = c2.shutdown(Shutdown::Write);
            });
        }
    });
    (url, n)
}

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
    let (proxy, counted) = counting_proxy(endpoint.trim_start_matches("http://").to_string());
    let mut cluster = Cluster::start(&bin, s3.env(), 10.0, 0);
    for (k, v) in cluster.env.iter_mut() {
        if k == "AWS_ENDPOINT_URL" {
            *v = proxy.clone();
        }
    }
    cluster.add_worker();
    cluster.add_worker();
    // default flags, then 8 MiB slots (projections cut into statistics units)
    for (layout, flags) in [
        ("default flags", &[][..]),
        ("cut", &["--memory-limit", "8MiB"][..]),
    ] {
        for (name, recipe) in RECIPES {
            let r = recipe.replace("M/", "s3://readonce/models/");
            std::fs::write(work.path().join("r.yml"), &r).expect("recipe");
            let out = format!("s3://readonce/out-{name}-{}", layout.len());
            let before = counted.load(Ordering::SeqCst);
            let args = [
                &[
                    "submit",
                    "r.yml",
                    &out,
                    "--wait",
                    "-q",
                    "--coordinator",
                    &cluster.url,
                ][..],
                flags,
            ]
            .concat();
            ok(&cluster.cli(work.path(), &args), &format!("submit {name}"));
            let read = counted.load(Ordering::SeqCst) - before;
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
            eprintln!("{name:17} {layout:14} proxy counted {read:9} B for {inputs:9} B of input ({ratio:.3}x), plan {planned:9} B");
            assert!(
                ratio <= 1.25,
                "{name} ({layout}): read {ratio:.2}x the input bytes"
            );
            let off = (planned as f64 - read as f64).abs() / read as f64;
            assert!(
                off <= 0.01,
                "{name} ({layout}): plan says {planned} B, the proxy counted {read} B"
            );
        }
    }
}

/// Bytes of a safetensors file past its header.
fn tensor_bytes(p: &Path) -> u64 {
    let bytes = std::fs::read(p).expect("model file");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    bytes.len() as u64 - 8 - n
}
