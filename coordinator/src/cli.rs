//! The `shardmerge` command line (in the library so that test harnesses can build the same
//! program as their own binary).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::embedded::{self, RunOptions};
use crate::error::{Error, Result};
use crate::job::SubmitOptions;
use crate::remote::{self, ServeSecurity, SubmitArgs, WorkerOptions};
use crate::{planinfo, size, verify};
use clap::{Parser, Subcommand};
use shardmerge_proto as pb;
use shardmerge_worker::client::ClientOptions;
use shardmerge_worker::storage::Resolver;

#[derive(Parser)]
#[command(
    name = "shardmerge",
    version,
    about = "Merge large language models with mergekit recipes, in one process or as a distributed job"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines as `human` text or `json` objects (one per line, for log collectors)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SHARDMERGE_LOG_FORMAT")]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Options of the long-running services (`coordinator`, `worker`) for running them operated.
#[derive(clap::Args, Clone, Debug)]
struct OpsArgs {
    /// Serve Prometheus metrics on http://ADDR/metrics (and /ready, /healthz for probes)
    #[arg(long, value_name = "ADDR", env = "SHARDMERGE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(clap::Args, Clone, Debug)]
struct EngineArgs {
    /// Largest output shard (mergekit syntax: 5B = 5e9 bytes; also 500M, 2GiB, ...)
    #[arg(long, default_value = "5B", value_parser = size::parse)]
    out_shard_size: u64,
    /// Target output bytes per task
    #[arg(long, default_value = "4MiB", value_parser = size::parse)]
    task_size: u64,
    /// Memory the workers of this process may use in all; tasks are cut to fit
    #[arg(long, default_value = "1GiB", value_parser = size::parse)]
    memory_limit: u64,
    /// Worker slots (default: the number of cores)
    #[arg(long)]
    workers: Option<usize>,
    /// Seed for randomised methods (overrides the recipe's random_seed)
    #[arg(long)]
    random_seed: Option<u64>,
    /// Random draws of DARE/DELLA: mergekit's (torch's CPU stream, same masks as mergekit
    /// with the same seed) or counter (a hash per element; no stream jumps)
    #[arg(long, value_enum, default_value_t = RngArg::Mergekit)]
    rng: RngArg,
    #[command(flatten)]
    merge: MergeArgs,
}

/// Options that change what a merge computes (run, plan and submit).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
struct MergeArgs {
    /// Merge models whose vocabularies differ in size by keeping only the embedding rows all
    /// of them have (rows past the smallest vocabulary are dropped; without this such a
    /// merge is refused)
    #[arg(long)]
    unsafe_truncate_embeddings: bool,
    /// Compute in float32 and round once, even when the recipe's `dtype` is bfloat16 or
    /// float16 (by default every operation rounds to that dtype, as in mergekit)
    #[arg(long, value_enum)]
    compute_dtype: Option<ComputeDtype>,
}

/// `--compute-dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ComputeDtype {
    Float32,
}

/// `--rng`: see `pb::Rng`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RngArg {
    Mergekit,
    Counter,
}

impl RngArg {
    fn proto(self) -> pb::Rng {
        match self {
            RngArg::Mergekit => pb::Rng::Mergekit,
            RngArg::Counter => pb::Rng::Counter,
        }
    }
}

impl EngineArgs {
    fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1)
    }

    fn submit_options(&self) -> SubmitOptions {
        SubmitOptions {
            out_shard_size: self.out_shard_size,
            task_size: self.task_size.max(1),
            slot_memory: (self.memory_limit / self.workers() as u64).max(1 << 20),
            seed: self.random_seed,
            rng: self.rng.proto(),
            base_dir: embedded::cwd(),
            unsafe_truncate_embeddings: self.merge.unsafe_truncate_embeddings,
            compute_float32: self.merge.compute_dtype == Some(ComputeDtype::Float32),
            ..Default::default()
        }
    }
}

