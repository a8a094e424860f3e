//! Bounded by what a caller sends, as real processes: a coordinator keeps answering while
//! large submissions are planned (planning runs off its async runtime, within
//! `--max-plan-time`), and it and its workers go back to their idle size once a job has left
//! memory (`--job-retention`) or no work is left.

use std::path::Path;
use std::time::{Duration, Instant};

use shardmerge_tests::{block_on, fixtures, ok, pb, shardmerge_bin, Cluster};

/// A line of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
fn proc_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .expect("field in status");
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Two models of `n` tensors of 4 float32 zeros each, and a linear recipe of them.
fn tiny_family(dir: &Path, n: usize) {
    for m in ["a", "b"] {
        let d = dir.join(m);
        std::fs::create_dir_all(&d).unwrap();
        let mut header = serde_json::Map::new();
        for i in 0..n {
            header.insert(
                format!("model.layers.{}.t{i}.weight", i % 2),
                serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [i * 16, i * 16 + 16]}),
            );
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.resize(bytes.len() + n * 16, 0);
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        let config = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4}"#;
        std::fs::write(d.join("config.json"), config).unwrap();
    }
    let recipe = "merge_method: linear\nmodels:\n- model: a\n  parameters: {weight: 0.5}\n- model: b\n  parameters: {weight: 0.5}\n";
    std::fs::write(dir.join("r.yml"), recipe).unwrap();
}

/// A coordinator that planned and ran a job of 40,000 tensors goes back to its idle size
/// once `--job-retention` drops the job (it kept 1.06 GB of 1.27 GB for 200k tensors), and an
/// idle worker lets its task buffers go (it kept 732 MB).
#[test]
fn coordinator_and_worker_return_to_their_idle_size() {
    let bin = shardmerge_bin!();
    let mut c = Cluster::start_with(&bin, vec![], 10.0, 0, &["--job-retention", "1"]);
    let work = tempfile::tempdir().unwrap();
    tiny_family(work.path(), 40_000);
    std::thread::sleep(Duration::from_millis(500));
    let coord = c.coordinator_pid();
    let idle = proc_kb(coord, "VmRSS");
    let w = c.add_worker();
    let worker = c.worker_pid(w).expect("worker runs");
    std::thread::sleep(Duration::from_millis(500));
    let worker_idle = proc_kb(worker, "VmRSS");
    let out = work.path().join("out");
    let o = c.cli(
        work.path(),
        &[
            "submit",
            "r.yml",
            out.to_str().unwrap(),
            "--coordinator",
            &c.url,
            "--wait",
            "--quiet",
        ],
    );
    ok(&o, "submit --wait");
    let (coord_peak, worker_peak) = (proc_kb(coord, "VmHWM"), proc_kb(worker, "VmHWM"));
    // past the retention, a status call sweeps the ended job out of memory
    std::thread::sleep(Duration::from_millis(1500));
    ok(
        &c.cli(work.path(), &["status", "--coordinator", &c.url]),
        "status",
    );
    std::thread::sleep(Duration::from_millis(500));
    let (coord_after, worker_after) = (proc_kb(coord, "VmRSS"), proc_kb(worker, "VmRSS"));
    eprintln!(
        "coordinator: idle {idle} B, peak {coord_peak} B, after retention {coord_after} B; \
         worker: idle {worker_idle} B, peak {worker_peak} B, idle again {worker_after} B"
    );
    assert!(
        coord_peak > idle + (32 << 20),
        "the job should have taken memory to plan"
    );
    assert!(
        coord_after <= idle + (16 << 20),
        "the coordinator kept {coord_after} B after the job left memory (idle {idle} B)"
    );
    assert!(
        worker_after <= worker_idle + (16 << 20),
        "an idle worker holds {worker_after} B (it started at {worker_idle} B)"
    );
}

