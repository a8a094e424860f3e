//! Embedded mode: a coordinator and its workers in one process, on local files or S3. The same
//! job manager, tasks and executor as the distributed mode; only the transport differs.

use std::sync::Arc;
use std::time::Duration;

use shardmerge_proto as pb;
use shardmerge_worker::exec::{Executor, ReportTap, RowCache};
use shardmerge_worker::pull::{self, LoopOptions};
use shardmerge_worker::storage::Resolver;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::job::{JobManager, SubmitOptions};
use crate::plan::Plan;

mod grid;
pub use grid::{run_grid, GridPoint, PointOutcome};
// (re-exported where the CLI and the remote client have always found them)
pub use crate::paths::cwd;
pub use crate::progress::{progress_bar, terminal};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub workers: usize,
    pub submit: SubmitOptions,
    pub quiet: bool,
    /// The row cache the workers keep statistics passes' rows in (none: every pass reads
    /// storage again).
    pub cache: Option<Arc<RowCache>>,
    /// The report the workers compute from the rows they read (`run --report`), if any.
    pub tap: Option<Arc<ReportTap>>,
}

pub struct Summary {
    pub status: pb::JobStatus,
    pub plan: Arc<Plan>,
}

/// Submits the job while listening for `signal`: a signal while the job is set up cancels it
/// once it exists (dropping the set-up half-way would leave its output files behind). Returns
/// the job, its plan and whether the signal came (it is then done and not to be polled again).
async fn set_up(
    mgr: &JobManager,
    recipe_text: &str,
    output: &str,
    o: &RunOptions,
    mut signal: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<(String, Arc<Plan>, bool)> {
    let mut interrupted = false;
    let submit = mgr.submit(recipe_text, output, &o.submit);
    tokio::pin!(submit);
    let (jid, plan) = loop {
        tokio::select! {
            r = &mut submit => break r?,
            _ = &mut signal, if !interrupted => {
                interrupted = true;
                eprintln!("interrupted: cancelling the job once it is set up");
            }
        }
    };
    if interrupted {
        mgr.cancel(&jid).await;
    }
    Ok((jid, plan, interrupted))
}

/// Runs a merge in this process and waits for it.
pub async fn run(
    recipe_text: &str,
    output: &str,
    o: &RunOptions,
    resolver: Resolver,
) -> Result<Summary> {
    // SIGINT and SIGTERM (what Kubernetes and `kill` send) both cancel the job, which removes
    // its partial output; listened for from before the output files exist, and once, so a
    // signal between two waits is not lost
    let signal = crate::server::shutdown_signal();
    tokio::pin!(signal);
    let mgr = JobManager::new(resolver.clone());
    let (jid, plan, mut interrupted) =
        set_up(&mgr, recipe_text, output, o, signal.as_mut()).await?;
    tracing::info!(
        job = %jid,
        tensors = plan.tensors.len(),
        files = plan.files.len(),
        "planned: {} bytes to write",
        plan.bytes_out()
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let exec = Executor::new(resolver)
        .with_cache(o.cache.clone())
        .with_tap(o.tap.clone());
    let opts = LoopOptions {
        worker_id: "embedded".into(),
        slots: o.workers.max(1),
        slot_memory: o.submit.slot_memory_for(&plan)?,
        max_idle: Duration::from_millis(20),
    };
    let workers = tokio::spawn(pull::run(mgr.clone(), exec, opts, stop_rx));
    let mut rx = mgr
        .watch(&jid)
        .ok_or_else(|| Error::job(&jid, "job vanished"))?;
    // the bar counts all the work (statistics passes too), not only the output written
    let bar = progress_bar(plan.bytes_out(), o.quiet);
    let status = loop {
        let st = rx.borrow_and_update().clone();
        bar.set_length(st.work_total.max(1));
        bar.set_position(st.work_done);
        if terminal(&st) {
            break st;
        }
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    break mgr.status(&jid).unwrap_or(st);
                }
            }
            _ = &mut signal, if !interrupted => {
                interrupted = true;
                let st = mgr.cancel(&jid).await;
                if st.is_some_and(|s| s.state == pb::JobState::Committing as i32) {
                    // every data file is written: the commit runs to the end
                    eprintln!("interrupted while committing: finishing the checkpoint");
                } else {
                    bar.abandon_with_message("interrupted: removing partial output");
                }
            }
        }
    };
    bar.finish_and_clear();
    let _ = stop_tx.send(true);
    let _ = workers.await;
    match pb::JobState::try_from(status.state) {
        Ok(pb::JobState::Succeeded) => Ok(Summary { status, plan }),
        Ok(pb::JobState::Cancelled) => Err(Error::Cancelled {
            job: jid,
            reason: status.error.clone(),
        }),
        _ => Err(Error::job(jid, &status.error)),
    }
}
