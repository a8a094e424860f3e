//! One owner per output (issue 18), with real processes: concurrent `run`s into one local
//! folder and concurrent `submit`s to one S3 prefix leave exactly one job running, the others
//! refused at submit with the owner named, and the output a valid checkpoint byte-identical to
//! a run into a fresh folder. A local part completed without being written is caught at the
//! commit and written again.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardmerge_tests::{
    block_on, checkpoint_files, generate_family, is_checkpoint_file, ok, pb, run_cli,
    shardmerge_bin, Cluster, S3Server,
};

fn recipe(weight: f32, models: &[String]) -> String {
    format!(
        "merge_method: linear\ndtype: float32\nmodels:\n\
         - model: {}\n  parameters:\n    weight: {weight}\n\
         - model: {}\n  parameters:\n    weight: 0.3\n",
        models[0], models[1]
    )
}

/// Four `run`s into one folder at once (three with `--overwrite`, two recipes): one runs, the
/// others are refused naming it, and the folder holds that run's checkpoint, byte for byte.
#[test]
fn concurrent_runs_into_one_folder_have_one_owner() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    // 2 models of 8 layers of 4 × 1024² f32: the merge takes seconds
    generate_family(w, 2, 8, 1024);
    let names = ["m0".to_string(), "m1".to_string()];
    std::fs::write(w.join("a.yml"), recipe(0.7, &names)).expect("write");
    std::fs::write(w.join("b.yml"), recipe(0.2, &names)).expect("write");
    for r in ["a", "b"] {
        let out = w.join(format!("ref-{r}"));
        let args = [
            "run",
            &format!("{r}.yml"),
            out.to_str().expect("utf-8"),
            "-q",
        ];
        ok(&run_cli(&bin, &[], w, &args), "reference run");
    }
    let out = w.join("out");
    let out_s = out.to_str().expect("utf-8");
    let spawn = |r: &str, overwrite: bool| {
        let mut c = Command::new(&bin);
        c.args(["run", &format!("{r}.yml"), out_s, "-q", "--workers", "1"]);
        if overwrite {
            c.arg("--overwrite");
        }
        c.current_dir(w)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let children = vec![
        ("a", spawn("a", false)),
        ("b", spawn("b", true)),
        ("a", spawn("a", true)),
        ("b", spawn("b", true)),
    ];
    let mut winners = Vec::new();
    for (r, c) in children {
        let o = c.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if o.status.success() {
            winners.push(r);
        } else {
            assert!(
                err.contains("is claimed by job") && err.contains("shardmerge cancel"),
                "a refused run must name the owner: {err}"
            );
        }
    }
    assert_eq!(winners.len(), 1, "exactly one run writes the folder");
    let want = checkpoint_files(&w.join(format!("ref-{}", winners[0])));
    let got = checkpoint_files(&out);
    assert!(got == want, "the folder is not the winner's checkpoint");
    assert!(!out.join(".shardmerge-claim").exists(), "claim released");
    ok(
        &run_cli(&bin, &[], w, &["verify", "--data", out_s]),
        "verify --data",
    );
}