/// A recipe of `n` copies of one model, and the time one `ListJobs` takes, most of `calls`.
fn list_latency(url: &str, calls: usize) -> Duration {
    let url = url.to_string();
    block_on(async move {
        let mut c = shardmerge_worker::client::client(&url).expect("client");
        let mut worst = Duration::ZERO;
        for _ in 0..calls {
            let t = Instant::now();
            c.list_jobs(pb::ListJobsRequest {}).await.expect("ListJobs");
            worst = worst.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worst
    })
}

/// Large submissions are planned off the coordinator's async runtime: while three recipes of
/// 6,000 models each are planned, `ListJobs` answers within a second (the planning held the
/// runtime's threads, and two 200 KB submissions made it take 43 s). A plan past
/// `--max-plan-time` is refused.
#[test]
fn planning_large_submissions_does_not_stall_the_coordinator() {
    let bin = shardmerge_bin!();
    let c = Cluster::start_with(&bin, vec![], 10.0, 0, &["--max-plan-time", "600"]);
    let work = tempfile::tempdir().unwrap();
    let models = fixtures().join("golden").join("models");
    let mut recipe = String::from("merge_method: linear\nmodels:\n");
    for _ in 0..6000 {
        recipe += &format!(
            "- model: {}\n  parameters: {{weight: 1.0}}\n",
            models.join("instruct").display()
        );
    }
    std::fs::write(work.path().join("big.yml"), &recipe).unwrap();
    // the output lies inside an input: refused once planned, so nothing runs afterwards
    let out = models.join("instruct").join("out");
    let submit = |dir: &Path| {
        let (bin, url, out) = (bin.clone(), c.url.clone(), out.clone());
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            let t = Instant::now();
            let o = std::process::Command::new(&bin)
                .current_dir(&dir)
                .args([
                    "submit",
                    "big.yml",
                    out.to_str().unwrap(),
                    "--coordinator",
                    &url,
                ])
                .output()
                .expect("submit");
            (t.elapsed(), String::from_utf8_lossy(&o.stderr).into_owned())
        })
    };
    let quiet = list_latency(&c.url, 5);
    let subs: Vec<_> = (0..3).map(|_| submit(work.path())).collect();
    std::thread::sleep(Duration::from_millis(300));
    let busy = list_latency(&c.url, 20);
    let results: Vec<_> = subs.into_iter().map(|h| h.join().unwrap()).collect();
    let slowest = results.iter().map(|r| r.0).max().unwrap();
    eprintln!("ListJobs: {quiet:?} idle, {busy:?} at worst while planning; submissions took up to {slowest:?}");
    for (_, err) in &results {
        assert!(
            err.contains("inside") || err.contains("overlap") || err.contains("input"),
            "{err}"
        );
    }
    assert!(
        busy < Duration::from_secs(1),
        "ListJobs took {busy:?} while jobs were planned"
    );

    // a budget too small for the plan: refused, naming the setting
    let c2 = Cluster::start_with(&bin, vec![], 10.0, 0, &["--max-plan-time", "0.05"]);
    let o = c2.cli(
        work.path(),
        &[
            "submit",
            "big.yml",
            out.to_str().unwrap(),
            "--coordinator",
            &c2.url,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--max-plan-time"),
        "{err}"
    );
}

/// A coordinator holds the plans of its jobs within `--max-plan-memory`: a submission whose
/// plan would take more is refused with the figures (RESOURCE_EXHAUSTED), and a small job is
/// still taken afterwards.
#[test]
fn a_plan_past_max_plan_memory_is_refused() {
    let bin = shardmerge_bin!();
    let c = Cluster::start_with(&bin, vec![], 10.0, 1, &["--max-plan-memory", "32MiB"]);
    let work = tempfile::tempdir().unwrap();
    tiny_family(work.path(), 40_000);
    let out = work.path().join("out");
    let o = c.cli(
        work.path(),
        &[
            "submit",
            "r.yml",
            out.to_str().unwrap(),
            "--coordinator",
            &c.url,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a 40k-tensor plan was taken under 32 MiB"
    );
    assert!(
        err.contains("--max-plan-memory") && err.contains("plan takes about"),
        "{err}"
    );
    let small = tempfile::tempdir().unwrap();
    tiny_family(small.path(), 10);
    let out = small.path().join("out");
    ok(
        &c.cli(
            small.path(),
            &[
                "submit",
                "r.yml",
                out.to_str().unwrap(),
                "--coordinator",
                &c.url,
                "--wait",
                "--quiet",
            ],
        ),
        "a small job after the refusal",
    );
}
