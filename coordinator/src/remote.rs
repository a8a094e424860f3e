//! The distributed-mode commands: run a coordinator, run a worker, and the client commands
//! (`submit`, `status`, `cancel`) that talk to a coordinator over gRPC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmerge_proto as pb;
use shardmerge_worker::client::{self, Client, ClientOptions, RemoteSource, Token};
use shardmerge_worker::exec::{Executor, RowCache};
use shardmerge_worker::metrics::{self, MeteredSource, WorkerMetrics};
use shardmerge_worker::pull::{self, LoopOptions};
use shardmerge_worker::storage::Resolver;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::embedded::{progress_bar, terminal};
use crate::error::{Error, Result};
use crate::job::JobManager;
use crate::journal::Journal;
use crate::ops;
use crate::policy::Policy;
use crate::progress::{cancel_outcome, describe, input_lines, reads_line, state_name, stdout};
use crate::server::{self, Security};
use crate::size;
use crate::tls::ServerTls;

/// The coordinator's security options, as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct ServeSecurity {
    pub token_file: Option<std::path::PathBuf>,
    pub worker_token_file: Option<std::path::PathBuf>,
    pub insecure_no_auth: bool,
    pub tls: ServerTls,
    pub allow: Vec<String>,
    pub allow_any: bool,
}

impl ServeSecurity {
    /// Reads the tokens and certificates and checks the combination for `listen`: without a
    /// token the coordinator only serves on loopback, unless told `--insecure-no-auth`.
    pub fn load(&self, listen: SocketAddr, state: Option<&str>) -> Result<(Security, String)> {
        let read = |p: &Option<std::path::PathBuf>| {
            p.as_deref()
                .map(Token::from_file)
                .transpose()
                .map_err(|e| Error::usage("", e))
        };
        let auth = Auth::new(read(&self.token_file)?, read(&self.worker_token_file)?)
            .map_err(|e| Error::usage("", e))?;
        if !auth.enabled() && !listen.ip().is_loopback() && !self.insecure_no_auth {
            return Err(Error::usage(
                "",
                format!(
                "refusing to serve {listen} without a token: anyone who reaches it could submit, \
                 read and cancel jobs. Give --token-file FILE (e.g. `openssl rand -hex 32 > FILE`; \
                 clients take --token-file too), listen on 127.0.0.1, or pass --insecure-no-auth \
                 if another layer controls access"
            ),
            ));
        }
        let tls = self.tls.config()?;
        let mut policy = Policy::new(&self.allow, self.allow_any)?;
        if let Some(journal) = state.filter(|s| !matches!(*s, "" | "memory" | "memory://")) {
            policy = policy.protect(journal)?;
        }
        let mut notes = vec![format!(
            "auth: {}",
            match (auth.enabled(), self.worker_token_file.is_some()) {
                (false, _) => "none (no --token-file)",
                (true, false) => "token",
                (true, true) => "token, worker token",
            }
        )];
        notes.push(format!(
            "tls: {}",
            match (&tls, &self.tls.client_ca) {
                (None, _) => "off",
                (Some(_), None) => "on",
                (Some(_), Some(_)) => "on, client certificates required",
            }
        ));
        notes.push(format!("jobs may use: {}", policy.describe()));
        if auth.enabled() && tls.is_none() && !listen.ip().is_loopback() {
            tracing::warn!(
                "tokens travel in plain text to {listen}: serve TLS (--tls-cert/--tls-key) unless \
                 the network between clients and coordinator is trusted"
            );
        }
        Ok((Security { auth, tls, policy }, notes.join("; ")))
    }
}

