//! Hostile workers against a real coordinator process over a real S3 server: a small gRPC
//! client (the proto crate's tonic client) takes leases and misuses them, the way a buggy or
//! malicious worker could; honest worker processes then finish the job, and the output must be
//! byte for byte the embedded run's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shardmerge_tests::{
    block_on, checkpoint_files, generate_family, is_checkpoint_file, ok, pb, run_cli,
    shardmerge_bin, Bucket, Cluster, S3Server,
};

/// Two generated models in bucket `name` under `models/`, `s3.yml` (a linear merge of them)
/// in `work`, and the embedded run of the same merge into `work/local`, the reference.
fn models_and_reference(s3: &S3Server, bin: &Path, work: &Path, name: &str) -> (Bucket, PathBuf) {
    let models = generate_family(work, 2, 4, 768);
    s3.create_bucket(name, true);
    let bucket = s3.bucket(name);
    for m in &models {
        let n = m.file_name().unwrap().to_string_lossy().into_owned();
        bucket.upload_dir(m, &format!("models/{n}"));
    }
    let recipe = |m0: &str, m1: &str| {
        format!(
            "merge_method: linear\ndtype: float32\nmodels:\n\
             - model: {m0}\n  parameters:\n    weight: 0.7\n\
             - model: {m1}\n  parameters:\n    weight: 0.3\n"
        )
    };
    std::fs::write(work.join("local.yml"), recipe("m0", "m1")).expect("write");
    let s3_models = (bucket.uri("models/m0"), bucket.uri("models/m1"));
    std::fs::write(work.join("s3.yml"), recipe(&s3_models.0, &s3_models.1)).expect("write");
    let local = work.join("local");
    let args = ["run", "local.yml", local.to_str().unwrap(), "-q"];
    ok(&run_cli(bin, &s3.env(), work, &args), "shardmerge run");
    (bucket, local)
}

fn submit(cluster: &Cluster, work: &Path, out: &str) -> String {
    let args = [
        "submit",
        "s3.yml",
        out,
        "--coordinator",
        &cluster.url,
        "--task-size",
        "5MiB",
    ];
    ok(&cluster.cli(work, &args), "shardmerge submit")
        .trim()
        .to_string()
}

