//! The command line's argument groups: engine and merge options, the services' security,
//! operations and limits flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::job::SubmitOptions;
use crate::remote::ServeSecurity;
use crate::{embedded, size};
use shardmerge_proto as pb;
use shardmerge_worker::client::ClientOptions;
use shardmerge_worker::exec::RowCache;

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum LogFormat {
    Human,
    Json,
}

/// The row cache: where statistics passes keep the input rows they read, so the tensor's next
/// passes and its write task do not read them from storage again.
#[derive(clap::Args, Clone, Debug)]
pub(super) struct ScratchArgs {
    /// Folder for the row cache (default: the system's temporary folder); a fresh sub-folder
    /// is made in it and removed at exit
    #[arg(long, value_name = "DIR", env = "SHARDMERGE_SCRATCH")]
    pub(super) scratch: Option<PathBuf>,
    /// Most bytes the row cache keeps on the scratch disk (0: none, every statistics pass
    /// reads storage again)
    #[arg(long, default_value = "8GiB", value_parser = size::parse)]
    pub(super) scratch_limit: u64,
}

impl ScratchArgs {
    /// The row cache these flags ask for (none with a zero limit).
    pub(super) fn cache(&self) -> Result<Option<Arc<RowCache>>> {
        if self.scratch_limit == 0 {
            return Ok(None);
        }
        let c = RowCache::new(self.scratch.as_deref(), self.scratch_limit).map_err(|e| {
            let at = self.scratch.as_deref().map_or_else(
                || std::env::temp_dir().display().to_string(),
                |p| p.display().to_string(),
            );
            Error::usage(
                at,
                format!("cannot make the row cache's scratch folder: {e}"),
            )
        })?;
        Ok(Some(Arc::new(c)))
    }
}

/// Options of the long-running services (`coordinator`, `worker`) for running them operated.
#[derive(clap::Args, Clone, Debug)]
pub(super) struct OpsArgs {
    /// Serve Prometheus metrics on http://ADDR/metrics (and /ready, /healthz for probes)
    #[arg(long, value_name = "ADDR", env = "SHARDMERGE_METRICS_LISTEN")]
    pub(super) metrics_listen: Option<SocketAddr>,
}

#[derive(clap::Args, Clone, Debug)]
pub(super) struct EngineArgs {
    /// Largest output shard (mergekit syntax: 5B = 5e9 bytes; also 500M, 2GiB, ...)
    #[arg(long, default_value = "5B", value_parser = size::parse)]
    pub(super) out_shard_size: u64,
    /// Target output bytes per task
    #[arg(long, default_value = "4MiB", value_parser = size::parse)]
    pub(super) task_size: u64,
    /// Memory this process may use in all, past its fixed size: the job's plan (about 1.5 KiB
    /// per output tensor and 320 B per tensor input) comes out of it first, the worker slots
    /// share the rest; tasks are cut to fit, and a merge whose plan leaves too little is refused
    #[arg(long, default_value = "1GiB", value_parser = size::parse)]
    pub(super) memory_limit: u64,
    /// Worker slots (default: the number of cores)
    #[arg(long)]
    pub(super) workers: Option<usize>,
    /// Seed for randomised methods (overrides the recipe's random_seed)
    #[arg(long)]
    pub(super) random_seed: Option<u64>,
    /// Random draws of DARE/DELLA: mergekit's (torch's CPU stream, same masks as mergekit
    /// with the same seed) or counter (a hash per element; no stream jumps)
    #[arg(long, value_enum, default_value_t = RngArg::Mergekit)]
    pub(super) rng: RngArg,
    #[command(flatten)]
    pub(super) merge: MergeArgs,
    #[command(flatten)]
    pub(super) scratch: ScratchArgs,
}

/// The job options of `shardmerge submit` (the workers' own limits are theirs to set).
#[derive(clap::Args, Clone, Debug)]
pub(super) struct SubmitJobArgs {
    /// Largest output shard (mergekit syntax: 5B = 5e9 bytes; also 500M, 2GiB, ...)
    #[arg(long, default_value = "5B", value_parser = size::parse)]
    out_shard_size: u64,
    /// Target output bytes per task
    #[arg(long, default_value = "4MiB", value_parser = size::parse)]
    task_size: u64,
    /// Memory one worker thread may use for a task (the workers' --memory-limit divided by
    /// their --threads); tasks are cut to fit
    #[arg(long, default_value = "512MiB", value_parser = size::parse)]
    memory_limit: u64,
    /// Seed for randomised methods (overrides the recipe's random_seed)
    #[arg(long)]
    random_seed: Option<u64>,
    /// Random draws of DARE/DELLA (see `run --help`)
    #[arg(long, value_enum, default_value_t = RngArg::Mergekit)]
    rng: RngArg,
    /// Replace what OUT holds (see `run --help`); without it an OUT that holds files is
    /// refused
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    merge: MergeArgs,
}