/// Access control and TLS of `shardmerge coordinator` (see docs/security.md).
#[derive(clap::Args, Clone, Debug)]
struct ServeSecurityArgs {
    /// File holding the token every call must carry (`authorization: Bearer TOKEN`); it grants
    /// every RPC. Without it the coordinator answers anyone, and refuses to start on a
    /// non-loopback address unless --insecure-no-auth is given
    #[arg(long, help_heading = "Security")]
    token_file: Option<PathBuf>,
    /// File holding a second token that grants only the worker RPCs (poll, renew, complete,
    /// fail): a worker's credential cannot submit, list or cancel jobs. Needs --token-file
    #[arg(long, help_heading = "Security")]
    worker_token_file: Option<PathBuf>,
    /// Serve without a token on a non-loopback address (anyone who reaches the port may
    /// submit, read and cancel jobs): only behind another access control
    #[arg(long, help_heading = "Security")]
    insecure_no_auth: bool,
    /// PEM certificate (chain) to serve TLS with; clients then use https:// URLs
    #[arg(long, requires = "tls_key", help_heading = "Security")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, requires = "tls_cert", help_heading = "Security")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate it signed (mutual TLS)
    #[arg(long, requires = "tls_cert", help_heading = "Security")]
    tls_client_ca: Option<PathBuf>,
    /// Storage prefix submitted jobs may read and write (repeatable): a local folder,
    /// file://PATH or s3://bucket/prefix. Jobs with an input or output outside every prefix
    /// are refused. Without --allow (or --allow-any) every job is refused
    #[arg(long = "allow", value_name = "PREFIX", help_heading = "Security")]
    allow: Vec<String>,
    /// Let jobs read and write anything the coordinator's credentials reach (single-user
    /// setups)
    #[arg(long, conflicts_with = "allow", help_heading = "Security")]
    allow_any: bool,
}

