//! The lease TTL is one coordinator setting (`--lease-ttl`), whatever the state backend: a
//! coordinator started with `--lease-ttl 1 --state memory` hands out 1 s leases and re-queues
//! a task whose worker went silent after about a second, not after the 30 s default.

use std::path::Path;
use std::time::{Duration, Instant};

use shardmerge_tests::{block_on, family_and_linear_recipe, ok, pb, shardmerge_bin, Cluster};

fn poll(url: &str, worker: &str) -> pb::PollWorkResponse {
    let url = url.to_string();
    let worker = worker.to_string();
    block_on(async move {
        let mut c = shardmerge_worker::client::client(&url).expect("client");
        c.poll_work(pb::PollWorkRequest {
            worker_id: worker,
            free_slots: 1,
            slot_memory: 0,
        })
        .await
        .expect("PollWork")
        .into_inner()
    })
}

fn submit(cluster: &Cluster, dir: &Path) -> String {
    family_and_linear_recipe(dir, 2, 64);
    let out = dir.join("out");
    ok(
        &cluster.cli(
            dir,
            &[
                "submit",
                "r.yml",
                out.to_str().expect("utf-8 path"),
                "--coordinator",
                &cluster.url,
            ],
        ),
        "shardmerge submit",
    )
    .trim()
    .to_string()
}

#[test]
fn memory_coordinator_expires_leases_after_its_lease_ttl() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start_with(&bin, Vec::new(), 1.0, 0, &["--state", "memory"]);
    let id = submit(&cluster, work.path());
    // a worker takes a task and goes silent
    let first = poll(&cluster.url, "ghost");
    let lease = first.leases.first().expect("a task to lease");
    assert_eq!(lease.ttl_ms, 1000, "lease TTL is not --lease-ttl");
    let task = lease.task.as_ref().expect("task").task_id;
    let taken = Instant::now();
    // another worker gets the same task once the lease has expired, about 1 s later
    let again = loop {
        let r = poll(&cluster.url, "other");
        if let Some(l) = r
            .leases
            .iter()
            .find(|l| l.task.as_ref().map(|t| t.task_id) == Some(task))
        {
            break l.clone();
        }
        assert!(
            taken.elapsed() < Duration::from_secs(10),
            "the silent worker's lease was not re-queued within 10 s (--lease-ttl 1): {:?}\n{}",
            cluster.job(&id),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let after = taken.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "lease expired after {after:?}, before its 1 s TTL"
    );
    assert_ne!(again.lease_id, lease.lease_id);
}
