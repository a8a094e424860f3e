//! Distributed merges against a real S3 server on loopback: a coordinator process, worker
//! processes, inputs and outputs in buckets. Each merge is compared byte for byte with
//! `shardmerge run` (embedded mode) on local copies of the same models.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shardmerge_tests::{
    checkpoint_files, fixtures, generate_family, is_checkpoint_file, ok, pb, run_cli,
    shardmerge_bin, Bucket, Cluster, S3Server,
};

fn golden() -> PathBuf {
    fixtures().join("golden")
}

/// Creates `name` and uploads the golden models it will read to `models/`.
fn bucket_with_models(s3: &S3Server, name: &str, models: &[&str]) -> Bucket {
    s3.create_bucket(name, true);
    let b = s3.bucket(name);
    for m in models {
        b.upload_dir(&golden().join("models").join(m), &format!("models/{m}"));
    }
    b
}

/// A golden case's recipe with its model paths moved to the bucket.
fn s3_recipe(case: &str, bucket: &Bucket) -> String {
    let text = std::fs::read_to_string(golden().join("cases").join(case).join("config.yml"))
        .expect("read recipe");
    text.replace("models/", &format!("s3://{}/models/", bucket.name))
}

/// Asserts the checkpoint under `out/` in the bucket holds exactly the bytes of `local`.
fn assert_same_checkpoint(local: &Path, bucket: &Bucket, out: &str) {
    let want = checkpoint_files(local);
    assert!(
        want.keys().any(|k| k.ends_with(".safetensors")),
        "the local reference run wrote no weights"
    );
    let names: Vec<String> = bucket
        .list(out)
        .into_iter()
        .filter(|n| is_checkpoint_file(n))
        .collect();
    assert_eq!(
        names,
        want.keys().cloned().collect::<Vec<_>>(),
        "different files in s3://{}/{out} and {}",
        bucket.name,
        local.display()
    );
    for (name, bytes) in &want {
        let got = bucket
            .get(&format!("{out}/{name}"))
            .unwrap_or_else(|| panic!("{out}/{name} missing"));
        assert_eq!(got.len(), bytes.len(), "{name}: size differs");
        assert!(got == *bytes, "{name}: bytes differ from the embedded run");
    }
}

/// Runs golden `case` with inputs and output on S3 through a coordinator and three workers,
/// and checks it against `shardmerge run` on the local copies; `verify` must accept it.
fn parity(case: &str, bucket_name: &str, models: &[&str]) {
    parity_with(case, bucket_name, models, &[]);
}

/// [`parity`], with `extra` options given to both `run` and `submit`.
fn parity_with(case: &str, bucket_name: &str, models: &[&str], extra: &[&str]) {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let bucket = bucket_with_models(s3, bucket_name, models);
    let work = tempfile::tempdir().expect("tempdir");
    // the embedded reference, from the fixtures folder (relative model paths)
    let local = work.path().join("local");
    let recipe = golden().join("cases").join(case).join("config.yml");
    ok(
        &run_cli(
            &bin,
            &s3.env(),
            &golden(),
            &[
                &[
                    "run",
                    recipe.to_str().unwrap(),
                    local.to_str().unwrap(),
                    "-q",
                ],
                extra,
            ]
            .concat(),
        ),
        &format!("shardmerge run {case}"),
    );
    let cluster = Cluster::start(&bin, s3.env(), 10.0, 3);
    std::fs::write(work.path().join("recipe.yml"), s3_recipe(case, &bucket)).expect("write");
    let out = bucket.uri("out");
    ok(
        &cluster.cli(
            work.path(),
            &[
                &[
                    "submit",
                    "recipe.yml",
                    &out,
                    "--coordinator",
                    &cluster.url,
                    "--wait",
                ],
                extra,
            ]
            .concat(),
        ),
        &format!("shardmerge submit {case}"),
    );
    assert_same_checkpoint(&local, &bucket, "out");
    let v = ok(
        &cluster.cli(work.path(), &["verify", &out]),
        "shardmerge verify",
    );
    assert!(v.starts_with("ok:"), "{v}");
}

