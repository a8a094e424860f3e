//! Output safety with real processes: an `--overwrite` run killed (SIGKILL) part-way leaves the
//! old checkpoint byte-identical and `verify --data` accepts it; the same rules on S3 through a
//! coordinator and workers (a second submit without `--overwrite` is refused, a cancelled
//! overwrite leaves the old checkpoint, a finished one leaves exactly the new checkpoint).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardmerge_tests::{generate_family, ok, pb, run_cli, shardmerge_bin, Cluster, S3Server};

/// Every file directly in `dir` and its CRC-32C (the files are too big to keep in memory twice).
fn crcs(dir: &Path) -> BTreeMap<String, (u64, u32)> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        if e.file_type().expect("file type").is_file() {
            let b = std::fs::read(e.path()).expect("read");
            m.insert(
                e.file_name().to_string_lossy().into_owned(),
                (b.len() as u64, crc32c::crc32c(&b)),
            );
        }
    }
    m
}

fn recipe(weight: f32) -> String {
    format!(
        "merge_method: linear\ndtype: float32\nmodels:\n\
         - model: m0\n  parameters:\n    weight: {weight}\n\
         - model: m1\n  parameters:\n    weight: 0.3\n\
         - model: m2\n  parameters:\n    weight: 0.2\n"
    )
}

/// An overwrite killed mid-job leaves the old checkpoint byte-identical (and valid); a second
/// overwrite then completes and leaves exactly the new checkpoint.
#[test]
fn killed_overwrite_leaves_the_old_checkpoint() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    // 3 models of 12 layers of 4 × 1024² f32: 192 MiB each; the merge takes seconds
    generate_family(w, 3, 12, 1024);
    std::fs::write(w.join("old.yml"), recipe(0.5)).expect("write");
    std::fs::write(w.join("new.yml"), recipe(0.9)).expect("write");
    let out = w.join("out");
    let out_s = out.to_str().expect("utf-8 path");
    ok(
        &run_cli(
            &bin,
            &[],
            w,
            &["run", "old.yml", out_s, "-q", "--out-shard-size", "70M"],
        ),
        "first run",
    );
    let old = crcs(&out);
    let shards = old.keys().filter(|n| n.starts_with("model-0000")).count();
    assert!(shards >= 2, "expected a sharded first run: {old:?}");
    let mut child = Command::new(&bin)
        .args([
            "run",
            "new.yml",
            out_s,
            "-q",
            "--overwrite",
            "--workers",
            "1",
        ])
        .current_dir(w)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // wait until it writes its new data, then a little more
    let start = Instant::now();
    loop {
        let writing = std::fs::read_dir(&out)
            .expect("read out")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial"));
        if writing {
            break;
        }
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "finished too soon"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never started writing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the overwrite finished before it could be killed: use a bigger model"
    );
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let after: BTreeMap<_, _> = crcs(&out)
        .into_iter()
        // (a killed run leaves its temporary files and its claim's lock file, no longer locked)
        .filter(|(n, _)| !n.ends_with(".partial") && n != ".shardmerge-claim")
        .collect();
    assert_eq!(
        after, old,
        "the killed overwrite changed the old checkpoint"
    );
    let v = ok(
        &run_cli(&bin, &[], w, &["verify", "--data", out_s]),
        "verify --data after the kill",
    );
    assert!(v.contains(&format!("data ok: {shards} file(s)")), "{v}");
    // a complete overwrite into one file: exactly the new checkpoint, no stale shard, no
    // leftover of the killed run
    ok(
        &run_cli(
            &bin,
            &[],
            w,
            &["run", "new.yml", out_s, "-q", "--overwrite"],
        ),
        "overwrite",
    );
    let names: Vec<String> = crcs(&out).into_keys().collect();
    assert_eq!(
        names,
        [
            "README.md",
            "model.safetensors",
            "model.safetensors.index.json",
            "shardmerge.checksums.json"
        ]
    );
    ok(
        &run_cli(&bin, &[], w, &["verify", "--data", out_s]),
        "verify --data after the overwrite",
    );
}

