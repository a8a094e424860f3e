//! The worker loop: lease tasks from a work source, run them, renew leases while they run,
//! report completion or failure. The same loop serves in-process workers (the source is the
//! coordinator's job manager) and remote ones (the source is a gRPC client).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use shardmerge_proto as pb;
use tokio::sync::watch;

use crate::exec::{Executor, Scratch, Staged};

mod behind;
use behind::{Behind, Group};

/// Why a call to a work source failed: what a caller can act on, with the message a person
/// reads (naming the call and the coordinator).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The coordinator could not be reached (the transport failed and retries ran out of
    /// patience): the same call may succeed later.
    #[error("{message}")]
    Unreachable { message: String },
    /// The coordinator refused the caller for who it is (`code`: no or a wrong token is
    /// `Unauthenticated`, a token without the right `PermissionDenied`): trying again cannot
    /// help.
    #[error("{message}")]
    Refused { code: tonic::Code, message: String },
    /// The coordinator answered the call with another error (`code`, e.g. an invalid argument).
    #[error("{message}")]
    Rejected { code: tonic::Code, message: String },
}

impl SourceError {
    /// The gRPC code of the failure.
    pub fn code(&self) -> tonic::Code {
        match self {
            SourceError::Unreachable { .. } => tonic::Code::Unavailable,
            SourceError::Refused { code, .. } | SourceError::Rejected { code, .. } => *code,
        }
    }

    /// Whether the same call may succeed when tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Unreachable { .. })
    }
}

/// Where work comes from: the coordinator's job manager in process (which never fails), or
/// its gRPC service.
#[async_trait]
pub trait WorkSource: Send + Sync {
    async fn poll(&self, req: pb::PollWorkRequest) -> Result<pb::PollWorkResponse, SourceError>;
    async fn renew(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, SourceError>;
    async fn complete(
        &self,
        req: pb::CompleteTaskRequest,
    ) -> Result<pb::CompleteTaskResponse, SourceError>;
    async fn fail(&self, req: pb::FailTaskRequest) -> Result<(), SourceError>;
}

#[derive(Clone, Debug)]
pub struct LoopOptions {
    pub worker_id: String,
    /// Tasks run at once.
    pub slots: usize,
    pub slot_memory: u64,
    /// Longest wait between polls when there is no work.
    pub max_idle: Duration,
}

/// Runs `opts.slots` task slots until `stop` becomes true.
pub async fn run(
    source: Arc<dyn WorkSource>,
    exec: Executor,
    opts: LoopOptions,
    stop: watch::Receiver<bool>,
) {
    let mut handles = Vec::new();
    for slot in 0..opts.slots.max(1) {
        let (source, exec, opts, stop) = (source.clone(), exec.clone(), opts.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            slot_loop(source, exec, opts, slot, stop).await;
        }));
    }
    for h in handles {
        let _ = h.await;
    }
}