/// Polls a job until it succeeds or fails (90 s at most).
fn wait_until_ended(cluster: &Cluster, id: &str) -> pb::JobStatus {
    let start = Instant::now();
    loop {
        let st = cluster.job(id);
        if st.state == pb::JobState::Succeeded as i32 || st.state == pb::JobState::Failed as i32 {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "job did not finish: {st:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The S3 output under `out/` holds exactly the files and bytes of the local run, and
/// `verify` accepts it.
fn assert_same_checkpoint(cluster: &Cluster, work: &Path, local: &Path, bucket: &Bucket) {
    let want = checkpoint_files(local);
    let names: Vec<String> = bucket
        .list("out")
        .into_iter()
        .filter(|n| is_checkpoint_file(n))
        .collect();
    assert_eq!(names, want.keys().cloned().collect::<Vec<_>>());
    for (name, bytes) in &want {
        let got = bucket.get(&format!("out/{name}")).expect("output file");
        assert!(got == *bytes, "{name}: bytes differ from the embedded run");
    }
    let v = ok(
        &cluster.cli(work, &["verify", &bucket.uri("out")]),
        "shardmerge verify",
    );
    assert!(v.starts_with("ok:"), "{v}");
}

use shardmerge_worker::client::Client;

fn client(cluster: &Cluster) -> Client {
    // (its channel starts its connection task on the tests' runtime)
    block_on(async { shardmerge_worker::client::client(&cluster.url).expect("client") })
}

async fn poll(c: &mut Client, worker: &str, slots: u32) -> Vec<pb::Lease> {
    c.poll_work(pb::PollWorkRequest {
        worker_id: worker.into(),
        free_slots: slots,
        slot_memory: 0,
    })
    .await
    .expect("PollWork")
    .into_inner()
    .leases
}

async fn renew(c: &mut Client, worker: &str, lease: &str) -> bool {
    let r = c
        .renew_lease(pb::RenewLeaseRequest {
            worker_id: worker.into(),
            lease_ids: vec![lease.into()],
        })
        .await
        .expect("RenewLease")
        .into_inner();
    !r.lost.iter().any(|l| l == lease)
}

async fn complete(c: &mut Client, worker: &str, lease: &str, result: pb::TaskResult) -> bool {
    c.complete_task(pb::CompleteTaskRequest {
        worker_id: worker.into(),
        lease_id: lease.into(),
        result: Some(result),
    })
    .await
    .expect("CompleteTask")
    .into_inner()
    .accepted
}

/// The result an honest worker would report for write task `lease`, without writing anything
/// (`size_delta` bytes off), its receipt naming a part that was never uploaded.
fn forged_result(lease: &pb::Lease, size_delta: i64) -> pb::TaskResult {
    let task = lease.task.as_ref().expect("task");
    let Some(pb::task::Kind::Write(w)) = &task.kind else {
        panic!("expected a write task: {task:?}");
    };
    let out = w.output.as_ref().expect("output");
    let Some(pb::output_target::Sink::Multipart(m)) = &out.sink else {
        panic!("expected a multipart sink: {out:?}");
    };
    let size = (out.length as i64 + size_delta) as u64;
    pb::TaskResult {
        bytes_written: size,
        part: Some(pb::PartReceipt {
            part_index: m.part_index,
            etag: "\"0123456789abcdef0123456789abcdef\"".into(),
            size,
            crc32c: 0,
        }),
        ..Default::default()
    }
}

/// Leases used by a worker id that did not poll them, a result with a wrong byte count, and a
/// result whose part was never uploaded: each is refused (the last one when its file is
/// completed: storage does not hold the part), the real holder keeps its lease, and the job
/// still finishes with exactly the embedded run's bytes.
#[test]
fn hostile_results_are_refused_and_the_job_still_matches_embedded() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let (bucket, local) = models_and_reference(s3, &bin, work.path(), "hostile");
    let mut cluster = Cluster::start(&bin, s3.env(), 5.0, 0);
    let id = submit(&cluster, work.path(), &bucket.uri("out"));
    let mut c = client(&cluster);
    let leases = block_on(poll(&mut c, "evil", 3));
    assert_eq!(leases.len(), 3, "expected 3 write tasks: {leases:?}");
    for l in &leases {
        assert_eq!(l.lease_id.len(), 32, "a 128-bit hex id: {}", l.lease_id);
        assert!(!l.lease_id.contains(&id), "{}", l.lease_id);
    }
    let (a, b, m) = (&leases[0], &leases[1], &leases[2]);
    block_on(async {
        // another worker id: every use of the lease is refused, the holder keeps it
        assert!(
            !complete(&mut c, "intruder", &a.lease_id, forged_result(a, 0)).await,
            "CompleteTask from another worker id was accepted"
        );
        assert!(!renew(&mut c, "intruder", &a.lease_id).await);
        c.fail_task(pb::FailTaskRequest {
            worker_id: "intruder".into(),
            lease_id: a.lease_id.clone(),
            error: "boom".into(),
            retryable: false,
        })
        .await
        .expect("FailTask");
        assert!(
            renew(&mut c, "evil", &a.lease_id).await,
            "the holder lost its lease to another worker id's calls"
        );
        // a wrong byte count
        assert!(
            !complete(&mut c, "evil", &b.lease_id, forged_result(b, -1)).await,
            "a result one byte short was accepted"
        );
        // right part and size, but nothing uploaded: only storage can tell
        complete(&mut c, "evil", &m.lease_id, forged_result(m, 0)).await;
        // the holder of `a` hands it back
        c.fail_task(pb::FailTaskRequest {
            worker_id: "evil".into(),
            lease_id: a.lease_id.clone(),
            error: "giving it back".into(),
            retryable: true,
        })
        .await
        .expect("FailTask");
    });
    let st = cluster.job(&id);
    assert_eq!(st.state, pb::JobState::Running as i32, "{st:?}");
    cluster.add_worker();
    cluster.add_worker();
    let st = wait_until_ended(&cluster, &id);
    assert_eq!(
        st.state,
        pb::JobState::Succeeded as i32,
        "job failed: {}\n{}",
        st.error,
        cluster.logs()
    );
    let logs =
        std::fs::read_to_string(cluster.dir.path().join("coordinator.log")).unwrap_or_default();
    assert!(logs.contains("held by another worker id"), "{logs}");
    assert!(logs.contains("result refused"), "{logs}");
    assert!(logs.contains("storage does not hold the parts"), "{logs}");
    for l in &leases {
        assert!(!logs.contains(&l.lease_id), "a lease id was logged");
    }
    assert_same_checkpoint(&cluster, work.path(), &local, &bucket);
}

/// A worker that keeps renewing a lease without ever finishing: past `--max-task-time` its
/// renewals are refused, the lease expires, another worker runs the task, the job finishes.
#[test]
fn a_worker_renewing_past_the_maximum_run_time_loses_its_lease() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let (bucket, local) = models_and_reference(s3, &bin, work.path(), "overtime");
    let mut cluster = Cluster::start_with(&bin, s3.env(), 1.0, 0, &["--max-task-time", "3"]);
    let id = submit(&cluster, work.path(), &bucket.uri("out"));
    let mut c = client(&cluster);
    let leases = block_on(poll(&mut c, "staller", 1));
    assert_eq!(leases.len(), 1);
    let l = leases[0].clone();
    let start = Instant::now();
    cluster.add_worker();
    // renew every 300 ms (well within the 1 s ttl) until refused
    let lost_after = block_on(async {
        loop {
            if !renew(&mut c, "staller", &l.lease_id).await {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "renewals were never refused"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    assert!(
        lost_after >= Duration::from_millis(2500) && lost_after < Duration::from_secs(6),
        "lost after {lost_after:?}, with --max-task-time 3"
    );
    let st = wait_until_ended(&cluster, &id);
    assert_eq!(
        st.state,
        pb::JobState::Succeeded as i32,
        "job failed: {}",
        st.error
    );
    assert!(st.retries >= 1, "{st:?}");
    // its late result is not taken
    assert!(!block_on(complete(
        &mut c,
        "staller",
        &l.lease_id,
        forged_result(&l, 0)
    )));
    assert_same_checkpoint(&cluster, work.path(), &local, &bucket);
}
