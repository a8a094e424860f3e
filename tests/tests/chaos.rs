//! The chaos test: a distributed TIES merge over the S3 test server, with `--overwrite` over an
//! old checkpoint, by two honest workers and a hostile one (`hostile-worker`: it writes zeros,
//! or nothing, on a random fraction of its write tasks and reports them with a valid CRC; the
//! coordinator audits every task), while a driver does at random, one at a time: kill an
//! honest worker (SIGKILL) and start another, kill and restart the coordinator (it resumes from
//! its journal in the bucket), stop the S3 server for a while and start it again, cut every
//! connection open through the TCP proxies in front of S3 and of the coordinator. Every run
//! must end with the embedded run's checkpoint, byte for byte, or with a failed job that left
//! the old checkpoint as it was: never anything else.
//!
//! The seed is printed first; `CHAOS_SEED=N` replays a run's choices (the timing of the
//! processes is the machine's), `CHAOS_ACTIONS=N` sets how many faults (default 8).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use shardmerge_tests::proxy::Proxy;
use shardmerge_tests::{
    block_on, checkpoint_files, generate_family, is_checkpoint_file, ok, pb, run_cli,
    shardmerge_bin, Bucket, Cluster, S3Server,
};

/// SplitMix64: a few lines, and the same choices for a seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CHAOS_SEED={s:?}: not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

fn actions() -> usize {
    std::env::var("CHAOS_ACTIONS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(8)
}

const RECIPE: &str = "merge_method: ties\ndtype: float32\nbase_model: M/m0\nmodels:\n\
- model: M/m1\n  parameters: {weight: 1.0, density: 0.5}\n\
- model: M/m2\n  parameters: {weight: 0.7, density: 0.4}\n";

const OLD_RECIPE: &str = "merge_method: linear\ndtype: float32\nmodels:\n\
- model: M/m1\n  parameters: {weight: 0.5}\n- model: M/m2\n  parameters: {weight: 0.5}\n";

/// The coordinator's view of a job, or `None` while it cannot be reached (restarting).
fn job(url: &str, id: &str) -> Option<pb::JobStatus> {
    let (url, id) = (url.to_string(), id.to_string());
    block_on(async move {
        let mut c = shardmerge_worker::client::client(&url).ok()?;
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.get_job(pb::GetJobRequest { job_id: id }),
        )
        .await;
        Some(r.ok()?.ok()?.into_inner())
    })
}

fn ended(st: &pb::JobStatus) -> bool {
    st.state == pb::JobState::Succeeded as i32 || st.state == pb::JobState::Failed as i32
}

/// The faults the driver chooses from.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillWorker,
    RestartCoordinator,
    S3Down,
    CutS3Connections,
    CutCoordinatorConnections,
}

const FAULTS: [Fault; 5] = [
    Fault::KillWorker,
    Fault::RestartCoordinator,
    Fault::S3Down,
    Fault::CutS3Connections,
    Fault::CutCoordinatorConnections,
];

struct World<'a> {
    s3: &'a S3Server,
    s3_proxy: Proxy,
    coord_proxy: Proxy,
    cluster: Cluster,
    /// Indexes of the honest workers running now.
    workers: Vec<usize>,
}

impl World<'_> {
    fn inflict(&mut self, f: Fault, rng: &mut Rng) -> String {
        match f {
            Fault::KillWorker => {
                let k = rng.range(0, self.workers.len() as u64) as usize;
                let victim = self.workers.remove(k);
                self.cluster.kill_worker(victim);
                self.workers.push(self.cluster.add_worker());
                format!("killed worker {victim}, started another")
            }
            Fault::RestartCoordinator => {
                self.cluster.restart_coordinator();
                "killed and restarted the coordinator".into()
            }
            Fault::S3Down => {
                let ms = rng.range(300, 3000);
                self.s3.stop();
                std::thread::sleep(Duration::from_millis(ms));
                self.s3
                    .resume()
                    .unwrap_or_else(|e| panic!("the S3 server did not come back: {e}"));
                format!("S3 server down for {ms} ms")
            }
            Fault::CutS3Connections => {
                format!("cut {} S3 connections", self.s3_proxy.abort_all())
            }
            Fault::CutCoordinatorConnections => {
                format!(
                    "cut {} coordinator connections",
                    self.coord_proxy.abort_all()
                )
            }
        }
    }
}

/// Generates the models in `work/M`, uploads them to the bucket under `M/`, writes the recipes
/// (`local.yml` / `s3.yml`, and the old checkpoint's) and runs the embedded reference into
/// `work/reference`; the old checkpoint is uploaded to `out/`.
fn fixtures(s3: &S3Server, bin: &Path, work: &Path, bucket: &Bucket) {
    let models = work.join("M");
    generate_family(&models, 3, 3, 640);
    for m in ["m0", "m1", "m2"] {
        bucket.upload_dir(&models.join(m), &format!("M/{m}"));
    }
    let on_s3 = |r: &str| r.replace("M/", &bucket.uri("M/"));
    std::fs::write(work.join("local.yml"), RECIPE).expect("write");
    std::fs::write(work.join("s3.yml"), on_s3(RECIPE)).expect("write");
    std::fs::write(work.join("old.yml"), OLD_RECIPE).expect("write");
    for (recipe, out) in [("local.yml", "reference"), ("old.yml", "old")] {
        ok(
            &run_cli(bin, &s3.env(), work, &["run", recipe, out, "-q"]),
            "shardmerge run",
        );
    }
    bucket.upload_dir(&work.join("old"), "out");
}