/// Runs a coordinator on `listen` until SIGINT/SIGTERM; with `metrics_listen`, its Prometheus
/// metrics there too.
pub async fn coordinator(
    listen: SocketAddr,
    lease_ttl: Duration,
    state: Option<&str>,
    security: ServeSecurity,
    metrics_listen: Option<SocketAddr>,
    limits: crate::job::Limits,
) -> Result<()> {
    // refuse a bad security set-up before anything else happens
    let (security, notes) = security.load(listen, state)?;
    let resolver = Resolver::new();
    let mgr = match state {
        None | Some("" | "memory" | "memory://") => {
            let mgr = JobManager::new(resolver);
            // the one lease TTL, with or without a journal
            mgr.set_lease_ttl(lease_ttl);
            mgr.set_limits(limits);
            mgr
        }
        Some(uri) => {
            let journal = Journal::open(uri, &resolver).await?;
            let at = journal.uri();
            let mgr = JobManager::with_journal(resolver, journal);
            // before `recover`: resumed jobs' leases get the coordinator's TTL too, and
            // resumed jobs its limits and audit rules (they were resumed with none: a
            // liar's results from before a restart went unaudited)
            mgr.set_lease_ttl(lease_ttl);
            mgr.set_limits(limits);
            let resumed = mgr.recover().await?;
            ops::say(format!(
                "shardmerge coordinator: journal {at}: {} unfinished job(s) resumed{}",
                resumed.len(),
                if resumed.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", resumed.join(", "))
                }
            ));
            mgr
        }
    };
    let listener = server::bind(listen).await?;
    let addr = listener.local_addr().unwrap_or(listen);
    ops::say(format!(
        "shardmerge coordinator listening on {}://{addr} (lease ttl {:.1}s; audits: {}; {notes})",
        if security.tls.is_some() {
            "https"
        } else {
            "http"
        },
        lease_ttl.as_secs_f64(),
        match limits.audit.fraction {
            f if f > 0.0 => format!("{:.2}% of write tasks", f * 100.0),
            _ => "off".to_string(),
        }
    ));
    ops::serve(
        listener,
        mgr,
        lease_ttl,
        security,
        metrics_listen,
        server::shutdown_signal(),
    )
    .await?;
    ops::say("shardmerge coordinator: shutting down".to_string());
    Ok(())
}

/// Options of `shardmerge worker`.
pub struct WorkerOptions {
    pub coordinator: String,
    pub client: ClientOptions,
    pub threads: usize,
    pub memory_limit: u64,
    pub id: Option<String>,
    /// Where to serve `/metrics`, `/ready` and `/healthz`.
    pub metrics_listen: Option<SocketAddr>,
    /// The row cache statistics passes keep their rows in (none: every pass reads storage).
    pub cache: Option<Arc<RowCache>>,
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Runs a worker against a coordinator until SIGINT/SIGTERM. Tasks in flight when the signal
/// comes are dropped; their leases expire and they run elsewhere.
pub async fn worker(o: WorkerOptions) -> Result<()> {
    let source =
        RemoteSource::with_options(&o.coordinator, &o.client).map_err(|e| Error::usage("", e))?;
    let metrics_listen = match o.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await.map_err(|e| Error::usage("", e))?),
        None => None,
    };
    let resolver = Resolver::new();
    let threads = o.threads.max(1);
    let opts = LoopOptions {
        worker_id: o.id.unwrap_or_else(default_worker_id),
        slots: threads,
        slot_memory: (o.memory_limit / threads as u64).max(1 << 20),
        max_idle: Duration::from_millis(250),
    };
    ops::say(format!(
        "shardmerge worker {} pulling from {} with {threads} slot(s) of {} each",
        opts.worker_id,
        client::normalize_url(&o.coordinator),
        size::human(opts.slot_memory)
    ));
    let meter = WorkerMetrics::new(threads, opts.slot_memory);
    if let Some(l) = metrics_listen {
        if let Ok(at) = l.local_addr() {
            ops::say(format!(
                "shardmerge worker: metrics on http://{at}/metrics, readiness on /ready"
            ));
        }
        tokio::spawn(metrics::serve(l, meter.clone()));
    }
    let worker_id = opts.worker_id.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let run = tokio::spawn(pull::run(
        Arc::new(MeteredSource::new(source.clone(), meter)),
        Executor::new(resolver).with_cache(o.cache),
        opts,
        stop_rx,
    ));
    // a worker whose credentials the coordinator refuses cannot do anything: stop and say why
    let refused = tokio::select! {
        _ = server::shutdown_signal() => None,
        why = source.refused() => Some(why),
    };
    if refused.is_none() {
        ops::say(format!(
            "shardmerge worker {worker_id}: SIGTERM or SIGINT received: stopping; the tasks it \
             runs are handed back to the coordinator"
        ));
    }
    let _ = stop_tx.send(true);
    // Give running tasks a moment to report; then leave (leases expire for the rest).
    let handed_back = tokio::time::timeout(Duration::from_secs(2), run).await;
    match refused {
        None => {
            ops::say(format!(
                "shardmerge worker {worker_id} stopped{}",
                if handed_back.is_ok() {
                    ""
                } else {
                    " (tasks that did not report within 2 s run again when their leases expire)"
                }
            ));
            Ok(())
        }
        Some(why) => Err(Error::Rpc {
            url: o.coordinator.clone(),
            reason: format!("the coordinator refused this worker: {why}"),
        }),
    }
}

