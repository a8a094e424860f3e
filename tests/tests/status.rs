//! What `status`, `cancel` and a worker's log say about a job, read as a user reads them:
//! - an ended job's status line stays the same from call to call (its clock stopped at the
//!   end), says 100.0% of its work when it succeeded and holds no leases;
//! - `cancel` of a running job cancels it (exit 0), again says it was cancelled before (exit
//!   0), and of a job that succeeded says "already ended" and exits 1;
//! - a worker at its default log level logs each task (task, bytes, time), says it stops on
//!   SIGTERM, and writes no colour codes into a log that is not a terminal.

use std::process::Command;
use std::time::{Duration, Instant};

use shardmerge_tests::{family_and_linear_recipe, ok, pb, shardmerge_bin, Cluster};

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

fn submit(cluster: &Cluster, dir: &std::path::Path, out: &str) -> String {
    let o = cluster.cli(
        dir,
        &[
            "submit",
            "r.yml",
            out,
            "--coordinator",
            &cluster.url,
            "--task-size",
            "1MiB",
        ],
    );
    ok(&o, "shardmerge submit").trim().to_string()
}

fn wait_for(cluster: &Cluster, id: &str, state: pb::JobState) -> pb::JobStatus {
    let start = Instant::now();
    loop {
        let st = cluster.job(id);
        if st.state == state as i32 {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{id} never reached {state:?}: {st:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_and_cancel_tell_the_truth_about_ended_jobs() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    family_and_linear_recipe(dir, 4, 256);
    // no worker yet: the first job stays running until it is cancelled
    let mut cluster = Cluster::start(&bin, Vec::new(), 30.0, 0);
    let url = cluster.url.clone();
    let cancelled = submit(&cluster, dir, dir.join("out-c").to_str().expect("utf-8"));
    let c = cluster.cli(dir, &["cancel", &cancelled, "--coordinator", &url]);
    let stderr = String::from_utf8_lossy(&c.stderr);
    assert_eq!(c.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    let again = cluster.cli(dir, &["cancel", &cancelled, "--coordinator", &url]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("already ended"), "{stderr}");

    // a worker at its default log level runs the next job to its end
    let w = cluster.add_worker_logging(None);
    let done = submit(&cluster, dir, dir.join("out").to_str().expect("utf-8"));
    let st = wait_for(&cluster, &done, pb::JobState::Succeeded);
    assert_eq!(st.leases_active, 0);
    let status = |id: &str| {
        ok(
            &cluster.cli(dir, &["status", id, "--coordinator", &url]),
            "status",
        )
    };
    let first = status(&done);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        status(&done),
        first,
        "an ended job's status line does not change"
    );
    assert!(
        first.contains("succeeded") && first.contains("100.0%"),
        "{first}"
    );
    assert!(!first.contains("running"), "{first}");
    let c = cluster.cli(dir, &["cancel", &done, "--coordinator", &url]);
    let stderr = String::from_utf8_lossy(&c.stderr);
    assert_eq!(c.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already ended (succeeded)"), "{stderr}");
    assert_eq!(cluster.job(&done).state, pb::JobState::Succeeded as i32);

    signal(cluster.worker_pid(w).expect("worker runs"), "TERM");
    let exit = cluster.wait_worker(w, Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let log = cluster.log(&format!("worker{w}.log"));
    let tasks = log.lines().filter(|l| l.contains(" done: ")).count();
    assert_eq!(tasks as u64, st.tasks_done, "one line per task:\n{log}");
    assert!(
        log.contains("bytes written") && log.contains(" s"),
        "task, bytes and time:\n{log}"
    );
    assert!(log.contains("SIGTERM or SIGINT received"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}