#[test]
fn linear_s3_matches_embedded() {
    parity("linear_soup", "linear", &["instruct", "lang_eu", "lang_ca"]);
}

#[test]
fn passthrough_s3_matches_embedded() {
    parity(
        "passthrough_frankenmerge",
        "passthrough",
        &["instruct", "lang_eu"],
    );
}

#[test]
fn task_arithmetic_s3_matches_embedded() {
    parity(
        "task_arithmetic_instruct_transfer",
        "task-arithmetic",
        &["base", "instruct", "lang_eu"],
    );
}

#[test]
fn ties_s3_matches_embedded() {
    parity(
        "ties_multilingual",
        "ties",
        &["base", "instruct", "lang_eu", "lang_ca", "lang_gl"],
    );
}

#[test]
fn slerp_s3_matches_embedded() {
    parity("slerp_gradient", "slerp", &["instruct", "lang_eu"]);
}

/// A randomised method: draws are keyed by a model's position among the inputs, not its path,
/// so the S3 run matches the embedded run on local copies like any other method.
#[test]
fn dare_ties_s3_matches_embedded() {
    parity("dare_ties", "dare-ties", &["base", "instruct", "lang_eu"]);
}

/// `--rng counter` travels with the job to the workers: the S3 run draws what the embedded
/// run with the same option draws (mergekit's stream would give other bytes).
#[test]
fn counter_rng_reaches_the_workers() {
    parity_with(
        "dare_linear",
        "dare-linear-counter",
        &["base", "instruct", "lang_ca"],
        &["--rng", "counter"],
    );
}

/// Larger generated models, so that output files are several multipart parts (>= 5 MiB except
/// the last) and the output is sharded; one input is a local path, the others are on S3.
#[test]
fn multipart_sharded_mixed_inputs_match_embedded() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    // 3 models of 16 tensors of 1 MiB
    let models = generate_family(work.path(), 3, 4, 512);
    s3.create_bucket("family", true);
    let bucket = s3.bucket("family");
    for m in &models[1..] {
        let name = m.file_name().unwrap().to_string_lossy().into_owned();
        bucket.upload_dir(m, &format!("models/{name}"));
    }
    let recipe = |m1: &str, m2: &str| {
        format!(
            "merge_method: linear\ndtype: float32\nmodels:\n\
             - model: m0\n  parameters:\n    weight: 0.5\n\
             - model: {m1}\n  parameters:\n    weight: 0.3\n\
             - model: {m2}\n  parameters:\n    weight: 0.2\n"
        )
    };
    std::fs::write(work.path().join("local.yml"), recipe("m1", "m2")).expect("write");
    std::fs::write(
        work.path().join("mixed.yml"),
        recipe(&bucket.uri("models/m1"), &bucket.uri("models/m2")),
    )
    .expect("write");
    let engine = ["--out-shard-size", "10MB", "--task-size", "5MiB"];
    let local = work.path().join("local");
    let mut args = vec!["run", "local.yml", local.to_str().unwrap(), "-q"];
    args.extend(engine);
    ok(
        &run_cli(&bin, &s3.env(), work.path(), &args),
        "shardmerge run",
    );
    assert!(
        checkpoint_files(&local).len() >= 3,
        "expected a sharded output"
    );
    let cluster = Cluster::start(&bin, s3.env(), 10.0, 3);
    let out = bucket.uri("out");
    let mut args = vec![
        "submit",
        "mixed.yml",
        &out,
        "--coordinator",
        &cluster.url,
        "--wait",
    ];
    args.extend(engine);
    ok(&cluster.cli(work.path(), &args), "shardmerge submit");
    assert_same_checkpoint(&local, &bucket, "out");
    ok(
        &cluster.cli(work.path(), &["verify", &out]),
        "shardmerge verify",
    );
    let st = ok(
        &cluster.cli(work.path(), &["status", "--coordinator", &cluster.url]),
        "shardmerge status",
    );
    assert!(st.contains("succeeded"), "{st}");
}

