//! `hostile-worker`: a worker that lies, for the audit and chaos tests. It holds the worker
//! token and polls, runs and reports like `shardmerge worker`, but on a fraction of its write
//! tasks (`--lie-fraction`, drawn per task from `--seed`, which it prints) it computes zeros in
//! place of the task's bytes and reports them with their valid size and CRC-32C: `--mode zeros`
//! writes the zeros to the output, `--mode nothing` writes nothing. It lies the same way when it
//! audits another worker's task. Statistics tasks it runs honestly. It exits (status 3) when the
//! coordinator refuses it (a quarantine), saying how many tasks it lied on.
//!
//!   hostile-worker --coordinator http://127.0.0.1:50051 [--token-file FILE] [--id hostile]
//!       [--lie-fraction 1.0] [--seed N] [--mode zeros|nothing] [--threads 1]

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use shardmerge_proto as pb;
use shardmerge_worker::client::{ClientOptions, RemoteSource};
use shardmerge_worker::exec::Executor;
use shardmerge_worker::pull::{self, LoopOptions, SourceError, WorkSource};
use shardmerge_worker::storage::Resolver;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Write zeros where the task's bytes go, and report them
    Zeros,
    /// Write nothing, and report zeros
    Nothing,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    coordinator: String,
    /// The worker token (as `shardmerge worker --token-file`)
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Its worker id (its slots poll as ID/0, ID/1, ...)
    #[arg(long, default_value = "hostile")]
    id: String,
    /// The fraction of write tasks (and audits) it lies on
    #[arg(long, default_value_t = 1.0)]
    lie_fraction: f64,
    /// Seeds which tasks it lies on; random (and printed) when not given
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, value_enum, default_value = "zeros")]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// The coordinator, seen through a liar: the write tasks it lies on are rewritten into one
/// literal of zeros before they run.
struct Hostile {
    inner: RemoteSource,
    fraction: f64,
    seed: u64,
    mode: Mode,
    lied: AtomicU64,
    /// Lease id -> the part number to report, for tasks that ran as audits to write nothing.
    parts: Mutex<HashMap<String, u32>>,
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Hostile {
    /// Whether it lies on `t`: a write task drawn below the fraction, by (seed, job, task).
    fn lies(&self, t: &pb::Task) -> bool {
        if !matches!(t.kind, Some(pb::task::Kind::Write(_))) {
            return false;
        }
        let job = t.job_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let draw = mix(self.seed ^ mix(job ^ mix(t.task_id)));
        ((draw >> 11) as f64 / (1u64 << 53) as f64) < self.fraction
    }

    /// Rewrites write task `t` (leased as `lease`) to produce zeros.
    fn corrupt(&self, lease: &str, t: &mut pb::Task) {
        let Some(pb::task::Kind::Write(w)) = t.kind.as_mut() else {
            return;
        };
        let Some(out) = w.output.as_ref() else {
            return;
        };
        let part = match &out.sink {
            Some(pb::output_target::Sink::Multipart(m)) => m.part_index,
            _ => 0,
        };
        w.tensors.clear();
        w.segments = vec![pb::Segment {
            kind: Some(pb::segment::Kind::Literal(vec![0u8; out.length as usize])),
        }];
        if self.mode == Mode::Nothing && !t.audit {
            t.audit = true;
            if let Ok(mut p) = self.parts.lock() {
                p.insert(lease.to_string(), part);
            }
        }
        let n = self.lied.fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!(
            "hostile-worker: lying on job {} task {}{} ({n} so far)",
            t.job_id,
            t.task_id,
            if t.audit { " (audit)" } else { "" }
        );
    }
}

#[async_trait]
impl WorkSource for Hostile {
    async fn poll(&self, req: pb::PollWorkRequest) -> Result<pb::PollWorkResponse, SourceError> {
        let mut r = self.inner.poll(req).await?;
        for l in &mut r.leases {
            let lease = l.lease_id.clone();
            if let Some(t) = l.task.as_mut() {
                if self.lies(t) {
                    self.corrupt(&lease, t);
                }
            }
        }
        Ok(r)
    }
    async fn renew(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, SourceError> {
        self.inner.renew(req).await
    }
    async fn complete(
        &self,
        mut req: pb::CompleteTaskRequest,
    ) -> Result<pb::CompleteTaskResponse, SourceError> {
        let part = self
            .parts
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&req.lease_id));
        // a write it ran as an audit (to write nothing): forge the receipt of a part written
        // (its number, and the bytes written, which an audit reports as 0)
        if let (Some(n), Some(r)) = (part, req.result.as_mut()) {
            if let Some(p) = r.part.as_mut() {
                p.part_index = n;
                r.bytes_written = p.size;
            }
        }
        self.inner.complete(req).await
    }
    async fn fail(&self, req: pb::FailTaskRequest) -> Result<(), SourceError> {
        self.inner.fail(req).await
    }
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    mix(t ^ ((std::process::id() as u64) << 32))
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = Args::parse();
    let opts = match ClientOptions::load(a.token_file.as_deref(), None, None, None) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("hostile-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let source = match RemoteSource::with_options(&a.coordinator, &opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hostile-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let seed = a.seed.unwrap_or_else(random_seed);
    eprintln!(
        "hostile-worker {}: lie-fraction {} seed {seed} mode {:?}",
        a.id, a.lie_fraction, a.mode
    );
    let hostile = Arc::new(Hostile {
        inner: source.clone(),
        fraction: a.lie_fraction,
        seed,
        mode: a.mode,
        lied: AtomicU64::new(0),
        parts: Mutex::new(HashMap::new()),
    });
    let threads = a.threads.max(1);
    let opts = LoopOptions {
        worker_id: a.id.clone(),
        slots: threads,
        slot_memory: (256u64 << 20) / threads as u64,
        max_idle: Duration::from_millis(250),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let run = tokio::spawn(pull::run(
        hostile.clone(),
        Executor::new(Resolver::new()),
        opts,
        stop_rx,
    ));
    let why = source.refused().await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), run).await;
    eprintln!(
        "hostile-worker {}: refused by the coordinator after lying on {} task(s) (seed {seed}): \
         {why}",
        a.id,
        hostile.lied.load(Ordering::Relaxed)
    );
    ExitCode::from(3)
}