/// `shardmerge submit RECIPE OUT` to `cluster` (5 MiB tasks), with `extra` options.
fn submit(
    cluster: &Cluster,
    w: &Path,
    recipe: &str,
    out: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "submit",
        recipe,
        out,
        "--coordinator",
        &cluster.url,
        "--task-size",
        "5MiB",
    ];
    args.extend_from_slice(extra);
    cluster.cli(w, &args)
}

/// On S3 through a coordinator: a non-empty output without --overwrite is refused; an output
/// inside an input is refused; a cancelled overwrite leaves the old checkpoint; a finished
/// overwrite from three shards to one leaves exactly the new checkpoint, and `verify --data`
/// reads it back from the bucket.
#[test]
fn s3_overwrite_is_refused_then_atomic() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    // 128 MiB per model: 26 tasks of 5 MiB, enough to cancel the job part-way
    let models = generate_family(w, 3, 8, 1024);
    s3.create_bucket("overwrite", true);
    let bucket = s3.bucket("overwrite");
    let mut text = recipe(0.5);
    let mut text2 = recipe(0.9);
    for m in &models {
        let name = m.file_name().expect("name").to_string_lossy().into_owned();
        bucket.upload_dir(m, &format!("models/{name}"));
        let uri = bucket.uri(&format!("models/{name}"));
        text = text.replace(&format!("model: {name}\n"), &format!("model: {uri}\n"));
        text2 = text2.replace(&format!("model: {name}\n"), &format!("model: {uri}\n"));
    }
    std::fs::write(w.join("old.yml"), &text).expect("write");
    std::fs::write(w.join("new.yml"), &text2).expect("write");
    let out = bucket.uri("out");
    let mut cluster = Cluster::start(&bin, s3.env(), 10.0, 2);
    ok(
        &submit(
            &cluster,
            w,
            "old.yml",
            &out,
            &["--wait", "--out-shard-size", "50M"],
        ),
        "first submit",
    );
    let old = bucket.output_objects("out");
    assert!(
        old.keys().filter(|n| n.starts_with("model-0000")).count() >= 2,
        "expected a sharded first run: {:?}",
        old.keys()
    );
    ok(
        &cluster.cli(w, &["verify", "--data", &out]),
        "verify --data",
    );
    // without --overwrite: refused, nothing changes
    let r = submit(&cluster, w, "new.yml", &out, &["--wait"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("--overwrite"), "{err}");
    // into an input model's folder: refused even with --overwrite
    let r = submit(
        &cluster,
        w,
        "new.yml",
        &bucket.uri("models/m1/merged"),
        &["--overwrite"],
    );
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("is inside the folder of input model"), "{err}");
    assert_eq!(bucket.list("models/m1"), ["model.safetensors"]);
    // an overwrite cancelled part-way (its first parts uploaded, no workers but one): the old
    // checkpoint stays byte-identical
    for i in 0..2 {
        cluster.kill_worker(i);
    }
    let id = ok(
        &submit(&cluster, w, "new.yml", &out, &["--overwrite"]),
        "submit --overwrite",
    );
    let id = id.trim().to_string();
    cluster.add_worker();
    let start = Instant::now();
    while cluster.job(&id).tasks_done == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "no task ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(
        &cluster.cli(w, &["cancel", &id, "--coordinator", &cluster.url]),
        "cancel",
    );
    let st = cluster.job(&id);
    assert_eq!(st.state, pb::JobState::Cancelled as i32, "{st:?}");
    assert!(
        bucket.output_objects("out") == old,
        "the cancelled overwrite changed the old checkpoint"
    );
    ok(
        &cluster.cli(w, &["verify", "--data", &out]),
        "verify --data",
    );
    // a finished overwrite: exactly the new checkpoint, one file
    cluster.add_worker();
    ok(
        &submit(&cluster, w, "new.yml", &out, &["--wait", "--overwrite"]),
        "submit --overwrite",
    );
    let names: Vec<String> = bucket.output_objects("out").into_keys().collect();
    assert_eq!(
        names,
        [
            "README.md",
            "model.safetensors",
            "model.safetensors.index.json",
            "shardmerge.checksums.json"
        ]
    );
    ok(
        &cluster.cli(w, &["verify", "--data", &out]),
        "verify --data",
    );
}
