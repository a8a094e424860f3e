//! The `shardmerge` command line (in the library so that test harnesses can build the same
//! program as their own binary).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

mod args;
mod extract;
mod merge;
mod report;
mod stages;
mod summary;
mod sweep;

use crate::error::{Error, Result};
use crate::progress::stdout;
use crate::remote::{self, WorkerOptions};
use crate::{size, verify};
use args::{
    seconds, ClientSecurityArgs, EngineArgs, LogFormat, OpsArgs, ScratchArgs, ServeSecurityArgs,
};
pub use args::{LimitArgs, RngArg};
use clap::builder::NonEmptyStringValueParser;
use clap::{Parser, Subcommand};
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
        #[command(flatten)]
        points: sweep::PointArgs,
        /// Also write the merge report (report.json, report.csv, report.html; see `report`)
        /// into OUT/report, computed from the rows the merge reads and (of a sweep) the values
        /// each point writes
        #[arg(long)]
        report: bool,
        #[command(flatten)]
        stages: stages::StageArgs,
    },
    /// The merge report of a recipe: task-vector norms, cosines, sign agreement and TIES
    /// sign-conflict rates per tensor, layer and module kind, into OUT/report.{json,csv,html}
    Report(report::ReportCmd),
    /// A PEFT LoRA adapter taking --base-model to a low-rank approximation of --model
    /// (mergekit-extract-lora's options), into OUT
    ExtractLora(extract::ExtractCmd),
    /// Dry run from headers: output tensors, files, tasks, bytes, peak memory per worker
    Plan {
        /// mergekit YAML recipe
        recipe: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        points: sweep::PointArgs,
        #[command(flatten)]
        stages: stages::StageArgs,
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
        #[arg(long, env = "SHARDMERGE_COORDINATOR", value_parser = NonEmptyStringValueParser::new())]
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
        #[command(flatten)]
        scratch: ScratchArgs,
    },
    /// Submit a merge to a coordinator; relative model paths resolve against this directory
    Submit(merge::SubmitCmd),
    /// Show one job, or every job the coordinator knows
    Status {
        job: Option<String>,
        #[arg(long, env = "SHARDMERGE_COORDINATOR", value_parser = NonEmptyStringValueParser::new())]
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
        #[arg(long, env = "SHARDMERGE_COORDINATOR", value_parser = NonEmptyStringValueParser::new())]
        coordinator: String,
        #[command(flatten)]
        security: ClientSecurityArgs,
    },
}

/// Logs go to stderr, in colour only when it is a terminal (a redirected log holds no escape
/// codes). `RUST_LOG` sets the level; without it, the services (`coordinator`, `worker`) log
/// their own `info` lines (each task a worker runs, jobs submitted) and every command warnings.
fn init_tracing(format: LogFormat, service: bool) {
    let default = if service {
        "warn,shardmerge=info,shardmerge_worker=info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        .map_err(|e| Error::usage(p.display().to_string(), format!("cannot read recipe: {e}")))
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
            points,
            report,
            stages,
        } => {
            let mut o = merge::run_options(&engine, overwrite, quiet)?;
            let text = read_recipe(&recipe)?;
            let ways = merge::Ways::new(&points, &stages, &engine);
            merge::refuse_report(report, &text)?;
            o.tap = report::before_run(report, &text, &engine, &resolver).await?;
            merge::run(&text, &out, &o, &ways, resolver.clone()).await?;
            report::after_run(&text, &out, (&engine, &points), &o, &resolver).await
        }
        Cmd::Report(c) => c.run(&resolver).await,
        Cmd::ExtractLora(c) => c.run(&resolver).await,
        Cmd::Plan {
            recipe,
            engine,
            json,
            points,
            stages,
        } => {
            let text = read_recipe(&recipe)?;
            let ways = merge::Ways::new(&points, &stages, &engine);
            merge::plan(&text, &engine, json, &ways, &resolver).await
        }
        Cmd::Verify { checkpoint, data } => verify(&checkpoint, data, &resolver).await,
        Cmd::Coordinator {
            listen,
            lease_ttl,
            state,
            security,
            ops,
            limits,
        } => coordinator(listen, lease_ttl, &state, security, ops, limits).await,
        Cmd::Worker {
            coordinator,
            threads,
            memory_limit,
            id,
            security,
            ops,
            scratch,
        } => {
            remote::worker(worker_options(
                coordinator,
                threads,
                memory_limit,
                id,
                security,
                ops,
                scratch,
            )?)
            .await
        }
        Cmd::Submit(c) => c.run(&resolver).await,
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

/// `shardmerge worker`'s options from its flags (threads default to the cores).
fn worker_options(
    coordinator: String,
    threads: Option<usize>,
    memory_limit: u64,
    id: Option<String>,
    security: ClientSecurityArgs,
    ops: OpsArgs,
    scratch: ScratchArgs,
) -> Result<WorkerOptions> {
    Ok(WorkerOptions {
        client: security.options()?,
        coordinator,
        threads: threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        memory_limit,
        id,
        metrics_listen: ops.metrics_listen,
        cache: scratch.cache()?,
    })
}

/// `shardmerge coordinator`: serves jobs to workers.
async fn coordinator(
    listen: SocketAddr,
    lease_ttl: f64,
    state: &str,
    security: ServeSecurityArgs,
    ops: OpsArgs,
    limits: LimitArgs,
) -> Result<()> {
    let lease_ttl = seconds("--lease-ttl", lease_ttl)?;
    let limits = limits.to_limits()?;
    remote::coordinator(
        listen,
        lease_ttl,
        Some(state),
        security.into_remote(),
        ops.metrics_listen,
        limits,
    )
    .await
}

/// `shardmerge verify`: checks a finished checkpoint.
async fn verify(checkpoint: &str, data: bool, resolver: &Resolver) -> Result<()> {
    let r = verify::verify(resolver, checkpoint).await?;
    if data {
        let d = verify::verify_data(resolver, checkpoint).await?;
        stdout(&format!(
            "data ok: {} file(s), {} match their recorded CRC-32C\n",
            d.files,
            size::human(d.bytes)
        ));
    }
    stdout(&format!(
        "ok: {} tensors in {} file(s), {} of tensor data\n",
        r.tensors,
        r.files,
        size::human(r.bytes)
    ));
    Ok(())
}

/// Prints clap's error (help and version too) and exits as clap does. When an option's
/// environment variable is set but empty, clap's message names only the option
/// (`--token-file`): the variable is named too, since that is where the empty value came from.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::CommandFactory;
    let _ = e.print();
    if !e.use_stderr() {
        return ExitCode::SUCCESS;
    }
    let mut empty = Vec::new();
    let mut cmds = vec![Cli::command()];
    while let Some(c) = cmds.pop() {
        for a in c.get_arguments() {
            let Some(var) = a.get_env() else { continue };
            let name = var.to_string_lossy().into_owned();
            if std::env::var_os(var).is_some_and(|v| v.is_empty()) && !empty.contains(&name) {
                empty.push(name);
            }
        }
        cmds.extend(c.get_subcommands().cloned());
    }
    if !empty.is_empty() {
        eprintln!(
            "note: set but empty in the environment: {} (each stands for its option; give it a \
             value or unset it)",
            empty.join(", ")
        );
    }
    ExitCode::from(2)
}

/// Parses the command line and runs it: the whole `shardmerge` program.
pub fn main() -> ExitCode {
    size::return_large_buffers_to_the_system();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let service = matches!(cli.cmd, Cmd::Coordinator { .. } | Cmd::Worker { .. });
    init_tracing(cli.log_format, service);
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
