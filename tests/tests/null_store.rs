//! The benchmark-only `null://` store (worker/src/storage/null.rs) tells the truth about what it
//! discards: each output file's size and CRC-32C it logs equal those of the same merge written
//! to local files, embedded and through a coordinator with two workers.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use shardmerge_tests::{generate_family, ok, run_cli, shardmerge_bin, Cluster};

const RECIPE: &str = "merge_method: ties\nbase_model: m0\ndtype: float32\nmodels:\n\
    - model: m1\n  parameters: {density: 0.5, weight: 0.7}\n\
    - model: m2\n  parameters: {density: 0.3, weight: 0.5}\n";

/// Each `.safetensors` file of `dir` and its (size, CRC-32C).
fn real_sums(dir: &Path) -> BTreeMap<String, (u64, u32)> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            let b = std::fs::read(e.path()).expect("read");
            m.insert(name, (b.len() as u64, crc32c::crc32c(&b)));
        }
    }
    m
}

/// The files a null store's log says it discarded under `prefix`: name -> (size, CRC-32C).
fn logged_sums(log: &str, prefix: &str) -> BTreeMap<String, (u64, u32)> {
    let mut m = BTreeMap::new();
    for line in log.lines() {
        let Some(at) = line.find(prefix) else {
            continue;
        };
        let rest = &line[at + prefix.len()..];
        let Some((name, said)) = rest.split_once(": discarded ") else {
            continue;
        };
        let size: u64 = said
            .split(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .expect(line);
        let crc = said.rsplit(' ').next().expect(line);
        let crc = u32::from_str_radix(crc.trim(), 16).expect(line);
        assert!(m.insert(name.to_string(), (size, crc)).is_none(), "{log}");
    }
    m
}

/// Three models (12 MiB of f32 each) and the TIES recipe, with a real run's output in `out`.
fn family_and_real_run(w: &Path) -> BTreeMap<String, (u64, u32)> {
    let bin = shardmerge_bin!();
    generate_family(w, 3, 3, 512);
    std::fs::write(w.join("r.yml"), RECIPE).expect("recipe");
    let args = ["run", "r.yml", "out", "-q", "--out-shard-size", "4MiB"];
    ok(&run_cli(&bin, &[], w, &args), "real run");
    let real = real_sums(&w.join("out"));
    assert!(real.len() >= 2, "expected a sharded output: {real:?}");
    real
}

#[test]
fn embedded_null_run_reports_the_real_runs_sizes_and_checksums() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let real = family_and_real_run(w);
    let o = Command::new(shardmerge_bin!())
        .args([
            "run",
            "r.yml",
            "null://bench/out",
            "--out-shard-size",
            "4MiB",
        ])
        .current_dir(w)
        .env("RUST_LOG", "warn,shardmerge_worker::storage::null=info")
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let log = ok(&o, "null run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("benchmark-only"), "no warning: {err}");
    assert_eq!(logged_sums(&err, "null://bench/out/"), real, "{log}{err}");
    assert!(!w.join("null:").exists() && !w.join("bench").exists());
}

#[test]
fn distributed_null_run_reports_the_real_runs_sizes_and_checksums() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let real = family_and_real_run(w);
    let cluster = Cluster::start(&shardmerge_bin!(), vec![], 5.0, 2);
    let args = [
        "submit",
        "r.yml",
        "null://bench/dist",
        "--coordinator",
        &cluster.url,
        "--wait",
        "-q",
        "--out-shard-size",
        "4MiB",
        "--task-size",
        "1MiB",
    ];
    ok(&cluster.cli(w, &args), "submit");
    let log = cluster.log("coordinator.log");
    assert_eq!(logged_sums(&log, "null://bench/dist/"), real, "{log}");
}