fn rpc_err(url: &str, what: &str, s: tonic::Status) -> Error {
    Error::Rpc {
        url: url.to_string(),
        reason: format!("{what}: {}", client::describe(url, &s)),
    }
}

fn connect(url: &str, o: &ClientOptions) -> Result<Client> {
    client::connect(url, o).map_err(|e| Error::usage("", e))
}

/// Options of `shardmerge submit`.
#[derive(Clone)]
pub struct SubmitArgs {
    pub coordinator: String,
    pub client: ClientOptions,
    pub recipe_yaml: String,
    pub output: String,
    pub options: pb::JobOptions,
    pub wait: bool,
    pub quiet: bool,
}

/// Submits a job; with `wait`, follows it to the end and fails unless it succeeded.
pub async fn submit(a: SubmitArgs) -> Result<()> {
    submit_grid(a, Vec::new()).await
}

/// Submits a job and `more` points of its sweep, linked to read the inputs once (one job per
/// point); prints each point's job id. With `wait`, follows every one to its end and fails
/// unless all succeeded.
pub async fn submit_grid(a: SubmitArgs, more: Vec<pb::GridPoint>) -> Result<()> {
    let url = &a.coordinator;
    let mut c = connect(url, &a.client)?;
    let r = c
        .submit_job(pb::SubmitJobRequest {
            recipe_yaml: a.recipe_yaml,
            output_uri: a.output,
            options: Some(a.options),
            more_points: more,
        })
        .await
        .map_err(|s| rpc_err(url, "submit", s))?
        .into_inner();
    let ids = if r.point_job_ids.is_empty() {
        vec![r.job_id]
    } else {
        r.point_job_ids
    };
    if !a.wait {
        stdout(&ids.iter().map(|id| format!("{id}\n")).collect::<String>());
        return Ok(());
    }
    let mut first_err = None;
    for id in &ids {
        eprintln!("submitted {id}; waiting (Ctrl-C stops waiting, the job goes on: `shardmerge cancel {id}` stops it)");
        if let Err(e) = wait_for_end(url, &mut c, id, a.quiet).await {
            eprintln!("{e}");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Follows job `id` to its end: Ok (the id printed on stdout) when it succeeded, the job's
/// error otherwise.
async fn wait_for_end(url: &str, c: &mut Client, id: &str, quiet: bool) -> Result<()> {
    let status = follow(url, c, id, quiet).await?;
    match pb::JobState::try_from(status.state) {
        Ok(pb::JobState::Succeeded) => {
            if !quiet {
                eprintln!(
                    "{id} succeeded: {} written, {} retries -> {}",
                    size::bytes_in(status.bytes_total, status.elapsed_seconds),
                    status.retries,
                    status.output_uri
                );
                eprintln!("{}{}", reads_line(&status, None), input_lines(&status));
            }
            stdout(&format!("{id}\n"));
            Ok(())
        }
        _ => Err(Error::job(
            id,
            format!("{id} {}: {}", state_name(status.state), status.error),
        )),
    }
}

/// Follows WatchJob until a terminal state, re-watching after transport errors for a while.
async fn follow(url: &str, c: &mut Client, id: &str, quiet: bool) -> Result<pb::JobStatus> {
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut bar = None;
    let mut last_line = Instant::now() - Duration::from_secs(60);
    let mut last_state = -1;
    let mut lost_since: Option<Instant> = None;
    loop {
        let stream = c
            .watch_job(pb::GetJobRequest {
                job_id: id.to_string(),
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if client::is_transport(&s) => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(30) {
                    return Err(rpc_err(url, &format!("watching {id}"), s));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(s) => return Err(rpc_err(url, &format!("watching {id}"), s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(st)) => {
                    lost_since = None;
                    if interactive && !quiet {
                        // all the work, statistics passes included, so the bar moves from
                        // the start and its ETA holds
                        let b = bar.get_or_insert_with(|| progress_bar(st.work_total, quiet));
                        b.set_length(st.work_total.max(1));
                        b.set_position(st.work_done);
                        b.set_message(state_name(st.state));
                    } else if !quiet
                        && (st.state != last_state || last_line.elapsed() > Duration::from_secs(2))
                    {
                        eprintln!("{}", describe(&st));
                        last_line = Instant::now();
                        last_state = st.state;
                    }
                    if terminal(&st) {
                        if let Some(b) = &bar {
                            b.finish_and_clear();
                        }
                        return Ok(st);
                    }
                }
                Ok(None) => break,
                Err(s) if client::is_transport(&s) => break,
                Err(s) => return Err(rpc_err(url, &format!("watching {id}"), s)),
            }
        }
        // the stream ended early: the connection dropped; watch again
        let since = *lost_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(30) {
            return Err(Error::Rpc {
                url: url.to_string(),
                reason: format!(
                    "lost coordinator {} while waiting for {id}; the job may still run: `shardmerge status {id}`",
                    client::normalize_url(url)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints one job, or every job the coordinator knows.
pub async fn status(
    url: &str,
    client: &ClientOptions,
    job: Option<String>,
    wait: bool,
    quiet: bool,
) -> Result<()> {
    let mut c = connect(url, client)?;
    match job {
        Some(id) if wait => wait_for_end(url, &mut c, &id, quiet).await?,
        Some(id) => {
            let s = c
                .get_job(pb::GetJobRequest { job_id: id })
                .await
                .map_err(|s| rpc_err(url, "status", s))?
                .into_inner();
            stdout(&format!("{}{}\n", describe(&s), input_lines(&s)));
        }
        None => {
            let jobs = c
                .list_jobs(pb::ListJobsRequest {})
                .await
                .map_err(|s| rpc_err(url, "status", s))?
                .into_inner()
                .jobs;
            if jobs.is_empty() {
                stdout("no jobs\n");
            }
            for s in jobs {
                stdout(&format!("{}{}\n", describe(&s), input_lines(&s)));
            }
        }
    }
    Ok(())
}

/// Cancels a job and says what came of it: the job's status line on stdout, then on stderr
/// that it was cancelled, or why not. Ok (exit 0) when the job is cancelled, now or by an
/// earlier cancel; an error (exit 1) when nothing was cancelled: the job had already ended
/// otherwise (succeeded or failed: "already ended"), or it is committing and will finish.
pub async fn cancel(url: &str, client: &ClientOptions, id: String) -> Result<()> {
    let mut c = connect(url, client)?;
    let before = c
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .map_err(|s| rpc_err(url, "cancel", s))?
        .into_inner();
    let s = if terminal(&before) {
        before.clone()
    } else {
        c.cancel_job(pb::CancelJobRequest { job_id: id.clone() })
            .await
            .map_err(|s| rpc_err(url, "cancel", s))?
            .into_inner()
    };
    stdout(&format!("{}\n", describe(&s)));
    cancel_outcome(&id, terminal(&before), &s)
}

#[cfg(test)]
mod tests {
    use super::ServeSecurity;

    /// The refusal to serve a network address without a token reads as one sentence: no run
    /// of spaces where the source line was continued (it had three such runs).
    #[test]
    fn no_token_refusal_message_reads_cleanly() {
        let listen = "0.0.0.0:7070".parse().expect("address");
        let err = ServeSecurity::default()
            .load(listen, None)
            .map(|_| ())
            .expect_err("refused without a token")
            .to_string();
        assert_eq!(
            err,
            "refusing to serve 0.0.0.0:7070 without a token: anyone who reaches it could submit, \
             read and cancel jobs. Give --token-file FILE (e.g. `openssl rand -hex 32 > FILE`; \
             clients take --token-file too), listen on 127.0.0.1, or pass --insecure-no-auth \
             if another layer controls access"
        );
        assert!(!err.contains("  "), "{err}");
    }
}