impl SubmitJobArgs {
    /// The `JobOptions` sent with the job.
    pub(super) fn options(&self) -> pb::JobOptions {
        pb::JobOptions {
            out_shard_size: self.out_shard_size,
            task_size: self.task_size.max(1),
            slot_memory: self.memory_limit.max(1 << 20),
            seed: self.random_seed,
            base_dir: embedded::cwd().to_string_lossy().into_owned(),
            min_part_size: 0,
            rng: self.rng.proto() as i32,
            overwrite: self.overwrite,
            unsafe_truncate_embeddings: self.merge.unsafe_truncate_embeddings,
            compute_float32: self.merge.compute_dtype == Some(ComputeDtype::Float32),
            points: 1,
        }
    }
}

/// Options that change what a merge computes (run, plan and submit).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub(super) struct MergeArgs {
    /// Merge models whose vocabularies differ in size by keeping only the embedding rows all
    /// of them have (rows past the smallest vocabulary are dropped; without this such a
    /// merge is refused)
    #[arg(long)]
    pub(super) unsafe_truncate_embeddings: bool,
    /// Compute in float32 and round once, even when the recipe's `dtype` is bfloat16 or
    /// float16 (by default every operation rounds to that dtype, as in mergekit)
    #[arg(long, value_enum)]
    pub(super) compute_dtype: Option<ComputeDtype>,
}

/// `--compute-dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum ComputeDtype {
    Float32,
}

/// `--rng`: see `pb::Rng`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RngArg {
    Mergekit,
    Counter,
}

impl RngArg {
    pub(super) fn proto(self) -> pb::Rng {
        match self {
            RngArg::Mergekit => pb::Rng::Mergekit,
            RngArg::Counter => pb::Rng::Counter,
        }
    }
}

impl EngineArgs {
    pub(super) fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1)
    }

    pub(super) fn submit_options(&self) -> SubmitOptions {
        SubmitOptions {
            out_shard_size: self.out_shard_size,
            task_size: self.task_size.max(1),
            slot_memory: (self.memory_limit / self.workers() as u64).max(1 << 20),
            seed: self.random_seed,
            rng: self.rng.proto(),
            base_dir: embedded::cwd(),
            unsafe_truncate_embeddings: self.merge.unsafe_truncate_embeddings,
            compute_float32: self.merge.compute_dtype == Some(ComputeDtype::Float32),
            budget: Some(crate::job::ProcessBudget {
                limit: self.memory_limit,
                slots: self.workers(),
            }),
            ..Default::default()
        }
    }
}

/// Access control and TLS of `shardmerge coordinator` (see docs/security.md).
#[derive(clap::Args, Clone, Debug)]
pub(super) struct ServeSecurityArgs {
    /// File holding the token every call must carry (`authorization: Bearer TOKEN`); it grants
    /// every RPC. Without it the coordinator answers anyone, and refuses to start on a
    /// non-loopback address unless --insecure-no-auth is given
    #[arg(long, help_heading = "Security")]
    pub(super) token_file: Option<PathBuf>,
    /// File holding a second token that grants only the worker RPCs (poll, renew, complete,
    /// fail): a worker's credential cannot submit, list or cancel jobs. Needs --token-file
    #[arg(long, help_heading = "Security")]
    pub(super) worker_token_file: Option<PathBuf>,
    /// Serve without a token on a non-loopback address (anyone who reaches the port may
    /// submit, read and cancel jobs): only behind another access control
    #[arg(long, help_heading = "Security")]
    pub(super) insecure_no_auth: bool,
    /// PEM certificate (chain) to serve TLS with; clients then use https:// URLs
    #[arg(long, requires = "tls_key", help_heading = "Security")]
    pub(super) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, requires = "tls_cert", help_heading = "Security")]
    pub(super) tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate it signed (mutual TLS)
    #[arg(long, requires = "tls_cert", help_heading = "Security")]
    pub(super) tls_client_ca: Option<PathBuf>,
    /// Storage prefix submitted jobs may read and write (repeatable): a local folder,
    /// file://PATH or s3://bucket/prefix. Jobs with an input or output outside every prefix
    /// are refused. Without --allow (or --allow-any) every job is refused
    #[arg(long = "allow", value_name = "PREFIX", help_heading = "Security")]
    pub(super) allow: Vec<String>,
    /// Let jobs read and write anything the coordinator's credentials reach (single-user
    /// setups)
    #[arg(long, conflicts_with = "allow", help_heading = "Security")]
    pub(super) allow_any: bool,
}

impl ServeSecurityArgs {
    pub(super) fn into_remote(self) -> ServeSecurity {
        ServeSecurity {
            token_file: self.token_file,
            worker_token_file: self.worker_token_file,
            insecure_no_auth: self.insecure_no_auth,
            tls: crate::tls::ServerTls {
                cert: self.tls_cert,
                key: self.tls_key,
                client_ca: self.tls_client_ca,
            },
            allow: self.allow,
            allow_any: self.allow_any,
        }
    }
}

