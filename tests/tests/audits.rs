//! Result audits against a worker that lies (issue 18): `hostile-worker` holds the worker
//! token and completes its write tasks with zeros and their valid CRC-32C. With
//! `--audit-fraction 1` and two honest worker processes beside it, its results are audited, a
//! third process breaks the tie, it is quarantined (status, log, its polls refused) and every
//! write task it did runs again: the checkpoint is byte-identical to the embedded run. With one
//! honest process beside it, the disagreement cannot be decided and the job fails cleanly.
//! Local outputs, and S3 multipart outputs (the liar's parts are uploaded again by others).

use std::path::Path;
use std::time::{Duration, Instant};

use shardmerge_tests::{
    checkpoint_files, family_and_linear_recipe, generate_family, is_checkpoint_file, ok, pb,
    run_cli, shardmerge_bin, Cluster, S3Server,
};

const HOSTILE: &str = env!("CARGO_BIN_EXE_hostile-worker");

/// The models and recipe in `dir`, and the embedded run's checkpoint in `dir/local`.
fn reference(bin: &Path, dir: &Path) {
    family_and_linear_recipe(dir, 4, 256);
    let args = ["run", "r.yml", "local", "-q", "--task-size", "128KiB"];
    ok(&run_cli(bin, &[], dir, &args), "shardmerge run");
}

/// A coordinator auditing every task, `honest` honest workers and one hostile worker that
/// lies on every write task, all polling before the job is submitted.
fn cluster(bin: &Path, honest: usize, mode: &str) -> (Cluster, usize) {
    cluster_with(bin, Vec::new(), honest, mode)
}

fn cluster_with(
    bin: &Path,
    env: Vec<(String, String)>,
    honest: usize,
    mode: &str,
) -> (Cluster, usize) {
    let args = ["--audit-fraction", "1", "--audit-seed", "3"];
    let mut c = Cluster::start_with(bin, env, 5.0, honest, &args);
    let h = c.add_hostile_worker(
        Path::new(HOSTILE),
        &[
            "--id",
            "hostile",
            "--lie-fraction",
            "1",
            "--seed",
            "7",
            "--mode",
            mode,
        ],
    );
    std::thread::sleep(Duration::from_millis(800));
    (c, h)
}

fn submit(c: &Cluster, dir: &Path, out: &str) -> String {
    let args = [
        "submit",
        "r.yml",
        out,
        "--coordinator",
        &c.url,
        "--task-size",
        "128KiB",
    ];
    ok(&c.cli(dir, &args), "shardmerge submit")
        .trim()
        .to_string()
}

fn wait_until_ended(c: &Cluster, id: &str) -> pb::JobStatus {
    let start = Instant::now();
    loop {
        let st = c.job(id);
        if matches!(
            pb::JobState::try_from(st.state),
            Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
        ) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "job did not end: {st:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lies_told(c: &Cluster, h: usize) -> usize {
    c.log(&format!("worker{h}.log"))
        .lines()
        .filter(|l| l.contains("lying on job"))
        .count()
}

#[test]
fn a_zero_writing_worker_is_caught_quarantined_and_its_tasks_run_again() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    reference(&bin, dir);
    for mode in ["zeros", "nothing"] {
        let (mut c, h) = cluster(&bin, 2, mode);
        let out = format!("out-{mode}");
        let id = submit(&c, dir, &out);
        let st = wait_until_ended(&c, &id);
        assert_eq!(
            st.state,
            pb::JobState::Succeeded as i32,
            "{mode}: {st:?}\n{}",
            c.logs()
        );
        assert!(
            lies_told(&c, h) > 0,
            "{mode}: the hostile worker got no task\n{}",
            c.logs()
        );
        assert_eq!(st.quarantined, ["hostile"], "{mode}: {st:?}");
        assert!(
            st.audits_failed >= 1 && st.audits_passed >= 1,
            "{mode}: {st:?}"
        );
        // byte for byte the embedded run's checkpoint, and its data checks out
        assert!(
            checkpoint_files(&dir.join(&out)) == checkpoint_files(&dir.join("local")),
            "{mode}: the checkpoint differs from the embedded run's"
        );
        let v = ok(&c.cli(dir, &["verify", "--data", &out]), "verify --data");
        assert!(v.contains("data ok"), "{v}");
        // reported: status, the coordinator's log; the hostile worker was refused and stopped
        let line = ok(
            &c.cli(dir, &["status", &id, "--coordinator", &c.url]),
            "status",
        );
        assert!(
            line.contains("quarantined") && line.contains("hostile"),
            "{line}"
        );
        let log = c.log("coordinator.log");
        assert!(log.contains("audits: 100.00% of write tasks"), "{log}");
        assert!(
            log.contains("worker process \"hostile\" quarantined"),
            "{log}"
        );
        let exit = c.wait_worker(h, Duration::from_secs(20));
        assert_eq!(exit.and_then(|s| s.code()), Some(3), "{}", c.logs());
        assert!(c.log(&format!("worker{h}.log")).contains("quarantined"));
    }
}