/// A worker killed (SIGKILL) while it holds a lease: the lease expires, the task runs on
/// another worker, and the output is still exactly the embedded run's.
#[test]
fn killed_worker_lease_expires_and_job_completes() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let (bucket, local) = linear_pair_merged_locally(s3, &bin, work.path(), "killed");
    // one worker first: once it holds a lease, kill it, then bring up two more
    let mut cluster = Cluster::start(&bin, s3.env(), 1.0, 0);
    let id = submit_s3_yml(&cluster, work.path(), &bucket.uri("out"));
    let victim = cluster.add_worker();
    let start = Instant::now();
    loop {
        let st = cluster.job(&id);
        if st.leases_active > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the worker never took a task: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    cluster.kill_worker(victim);
    cluster.add_worker();
    cluster.add_worker();
    let st = wait_until_ended(&cluster, &id);
    assert_eq!(
        st.state,
        pb::JobState::Succeeded as i32,
        "job failed: {}",
        st.error
    );
    assert!(st.retries >= 1, "no task ran again after the kill: {st:?}");
    assert_same_checkpoint(&local, &bucket, "out");
}

/// The coordinator killed (SIGKILL) mid-job and started again with the same `--state` (an S3
/// prefix): it resumes the job from its journal (what was done before the kill stays done),
/// the workers carry on, `status --wait` follows the job through it, and the output is exactly
/// the embedded run's. The job's status outlives another restart.
#[test]
fn restarted_coordinator_resumes_from_its_journal() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let (bucket, local) = linear_pair_merged_locally(s3, &bin, work.path(), "journal");
    // the journal in the bucket too, as the Kubernetes manifests have it
    let state = bucket.uri("_journal");
    let mut cluster = Cluster::start_with(&bin, s3.env(), 2.0, 0, &["--state", &state]);
    let id = submit_s3_yml(&cluster, work.path(), &bucket.uri("out"));
    // a client following the job through the restart
    let follower = std::process::Command::new(&cluster.bin)
        .args(["status", &id, "--wait", "-q", "--coordinator", &cluster.url])
        .envs(cluster.env.iter().cloned())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start status --wait");
    cluster.add_worker();
    let start = Instant::now();
    let before = loop {
        let st = cluster.job(&id);
        if st.tasks_done >= 2 {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the job made no progress: {st:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(
        before.tasks_done < before.tasks_total,
        "the job ended before the coordinator could be killed: {before:?}"
    );
    cluster.restart_coordinator();
    let resumed = cluster.job(&id);
    assert!(
        resumed.tasks_done >= before.tasks_done,
        "the restarted coordinator forgot finished tasks: {} done before the kill, {resumed:?} after\n{}",
        before.tasks_done,
        cluster.logs()
    );
    let st = wait_until_ended(&cluster, &id);
    assert_eq!(
        st.state,
        pb::JobState::Succeeded as i32,
        "job failed: {}\n{}",
        st.error,
        cluster.logs()
    );
    assert_same_checkpoint(&local, &bucket, "out");
    let followed = follower.wait_with_output().expect("status --wait");
    assert!(
        followed.status.success(),
        "status --wait did not follow the job through the restart: {}",
        String::from_utf8_lossy(&followed.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&followed.stdout).trim(), id);
    cluster.restart_coordinator();
    assert_eq!(cluster.job(&id).state, pb::JobState::Succeeded as i32);
}

/// Submits `s3.yml` in `work` (5 MiB tasks, not waiting); returns the job id.
fn submit_s3_yml(cluster: &Cluster, work: &Path, out: &str) -> String {
    let submitted = ok(
        &cluster.cli(
            work,
            &[
                "submit",
                "s3.yml",
                out,
                "--coordinator",
                &cluster.url,
                "--task-size",
                "5MiB",
            ],
        ),
        "shardmerge submit",
    );
    submitted.trim().to_string()
}

/// Polls a job until it succeeds or fails (60 s at most).
fn wait_until_ended(cluster: &Cluster, id: &str) -> pb::JobStatus {
    let start = Instant::now();
    loop {
        let st = cluster.job(id);
        if st.state == pb::JobState::Succeeded as i32 || st.state == pb::JobState::Failed as i32 {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "job did not finish: {st:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two generated models uploaded to bucket `name` under `models/`, the recipes `local.yml`
/// and `s3.yml` (a linear merge of them) in `work`, and the embedded run of `local.yml`
/// (5 MiB tasks) into `work/local`, the reference output.
fn linear_pair_merged_locally(
    s3: &S3Server,
    bin: &Path,
    work: &Path,
    name: &str,
) -> (Bucket, PathBuf) {
    let models = generate_family(work, 2, 4, 768);
    s3.create_bucket(name, true);
    let bucket = s3.bucket(name);
    for m in &models {
        let name = m.file_name().unwrap().to_string_lossy().into_owned();
        bucket.upload_dir(m, &format!("models/{name}"));
    }
    let recipe = |m0: &str, m1: &str| {
        format!(
            "merge_method: linear\ndtype: float32\nmodels:\n\
             - model: {m0}\n  parameters:\n    weight: 0.7\n\
             - model: {m1}\n  parameters:\n    weight: 0.3\n"
        )
    };
    std::fs::write(work.join("local.yml"), recipe("m0", "m1")).expect("write");
    std::fs::write(
        work.join("s3.yml"),
        recipe(&bucket.uri("models/m0"), &bucket.uri("models/m1")),
    )
    .expect("write");
    let local = work.join("local");
    ok(
        &run_cli(
            bin,
            &s3.env(),
            work,
            &[
                "run",
                "local.yml",
                local.to_str().unwrap(),
                "-q",
                "--task-size",
                "5MiB",
            ],
        ),
        "shardmerge run",
    );
    (bucket, local)
}

/// An output the workers may not write: the job fails, `submit --wait` exits non-zero with the
/// reason, and no index object appears (nothing looks finished).
#[test]
fn unwritable_output_fails_and_leaves_no_index() {
    let s3 = S3Server::shared();
    if s3.kind != "garage" {
        eprintln!(
            "read-only buckets are set up on Garage only; skipping on {}",
            s3.kind
        );
        return;
    }
    let bin = shardmerge_bin!();
    let bucket = bucket_with_models(s3, "readable", &["instruct", "lang_eu", "lang_ca"]);
    s3.create_bucket("read-only", false);
    let ro = s3.bucket("read-only");
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        work.path().join("recipe.yml"),
        s3_recipe("linear_soup", &bucket),
    )
    .expect("write");
    let cluster = Cluster::start(&bin, s3.env(), 10.0, 1);
    let out = cluster.cli(
        work.path(),
        &[
            "submit",
            "recipe.yml",
            &ro.uri("out"),
            "--coordinator",
            &cluster.url,
            "--wait",
        ],
    );
    assert!(
        !out.status.success(),
        "a merge into a read-only bucket succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("read-only/out"),
        "the error does not name the output: {err}"
    );
    assert_eq!(ro.get("out/model.safetensors.index.json"), None);
    assert!(
        ro.list("out").is_empty(),
        "left objects: {:?}",
        ro.list("out")
    );
}

/// Client errors name the coordinator and say what to do.
#[test]
fn unreachable_coordinator_is_named() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", shardmerge_tests::free_port());
    let out = run_cli(&bin, &[], work.path(), &["status", "--coordinator", &url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url) && err.contains("unreachable"), "{err}");
}