/// How a client (worker, submit, status, cancel) authenticates to the coordinator and
/// verifies it (see docs/security.md).
#[derive(clap::Args, Clone, Debug)]
pub(super) struct ClientSecurityArgs {
    /// File holding the coordinator's token (a worker: its worker token); else the token in
    /// SHARDMERGE_TOKEN, if set
    #[arg(long, env = "SHARDMERGE_TOKEN_FILE", help_heading = "Security")]
    pub(super) token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify an https:// coordinator with (default: the system's
    /// roots)
    #[arg(long, env = "SHARDMERGE_TLS_CA", help_heading = "Security")]
    pub(super) tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires mutual TLS
    #[arg(long, requires = "tls_client_key", help_heading = "Security")]
    pub(super) tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert
    #[arg(long, requires = "tls_client_cert", help_heading = "Security")]
    pub(super) tls_client_key: Option<PathBuf>,
}

impl ClientSecurityArgs {
    pub(super) fn options(&self) -> Result<ClientOptions> {
        ClientOptions::load(
            self.token_file.as_deref(),
            self.tls_ca.as_deref(),
            self.tls_client_cert.as_deref(),
            self.tls_client_key.as_deref(),
        )
        .map_err(|e| Error::usage("", e))
    }
}

/// The coordinator's limits (`shardmerge coordinator`).
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Seconds a task may run under one lease, renewals included; past it, renewals are
    /// refused, the lease expires and the task runs on another worker
    #[arg(long, default_value_t = 3600.0)]
    pub(super) max_task_time: f64,
    /// Leases one worker id may hold at once (and so receive from one poll)
    #[arg(long, default_value_t = crate::job::limits::DEFAULT_MAX_SLOTS_PER_WORKER)]
    pub(super) max_slots_per_worker: u32,
    /// Seconds an ended job stays in memory; then only its final status is kept (and the
    /// journal's, with --state)
    #[arg(long, default_value_t = 3600.0)]
    pub(super) job_retention: f64,
    /// Jobs held in memory at once; a submission past it is refused (RESOURCE_EXHAUSTED)
    /// unless an ended job can make room
    #[arg(long, default_value_t = crate::job::limits::DEFAULT_MAX_JOBS)]
    pub(super) max_jobs: usize,
    /// Seconds planning one submitted job may take (parsing its recipe, reading its inputs'
    /// headers, cutting it into tasks); a job that takes longer is refused
    #[arg(long, default_value_t = 300.0)]
    pub(super) max_plan_time: f64,
    /// Memory the plans of the jobs held at once may take in all (a plan takes about 1.5 KiB
    /// per output tensor and 320 B per tensor input: a few MiB for a 70B merge); a submission
    /// past it is refused (RESOURCE_EXHAUSTED) unless ended jobs can make room
    #[arg(long, default_value = "4GiB", value_parser = size::parse)]
    pub(super) max_plan_memory: u64,
    /// Fraction of write tasks another worker process computes again, writing nothing, to
    /// check the first worker's result (0: no audits; 1: every task). A worker whose result
    /// is found wrong is quarantined and its tasks run again; a worker lying on a fraction q of
    /// its n tasks is caught with probability 1-(1-F)^(q·n) (docs/security.md). Needs at least
    /// two worker processes (three to decide a disagreement)
    #[arg(long, default_value_t = 0.01)]
    pub(super) audit_fraction: f64,
    /// Seed of the audit sample (which tasks are audited); random by default, so that no
    /// worker can tell which of its results go unchecked. For replaying a run
    #[arg(long)]
    pub(super) audit_seed: Option<u64>,
}

impl LimitArgs {
    pub(super) fn to_limits(&self) -> Result<crate::job::Limits> {
        if self.max_slots_per_worker == 0 || self.max_jobs == 0 {
            let flag = if self.max_jobs == 0 {
                "--max-jobs"
            } else {
                "--max-slots-per-worker"
            };
            return Err(Error::usage(flag, "give at least 1"));
        }
        Ok(crate::job::Limits {
            max_task_time: seconds("--max-task-time", self.max_task_time)?,
            max_slots_per_worker: self.max_slots_per_worker,
            job_retention: Duration::try_from_secs_f64(self.job_retention)
                .ok()
                .filter(|_| self.job_retention.is_finite())
                .ok_or_else(|| {
                    Error::usage(
                        format!("--job-retention {}", self.job_retention),
                        "give a number of seconds (0 or more)",
                    )
                })?,
            max_jobs: self.max_jobs,
            max_plan_time: seconds("--max-plan-time", self.max_plan_time)?,
            max_plan_memory: self.max_plan_memory,
            audit: self.audit()?,
        })
    }

    fn audit(&self) -> Result<crate::job::AuditRules> {
        let f = self.audit_fraction;
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::usage(
                format!("--audit-fraction {f}"),
                "give a fraction from 0 (no audits) to 1 (every task)",
            ));
        }
        let seed = self.audit_seed.unwrap_or_else(|| {
            let hex = crate::job::lease::fresh_lease_id();
            u64::from_str_radix(&hex[..16], 16).unwrap_or(0)
        });
        Ok(crate::job::AuditRules { fraction: f, seed })
    }
}

/// A positive, finite number of seconds given to `flag`.
pub(super) fn seconds(flag: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::usage(
            format!("{flag} {v}"),
            "give a positive number of seconds",
        ));
    }
    Duration::try_from_secs_f64(v)
        .map_err(|_| Error::usage(format!("{flag} {v}"), "too large a number of seconds"))
}