#[test]
fn two_worker_processes_that_disagree_fail_the_job_cleanly() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    reference(&bin, dir);
    let (c, h) = cluster(&bin, 1, "zeros");
    let id = submit(&c, dir, "out");
    let st = wait_until_ended(&c, &id);
    assert_eq!(
        st.state,
        pb::JobState::Failed as i32,
        "{st:?}\n{}",
        c.logs()
    );
    assert!(lies_told(&c, h) > 0, "{}", c.logs());
    assert!(st.error.contains("no third worker process"), "{}", st.error);
    assert!(st.quarantined.is_empty(), "nobody can be blamed: {st:?}");
    let left = std::fs::read_dir(dir.join("out"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().ends_with(".json")),
        "a failed job leaves no checkpoint: {left:?}"
    );
}

#[test]
fn over_s3_a_lying_worker_is_caught_and_its_parts_are_uploaded_again() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    let s3 = S3Server::shared();
    s3.create_bucket("audits", true);
    let bucket = s3.bucket("audits");
    for m in generate_family(dir, 2, 4, 768) {
        let n = m.file_name().expect("name").to_string_lossy().into_owned();
        bucket.upload_dir(&m, &format!("models/{n}"));
    }
    let recipe = |m0: &str, m1: &str| {
        format!("merge_method: linear\nmodels:\n- model: {m0}\n  parameters:\n    weight: 0.5\n- model: {m1}\n  parameters:\n    weight: 0.5\n")
    };
    std::fs::write(dir.join("local.yml"), recipe("m0", "m1")).expect("write");
    let s3_recipe = recipe(&bucket.uri("models/m0"), &bucket.uri("models/m1"));
    std::fs::write(dir.join("r.yml"), s3_recipe).expect("write");
    let args = ["run", "local.yml", "local", "-q", "--task-size", "5MiB"];
    ok(&run_cli(&bin, &[], dir, &args), "shardmerge run");
    for mode in ["zeros", "nothing"] {
        let (mut c, h) = cluster_with(&bin, s3.env(), 2, mode);
        let out = bucket.uri(&format!("out-{mode}"));
        let args = ["submit", "r.yml", &out, "--coordinator", &c.url];
        let id = ok(&c.cli(dir, &args), "submit").trim().to_string();
        let st = wait_until_ended(&c, &id);
        assert_eq!(
            st.state,
            pb::JobState::Succeeded as i32,
            "{mode}: {st:?}\n{}",
            c.logs()
        );
        assert!(
            lies_told(&c, h) > 0,
            "{mode}: the hostile worker got no task\n{}",
            c.logs()
        );
        assert_eq!(st.quarantined, ["hostile"], "{mode}: {st:?}");
        let want = checkpoint_files(&dir.join("local"));
        let prefix = format!("out-{mode}");
        let names: Vec<String> = bucket
            .list(&prefix)
            .into_iter()
            .filter(|n| is_checkpoint_file(n))
            .collect();
        assert_eq!(names, want.keys().cloned().collect::<Vec<_>>(), "{mode}");
        for (name, bytes) in &want {
            let got = bucket
                .get(&format!("{prefix}/{name}"))
                .expect("output file");
            assert!(
                got == *bytes,
                "{mode}: {name} differs from the embedded run's"
            );
        }
        let v = ok(&c.cli(dir, &["verify", "--data", &out]), "verify --data");
        assert!(v.contains("data ok"), "{v}");
        let exit = c.wait_worker(h, Duration::from_secs(20));
        assert_eq!(exit.and_then(|s| s.code()), Some(3), "{}", c.logs());
    }
}
