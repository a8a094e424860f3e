//! SIGTERM (what Kubernetes and `kill` send) is a clean stop, as SIGINT is:
//! - `shardmerge run` cancels its job and removes its partial output: no `*.partial`, no index,
//!   no file that looks finished, exit status 1 (not death by the signal);
//! - a worker hands the leases it holds back to the coordinator, so their tasks run again at
//!   once on another worker instead of after the lease expires, and exits 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardmerge_tests::{family_and_linear_recipe, ok, pb, shardmerge_bin, Cluster};

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn run_interrupted(sig: &str) {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    // 2 × 16 layers of 4 × 512² f32: 64 MiB per model, one task of 1 MiB at a time
    family_and_linear_recipe(dir, 16, 512);
    let out = dir.join("out");
    let mut child = Command::new(shardmerge_bin!())
        .args([
            "run",
            "r.yml",
            "out",
            "--quiet",
            "--workers",
            "1",
            "--task-size",
            "1MiB",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shardmerge run");
    // wait until it is writing
    let start = Instant::now();
    loop {
        if names_in(&out).iter().any(|n| n.ends_with(".partial")) {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("run ended ({st}) before it was interrupted; make the model larger");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "run never started writing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(child.id(), sig);
    let o = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{sig}: expected exit 1 (cancelled), got {}; stderr: {stderr}",
        o.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left = names_in(&out);
    assert!(
        left.iter().all(|n| !n.ends_with(".partial")
            && !n.ends_with(".safetensors")
            && n != "model.safetensors.index.json"),
        "{sig} left {left:?} behind"
    );
}

#[test]
fn run_on_sigterm_removes_partial_output() {
    run_interrupted("TERM");
}

#[test]
fn run_on_sigint_removes_partial_output() {
    run_interrupted("INT");
}

/// A worker holding a lease gets SIGTERM: it hands the lease back and exits 0, and the job
/// finishes on another worker well before the (long) lease would have expired.
#[test]
fn worker_on_sigterm_hands_its_lease_back() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    family_and_linear_recipe(dir, 8, 512);
    let lease_ttl = 120.0;
    // no audits: with the first worker gone, an audit of the second's results would wait two
    // lease TTLs for a process to run it (docs/security.md, "Too few workers"), and this test
    // is about the hand-back, not audits
    let args = ["--audit-fraction", "0"];
    let mut cluster = Cluster::start_with(&bin, Vec::new(), lease_ttl, 0, &args);
    let out = dir.join("out");
    let id = ok(
        &cluster.cli(
            dir,
            &[
                "submit",
                "r.yml",
                out.to_str().expect("utf-8 path"),
                "--coordinator",
                &cluster.url,
                "--task-size",
                "1MiB",
            ],
        ),
        "shardmerge submit",
    )
    .trim()
    .to_string();
    let victim = cluster.add_worker();
    let start = Instant::now();
    while cluster.job(&id).leases_active == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker never took a task\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(cluster.worker_pid(victim).expect("worker runs"), "TERM");
    let st = cluster.wait_worker(victim, Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "worker did not exit 0 on SIGTERM: {st:?}\n{}",
        cluster.logs()
    );
    let handed_back = Instant::now();
    cluster.add_worker();
    let st = loop {
        let st = cluster.job(&id);
        if st.state == pb::JobState::Succeeded as i32 || st.state == pb::JobState::Failed as i32 {
            break st;
        }
        assert!(
            handed_back.elapsed() < Duration::from_secs(60),
            "job did not finish after the hand-back (a lease left to expire takes {lease_ttl} s): {st:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.state, pb::JobState::Succeeded as i32, "{}", st.error);
    assert!(out.join("model.safetensors.index.json").exists());
}