async fn slot_loop(
    source: Arc<dyn WorkSource>,
    exec: Executor,
    opts: LoopOptions,
    slot: usize,
    mut stop: watch::Receiver<bool>,
) {
    let worker_id = format!("{}/{slot}", opts.worker_id);
    let mut backoff = Duration::from_millis(5);
    let mut scratch = Scratch::new(opts.slot_memory);
    // the last group's writes, while the slot computes the next one
    let mut behind: Option<Behind> = None;
    while !*stop.borrow() {
        let resp = source
            .poll(pb::PollWorkRequest {
                worker_id: worker_id.clone(),
                free_slots: 1,
                slot_memory: opts.slot_memory,
            })
            .await;
        let leases = match resp {
            Ok(r) if !r.leases.is_empty() => {
                backoff = Duration::from_millis(5);
                r.leases
            }
            Ok(r) => {
                behind::settle(&mut behind, &mut scratch).await;
                if scratch.held() > 0 {
                    // idle: the slot's buffers go back to the system until work comes
                    scratch = Scratch::new(opts.slot_memory);
                    crate::exec::release_free_memory();
                }
                let wait = Duration::from_millis(r.retry_after_ms.max(1) as u64).min(opts.max_idle);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(worker = %worker_id, "poll failed: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for lease in leases {
            let slot = (&mut scratch, &mut behind, opts.slot_memory);
            run_one(&source, &exec, &worker_id, lease, slot, &mut stop).await;
        }
    }
    behind::settle(&mut behind, &mut scratch).await;
}

/// Resolves when `stop` turns true (never, if its sender is gone without saying so).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs a lease and its riders in a slot (its buffers, the writes behind it and its memory):
/// computes them, then writes their bytes behind the slot (`behind`) or reports their results.
async fn run_one(
    source: &Arc<dyn WorkSource>,
    exec: &Executor,
    worker_id: &str,
    lease: pb::Lease,
    (scratch, behind, slot_memory): (&mut Scratch, &mut Option<Behind>, u64),
    stop: &mut watch::Receiver<bool>,
) {
    // the lease and its riders (tasks of other jobs reading the same rows), run together
    let leases: Vec<&pb::Lease> = std::iter::once(&lease).chain(&lease.riders).collect();
    let Some(tasks) = leases
        .iter()
        .map(|l| l.task.as_ref())
        .collect::<Option<Vec<&pb::Task>>>()
    else {
        return;
    };
    let ids: Vec<String> = leases.iter().map(|l| l.lease_id.clone()).collect();
    let group = Group {
        worker_id: worker_id.to_string(),
        leases: leases
            .iter()
            .zip(&tasks)
            .map(|(l, t)| (l.lease_id.clone(), t.task_id))
            .collect(),
        started: std::time::Instant::now(),
        renewer: spawn_renewer(source, worker_id, &ids, lease.ttl_ms),
    };
    behind::settle_for(behind, scratch, behind::out_bytes(&tasks), slot_memory).await;
    // A stop (SIGTERM, SIGINT) drops the task where it is and hands the lease back as a
    // retryable failure, so the task runs again at once elsewhere instead of waiting for the
    // lease to expire. A task is pure: what it wrote so far is written again, the same.
    let staged = tokio::select! {
        r = exec.stage_group(&tasks, scratch) => Some(r),
        _ = stopped(stop) => None,
    };
    let Some(staged) = staged else {
        group.renewer.abort();
        hand_back(source.as_ref(), worker_id, &group.leases).await;
        return;
    };
    // the writes behind the slot end before this group's begin: two groups' at most
    behind::settle(behind, scratch).await;
    match staged {
        Staged::Writes(w) => *behind = Some(behind::spawn(source, exec, w, group, stop.clone())),
        Staged::Done(results) => {
            group.renewer.abort();
            behind::finish(source.as_ref(), &group, results).await;
        }
    }
}

/// Hands the leases `(lease id, task id)` back as retryable failures: the worker is stopping.
async fn hand_back(source: &dyn WorkSource, worker_id: &str, leases: &[(String, u64)]) {
    for (lease_id, task) in leases {
        tracing::info!(worker = %worker_id, "stopping: handing task {task} back");
        if let Err(e) = source
            .fail(pb::FailTaskRequest {
                worker_id: worker_id.to_string(),
                lease_id: lease_id.clone(),
                error: format!("worker {worker_id} stopped; task handed back"),
                retryable: true,
            })
            .await
        {
            tracing::warn!("handing task {task} back failed: {e}");
        }
    }
}

/// Renews leases `ids` at a third of their lifetime `ttl_ms` until aborted or the coordinator
/// says every one is lost.
fn spawn_renewer(
    source: &Arc<dyn WorkSource>,
    worker_id: &str,
    ids: &[String],
    ttl_ms: u64,
) -> tokio::task::JoinHandle<()> {
    let renew_every = Duration::from_millis((ttl_ms / 3).max(50));
    let source = source.clone();
    let (wid, mut held) = (worker_id.to_string(), ids.to_vec());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(renew_every).await;
            let r = source
                .renew(pb::RenewLeaseRequest {
                    worker_id: wid.clone(),
                    lease_ids: held.clone(),
                })
                .await;
            if let Ok(r) = r {
                held.retain(|l| !r.lost.contains(l));
                if held.is_empty() {
                    break;
                }
            }
        }
    })
}

/// Reports a finished task (its result, or its error) to the coordinator and logs it.
async fn report(
    source: &dyn WorkSource,
    worker_id: &str,
    lease_id: &str,
    task_id: u64,
    started: std::time::Instant,
    result: Result<pb::TaskResult, crate::exec::TaskError>,
) {
    match result {
        Ok(result) => {
            let (read, written) = (result.bytes_read, result.bytes_written);
            let r = source
                .complete(pb::CompleteTaskRequest {
                    worker_id: worker_id.to_string(),
                    lease_id: lease_id.to_string(),
                    result: Some(result),
                })
                .await;
            match r {
                Ok(_) => tracing::info!(
                    worker = %worker_id,
                    task = %task_id,
                    bytes_read = read,
                    bytes_written = written,
                    ms = started.elapsed().as_millis() as u64,
                    "task {} done: {written} bytes written, {read} read in {:.3} s",
                    task_id,
                    started.elapsed().as_secs_f64()
                ),
                Err(e) => tracing::warn!("reporting task {} failed: {e}", task_id),
            }
        }
        Err(e) => {
            tracing::info!(
                worker = %worker_id,
                task = %task_id,
                retryable = e.retryable,
                "task {} failed after {:.3} s: {e}",
                task_id,
                started.elapsed().as_secs_f64()
            );
            let _ = source
                .fail(pb::FailTaskRequest {
                    worker_id: worker_id.to_string(),
                    lease_id: lease_id.to_string(),
                    error: e.message,
                    retryable: e.retryable,
                })
                .await;
        }
    }
}