impl ServeSecurityArgs {
    fn into_remote(self) -> ServeSecurity {
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
struct ClientSecurityArgs {
    /// File holding the coordinator's token (a worker: its worker token); else the token in
    /// SHARDMERGE_TOKEN, if set
    #[arg(long, env = "SHARDMERGE_TOKEN_FILE", help_heading = "Security")]
    token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify an https:// coordinator with (default: the system's
    /// roots)
    #[arg(long, env = "SHARDMERGE_TLS_CA", help_heading = "Security")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires mutual TLS
    #[arg(long, requires = "tls_client_key", help_heading = "Security")]
    tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert
    #[arg(long, requires = "tls_client_cert", help_heading = "Security")]
    tls_client_key: Option<PathBuf>,
}

impl ClientSecurityArgs {
    fn options(&self) -> Result<ClientOptions> {
        ClientOptions::load(
            self.token_file.as_deref(),
            self.tls_ca.as_deref(),
            self.tls_client_cert.as_deref(),
            self.tls_client_key.as_deref(),
        )
        .map_err(Error::Other)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a merge in this process (coordinator + workers); paths may be local or s3:// URIs
    Run {
        /// mergekit YAML recipe; relative model paths resolve against the working directory
        recipe: PathBuf,
        /// Output checkpoint folder: a local path, file:// or s3://bucket/prefix
        out: String,
        #[command(flatten)]
        engine: EngineArgs,
        /// Replace what OUT holds. Without it an OUT that holds files is refused. The old
        /// checkpoint stays complete until the new one is committed; then the old files the
        /// new checkpoint does not have are removed
        #[arg(long)]
        overwrite: bool,
        /// No progress bar or summary
        #[arg(long, short)]
        quiet: bool,
    },
    /// Dry run from headers: output tensors, files, tasks, bytes, peak memory per worker
    Plan {
        /// mergekit YAML recipe
        recipe: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Check a checkpoint's integrity (index, files, headers, offsets, sizes)
    Verify {
        /// Checkpoint folder: a local path, file:// or s3://bucket/prefix
        checkpoint: String,
        /// Also re-read every data file and check it against the checksums the commit
        /// recorded (shardmerge.checksums.json); reads the whole checkpoint
        #[arg(long)]
        data: bool,
    },
    /// Serve jobs to workers over gRPC until SIGINT/SIGTERM
    Coordinator {
        /// Address to listen on
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: SocketAddr,
        /// Seconds a task's lease lasts without a renewal; a worker that dies loses its tasks
        /// to the others after this long (workers renew at a third of it)
        #[arg(long, default_value_t = 30.0)]
        lease_ttl: f64,
        /// Where job state lives: `memory` (jobs end with the process), or a journal folder
        /// (local path, file:// or s3://bucket/prefix) from which a restarted coordinator
        /// resumes its unfinished jobs
        #[arg(long, default_value = "memory")]
        state: String,
        #[command(flatten)]
        security: ServeSecurityArgs,
        #[command(flatten)]
        ops: OpsArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Pull tasks from a coordinator and run them until SIGINT/SIGTERM
    Worker {
        /// The coordinator's URL (http://HOST:PORT)
        #[arg(long, env = "SHARDMERGE_COORDINATOR")]
        coordinator: String,
        /// Tasks run at once (default: the number of cores)
        #[arg(long)]
        threads: Option<usize>,
        /// Memory this worker may use in all, split between its threads
        #[arg(long, default_value = "1GiB", value_parser = size::parse)]
        memory_limit: u64,
        /// Name in logs and leases (default: hostname-pid)
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        security: ClientSecurityArgs,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Submit a merge to a coordinator; relative model paths resolve against this directory
    Submit {
        recipe: PathBuf,
        /// Output checkpoint: s3://bucket/prefix (or a path every worker shares)
        out: String,
        /// The coordinator's URL (http://HOST:PORT)
        #[arg(long, env = "SHARDMERGE_COORDINATOR")]
        coordinator: String,
        /// Follow the job; exit 0 only when it succeeded
        #[arg(long)]
        wait: bool,
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
        /// No progress output
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        security: ClientSecurityArgs,
    },
    /// Show one job, or every job the coordinator knows
    Status {
        job: Option<String>,
        #[arg(long, env = "SHARDMERGE_COORDINATOR")]
        coordinator: String,
        /// Follow JOB to its end, as `submit --wait` does (exit 0 only when it succeeded)
        #[arg(long, requires = "job")]
        wait: bool,
        /// With --wait: no progress output
        #[arg(long, short, requires = "wait")]
        quiet: bool,
        #[command(flatten)]
        security: ClientSecurityArgs,
    },
    /// Cancel a job: drop its tasks, revoke its leases, abort its uploads
    Cancel {
        job: String,
        #[arg(long, env = "SHARDMERGE_COORDINATOR")]
        coordinator: String,
        #[command(flatten)]
        security: ClientSecurityArgs,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => fmt.init(),
        LogFormat::Json => {
            crate::ops::set_json_logs();
            fmt.json().flatten_event(true).init()
        }
    }
}

fn read_recipe(p: &PathBuf) -> Result<String> {
    std::fs::read_to_string(p)
        .map_err(|e| Error::Other(format!("{}: cannot read recipe: {e}", p.display())))
}

async fn main_inner(cli: Cli) -> Result<()> {
    let resolver = Resolver::new();
    match cli.cmd {
        Cmd::Run {
            recipe,
            out,
            engine,
            overwrite,
            quiet,
        } => {
            let text = read_recipe(&recipe)?;
            let o = RunOptions {
                workers: engine.workers(),
                submit: SubmitOptions {
                    overwrite,
                    ..engine.submit_options()
                },
                quiet,
            };
            let s = embedded::run(&text, &out, &o, resolver).await?;
            if !quiet {
                let secs = s.status.elapsed_seconds.max(1e-9);
                let peak = size::peak_rss().map_or(String::new(), |b| {
                    format!(", peak memory {}", size::human(b))
                });
                eprintln!(
                    "merged {} tensors into {} file(s), {} in {:.1}s ({}/s{peak}) -> {}",
                    s.plan.tensors.len(),
                    s.plan.files.len(),
                    size::human(s.plan.bytes_out()),
                    secs,
                    size::human((s.plan.bytes_out() as f64 / secs) as u64),
                    s.status.output_uri
                );
            }
            Ok(())
        }
        Cmd::Plan {
            recipe,
            engine,
            json,
        } => {
            let text = read_recipe(&recipe)?;
            let info =
                planinfo::describe(&text, &engine.submit_options(), engine.workers(), &resolver)
                    .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info.to_json()).unwrap_or_default()
                );
            } else {
                print!("{}", info.to_text());
            }
            Ok(())
        }
        Cmd::Verify { checkpoint, data } => {
            let r = verify::verify(&resolver, &checkpoint).await?;
            if data {
                let d = verify::verify_data(&resolver, &checkpoint).await?;
                println!(
                    "data ok: {} file(s), {} match their recorded CRC-32C",
                    d.files,
                    size::human(d.bytes)
                );
            }
            println!(
                "ok: {} tensors in {} file(s), {} of tensor data",
                r.tensors,
                r.files,
                size::human(r.bytes)
            );
            Ok(())
        }
        Cmd::Coordinator {
            listen,
            lease_ttl,
            state,
            security,
            ops,
            limits,
        } => {
            let lease_ttl = seconds("--lease-ttl", lease_ttl)?;
            let limits = limits.to_limits()?;
            remote::coordinator(
                listen,
                lease_ttl,
                Some(&state),
                security.into_remote(),
                ops.metrics_listen,
                limits,
            )
            .await
        }
        Cmd::Worker {
            coordinator,
            threads,
            memory_limit,
            id,
            security,
            ops,
        } => {
            remote::worker(WorkerOptions {
                client: security.options()?,
                coordinator,
                threads: threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                memory_limit,
                id,
                metrics_listen: ops.metrics_listen,
            })
            .await
        }
        Cmd::Submit {
            recipe,
            out,
            coordinator,
            wait,
            out_shard_size,
            task_size,
            memory_limit,
            random_seed,
            rng,
            overwrite,
            merge,
            quiet,
            security,
        } => {
            let text = read_recipe(&recipe)?;
            remote::submit(SubmitArgs {
                client: security.options()?,
                coordinator,
                recipe_yaml: text,
                output: out,
                options: pb::JobOptions {
                    out_shard_size,
                    task_size: task_size.max(1),
                    slot_memory: memory_limit.max(1 << 20),
                    seed: random_seed,
                    base_dir: embedded::cwd().to_string_lossy().into_owned(),
                    min_part_size: 0,
                    rng: rng.proto() as i32,
                    overwrite,
                    unsafe_truncate_embeddings: merge.unsafe_truncate_embeddings,
                    compute_float32: merge.compute_dtype == Some(ComputeDtype::Float32),
                },
                wait,
                quiet,
            })
            .await
        }
        Cmd::Status {
            job,
            coordinator,
            wait,
            quiet,
            security,
        } => remote::status(&coordinator, &security.options()?, job, wait, quiet).await,
        Cmd::Cancel {
            job,
            coordinator,
            security,
        } => remote::cancel(&coordinator, &security.options()?, job).await,
    }
}

/// Parses the command line and runs it: the whole `shardmerge` program.
pub fn main() -> ExitCode {
    size::return_large_buffers_to_the_system();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(main_inner(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The coordinator's limits (`shardmerge coordinator`).
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Seconds a task may run under one lease, renewals included; past it, renewals are
    /// refused, the lease expires and the task runs on another worker
    #[arg(long, default_value_t = 3600.0)]
    max_task_time: f64,
    /// Leases one worker id may hold at once (and so receive from one poll)
    #[arg(long, default_value_t = crate::job::limits::DEFAULT_MAX_SLOTS_PER_WORKER)]
    max_slots_per_worker: u32,
    /// Seconds an ended job stays in memory; then only its final status is kept (and the
    /// journal's, with --state)
    #[arg(long, default_value_t = 3600.0)]
    job_retention: f64,
    /// Jobs held in memory at once; a submission past it is refused (RESOURCE_EXHAUSTED)
    /// unless an ended job can make room
    #[arg(long, default_value_t = crate::job::limits::DEFAULT_MAX_JOBS)]
    max_jobs: usize,
}

impl LimitArgs {
    fn to_limits(&self) -> Result<crate::job::Limits> {
        if self.max_slots_per_worker == 0 || self.max_jobs == 0 {
            return Err(Error::Other(
                "--max-slots-per-worker and --max-jobs: give at least 1".into(),
            ));
        }
        Ok(crate::job::Limits {
            max_task_time: seconds("--max-task-time", self.max_task_time)?,
            max_slots_per_worker: self.max_slots_per_worker,
            job_retention: Duration::try_from_secs_f64(self.job_retention)
                .ok()
                .filter(|_| self.job_retention.is_finite())
                .ok_or_else(|| {
                    Error::Other(format!(
                        "--job-retention {}: give a number of seconds (0 or more)",
                        self.job_retention
                    ))
                })?,
            max_jobs: self.max_jobs,
        })
    }
}

/// A positive, finite number of seconds given to `flag`.
fn seconds(flag: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::Other(format!(
            "{flag} {v}: give a positive number of seconds"
        )));
    }
    Duration::try_from_secs_f64(v)
        .map_err(|_| Error::Other(format!("{flag} {v}: too large a number of seconds")))
}