#[test]
fn chaos_ends_with_the_embedded_checkpoint_or_leaves_the_old_one() {
    let seed = seed();
    let n_faults = actions();
    println!("chaos seed {seed} ({n_faults} faults); replay with CHAOS_SEED={seed}");
    eprintln!("chaos seed {seed} ({n_faults} faults); replay with CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let s3 = S3Server::start().unwrap_or_else(|e| panic!("{e}"));
    s3.create_bucket("chaos", true);
    let bucket = s3.bucket("chaos");
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    fixtures(&s3, &bin, work.path(), &bucket);
    let old = bucket.output_objects("out");

    // everything the coordinator and the workers say to S3 goes through a proxy that can cut
    // it; the reads are slowed so that the job lasts long enough for the faults
    let s3_proxy = Proxy::start(s3.endpoint.trim_start_matches("http://"));
    s3_proxy.throttle(1 << 20);
    let mut env = s3.env();
    for (k, v) in env.iter_mut() {
        if k == "AWS_ENDPOINT_URL" {
            *v = s3_proxy.url();
        }
    }
    let journal = bucket.uri("_journal");
    let audit_seed = rng.next().to_string();
    let args = [
        "--state",
        &journal,
        "--audit-fraction",
        "1",
        "--audit-seed",
        &audit_seed,
    ];
    let mut cluster = Cluster::start_with(&bin, env, 2.0, 0, &args);
    let coord_proxy = Proxy::start(&cluster.coordinator_addr());
    cluster.workers_via(&coord_proxy.url());
    let workers = vec![cluster.add_worker(), cluster.add_worker()];
    let (lie, lie_seed) = (rng.range(20, 101) as f64 / 100.0, rng.next().to_string());
    let mode = ["zeros", "nothing"][rng.range(0, 2) as usize];
    eprintln!("chaos: the hostile worker lies on {lie} of its write tasks ({mode})");
    let hostile = Path::new(env!("CARGO_BIN_EXE_hostile-worker"));
    let lie = lie.to_string();
    let hostile_args = [
        "--id",
        "hostile",
        "--lie-fraction",
        &lie,
        "--seed",
        &lie_seed,
        "--mode",
        mode,
    ];
    cluster.add_hostile_worker(hostile, &hostile_args);
    let submitted = ok(
        &cluster.cli(
            work.path(),
            &[
                "submit",
                "s3.yml",
                &bucket.uri("out"),
                "--overwrite",
                "--coordinator",
                &cluster.url,
                "--task-size",
                "1MiB",
            ],
        ),
        "shardmerge submit",
    );
    let id = submitted.trim().to_string();
    let mut world = World {
        s3: &s3,
        s3_proxy,
        coord_proxy,
        cluster,
        workers,
    };

    let start = Instant::now();
    let mut done = 0;
    while done < n_faults {
        std::thread::sleep(Duration::from_millis(rng.range(200, 2000)));
        if job(&world.cluster.url, &id).is_some_and(|st| ended(&st)) {
            break;
        }
        let f = FAULTS[rng.range(0, FAULTS.len() as u64) as usize];
        let what = world.inflict(f, &mut rng);
        done += 1;
        eprintln!("chaos {:>6.1}s: {what}", start.elapsed().as_secs_f64());
    }
    eprintln!(
        "chaos: {done} faults in {:.1}s; waiting for the job",
        start.elapsed().as_secs_f64()
    );

    let st = loop {
        if let Some(st) = job(&world.cluster.url, &id).filter(ended) {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "seed {seed}: the job did not end: {:?}\n{}",
            job(&world.cluster.url, &id),
            world.cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "chaos: job ended {:?} after {:.1}s ({} retries; audits {} passed, {} failed, {} skipped; quarantined {:?}): {}",
        pb::JobState::try_from(st.state),
        start.elapsed().as_secs_f64(),
        st.retries,
        st.audits_passed,
        st.audits_failed,
        st.audits_skipped,
        st.quarantined,
        st.error
    );
    if st.state == pb::JobState::Succeeded as i32 {
        let want = checkpoint_files(&work.path().join("reference"));
        let got: BTreeMap<String, Vec<u8>> = bucket
            .output_objects("out")
            .into_iter()
            .filter(|(n, _)| is_checkpoint_file(n))
            .collect();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "seed {seed}: the job succeeded with other files than the embedded run's"
        );
        for (name, bytes) in &want {
            assert!(
                got[name] == *bytes,
                "seed {seed}: {name} differs from the embedded run's"
            );
        }
    } else {
        assert!(
            bucket.output_objects("out") == old,
            "seed {seed}: the job failed ({}) and the old checkpoint changed",
            st.error
        );
    }
}