/// Submits to one S3 prefix through a coordinator (no workers yet, so the first job is still
/// running): of four concurrent submits exactly one is accepted, the others are refused naming
/// it; once workers run, the prefix holds the embedded run's checkpoint and no claim.
#[test]
fn concurrent_s3_submits_have_one_owner() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let models = generate_family(w, 2, 4, 768);
    s3.create_bucket("claims", true);
    let bucket = s3.bucket("claims");
    let mut uris = Vec::new();
    for m in &models {
        let n = m.file_name().expect("name").to_string_lossy().into_owned();
        bucket.upload_dir(m, &format!("models/{n}"));
        uris.push(bucket.uri(&format!("models/{n}")));
    }
    let names = ["m0".to_string(), "m1".to_string()];
    std::fs::write(w.join("local.yml"), recipe(0.7, &names)).expect("write");
    std::fs::write(w.join("a.yml"), recipe(0.7, &uris)).expect("write");
    std::fs::write(w.join("b.yml"), recipe(0.2, &uris)).expect("write");
    let local = w.join("local");
    let args = ["run", "local.yml", local.to_str().expect("utf-8"), "-q"];
    ok(&run_cli(&bin, &s3.env(), w, &args), "embedded run");
    let mut cluster = Cluster::start(&bin, s3.env(), 5.0, 0);
    let out = bucket.uri("out");
    let outcomes: Vec<(usize, std::process::Output)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let (cluster, out) = (&cluster, &out);
                s.spawn(move || {
                    let r = if i % 2 == 0 { "a.yml" } else { "b.yml" };
                    let mut args = vec!["submit", r, out, "--coordinator", &cluster.url];
                    if i > 0 {
                        args.push("--overwrite");
                    }
                    (i, cluster.cli(w, &args))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut accepted = Vec::new();
    for (i, o) in &outcomes {
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            accepted.push((*i, String::from_utf8_lossy(&o.stdout).trim().to_string()));
        } else {
            assert!(err.contains("is claimed by job"), "submit {i}: {err}");
        }
    }
    assert_eq!(accepted.len(), 1, "exactly one job owns the output");
    // (a refusal names the oldest claim it saw: usually the winner, or a contender that was
    // itself giving way at that moment)
    let (first, id) = accepted.remove(0);
    let claims: Vec<String> = bucket
        .list("out")
        .into_iter()
        .filter(|n| n.starts_with(".shardmerge-claim."))
        .collect();
    assert_eq!(claims.len(), 1, "one claim object: {claims:?}");
    cluster.add_worker();
    cluster.add_worker();
    let start = Instant::now();
    let st = loop {
        let st = cluster.job(&id);
        if st.state == pb::JobState::Succeeded as i32 || st.state == pb::JobState::Failed as i32 {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{st:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st.state, pb::JobState::Succeeded as i32, "{}", st.error);
    let held = bucket.list("out");
    assert!(
        !held.iter().any(|n| n.starts_with(".shardmerge-claim")),
        "the claim is released at the commit: {held:?}"
    );
    if first % 2 == 0 {
        let want = checkpoint_files(&local);
        let got: Vec<String> = held.into_iter().filter(|n| is_checkpoint_file(n)).collect();
        assert_eq!(got, want.keys().cloned().collect::<Vec<_>>());
        for (name, bytes) in &want {
            let b = bucket.get(&format!("out/{name}")).expect("output file");
            assert!(b == *bytes, "{name} differs from the embedded run");
        }
    }
    ok(
        &cluster.cli(w, &["verify", "--data", &out]),
        "verify --data",
    );
}

/// Garage (the S3 test server when MinIO is absent) ignores `If-None-Match: *` on PutObject: a
/// create-only put over an existing object succeeds. This is why S3 claims are claim objects
/// under unique names plus a listing, not one create-only key (see `coordinator/src/claim.rs`).
#[test]
fn s3_server_create_only_put_behaviour_is_known() {
    use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
    let s3 = S3Server::shared();
    s3.create_bucket("conditional", true);
    let env = s3.env();
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(get("AWS_ENDPOINT_URL"))
        .with_access_key_id(get("AWS_ACCESS_KEY_ID"))
        .with_secret_access_key(get("AWS_SECRET_ACCESS_KEY"))
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_bucket_name("conditional")
        .build()
        .expect("store");
    let key = object_store::path::Path::from("k");
    let create = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    block_on(async {
        store
            .put_opts(&key, PutPayload::from_static(b"first"), create.clone())
            .await
            .expect("first create");
        let second = store
            .put_opts(&key, PutPayload::from_static(b"second"), create)
            .await;
        match s3.kind {
            "garage" => assert!(
                second.is_ok(),
                "Garage now honours If-None-Match: a create-only claim key would work"
            ),
            _ => assert!(second.is_err(), "{} overwrote under If-None-Match", s3.kind),
        }
    });
}

/// A worker that reports a part done without writing it (a local output): the hole it left is
/// found at the commit, the file's tasks run again, and the checkpoint is the embedded run's.
#[test]
fn a_local_part_never_written_is_caught_and_written_again() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    generate_family(w, 2, 4, 768);
    let names = ["m0".to_string(), "m1".to_string()];
    std::fs::write(w.join("r.yml"), recipe(0.7, &names)).expect("write");
    let reference = w.join("ref");
    let args = ["run", "r.yml", reference.to_str().expect("utf-8"), "-q"];
    ok(&run_cli(&bin, &[], w, &args), "reference run");
    let cluster = Cluster::start(&bin, Vec::new(), 5.0, 0);
    let out = w.join("out");
    let out_s = out.to_str().expect("utf-8");
    let id = ok(
        &cluster.cli(
            w,
            &[
                "submit",
                "r.yml",
                out_s,
                "--coordinator",
                &cluster.url,
                "--task-size",
                "1MiB",
            ],
        ),
        "submit",
    );
    let id = id.trim().to_string();
    // a liar takes one write task and reports it written, with the CRC an honest worker would
    // report, without writing a byte
    let mut c =
        block_on(async { shardmerge_worker::client::client(&cluster.url).expect("client") });
    let lease = block_on(async {
        c.poll_work(pb::PollWorkRequest {
            worker_id: "liar".into(),
            free_slots: 1,
            slot_memory: 0,
        })
        .await
        .expect("PollWork")
        .into_inner()
        .leases
        .remove(0)
    });
    let task = lease.task.as_ref().expect("task");
    let Some(pb::task::Kind::Write(wt)) = &task.kind else {
        panic!("expected a write task: {task:?}");
    };
    let o = wt.output.as_ref().expect("output");
    let file = o.uri.rsplit('/').next().expect("file name");
    let want = std::fs::read(reference.join(file)).expect("reference");
    let bytes = &want[o.offset as usize..(o.offset + o.length) as usize];
    let accepted = block_on(async {
        c.complete_task(pb::CompleteTaskRequest {
            worker_id: "liar".into(),
            lease_id: lease.lease_id.clone(),
            result: Some(pb::TaskResult {
                bytes_written: o.length,
                part: Some(pb::PartReceipt {
                    part_index: 0,
                    etag: String::new(),
                    size: o.length,
                    crc32c: crc32c::crc32c(bytes),
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("CompleteTask")
        .into_inner()
        .accepted
    });
    assert!(
        accepted,
        "the forged result is plausible: only storage can tell"
    );
    let mut cluster = cluster;
    cluster.add_worker();
    let start = Instant::now();
    let st = loop {
        let st = cluster.job(&id);
        if st.state == pb::JobState::Succeeded as i32 || st.state == pb::JobState::Failed as i32 {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{st:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st.state, pb::JobState::Succeeded as i32, "{}", st.error);
    let logs = cluster.logs();
    assert!(logs.contains("was not written"), "{logs}");
    assert!(
        checkpoint_files(&out) == checkpoint_files(&reference),
        "bytes differ"
    );
    ok(
        &run_cli(&bin, &[], w, &["verify", "--data", out_s]),
        "verify --data",
    );
}
