//! Several merges over the same inputs in one process, reading the inputs once: the points of
//! a sweep. Each point is a job of its own (its output, claim and commit, byte-identical to
//! running it alone); the jobs are linked (`job/group.rs`) so each task of the first is leased
//! with the same task of the others, and a worker slot reads its rows once for all of them.
//! Each job's tasks are cut to its share of the slot (`SubmitOptions::points`).

use std::time::Duration;

use shardmerge_proto as pb;
use shardmerge_worker::exec::Executor;
use shardmerge_worker::pull::{self, LoopOptions};
use shardmerge_worker::storage::Resolver;
use tokio::sync::watch;

use super::{progress_bar, RunOptions, Summary};
use crate::error::{Error, Result};
use crate::job::JobManager;

/// One merge of a grid: its recipe and output.
pub struct GridPoint<'a> {
    pub recipe: &'a str,
    pub out: &'a str,
}

/// What each point's merge came to: its summary, or why it failed.
pub type PointOutcome = std::result::Result<Summary, Error>;

/// Runs the merges `points` in this process, reading their inputs once, and waits for all of
/// them. An error before any merge starts (a recipe that does not plan, an output that is
/// taken) stops the grid with no job left; once they run, each point ends on its own.
pub async fn run_grid(
    points: &[GridPoint<'_>],
    o: &RunOptions,
    resolver: Resolver,
) -> Result<Vec<PointOutcome>> {
    let signal = crate::server::shutdown_signal();
    tokio::pin!(signal);
    let mgr = JobManager::new(resolver.clone());
    let mut o = o.clone();
    o.submit.points = u32::try_from(points.len().max(1)).unwrap_or(u32::MAX);
    let pairs: Vec<(&str, &str)> = points.iter().map(|p| (p.recipe, p.out)).collect();
    let jobs = mgr.submit_grid(&pairs, &o.submit).await?;
    let Some((_, plan)) = jobs.first().cloned() else {
        return Ok(Vec::new());
    };
    let ids: Vec<String> = jobs.iter().map(|(j, _)| j.clone()).collect();
    if let Some(tap) = &o.tap {
        // the report measures each point by its output's location (`report::compute`)
        for (id, p) in ids.iter().zip(points) {
            tap.name_point(id, &resolver.resolve(p.out, &super::cwd())?.uri());
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let opts = LoopOptions {
        worker_id: "embedded".into(),
        slots: o.workers.max(1),
        slot_memory: o.submit.whole_slot(&plan)?,
        max_idle: Duration::from_millis(20),
    };
    let exec = Executor::new(resolver)
        .with_cache(o.cache.clone())
        .with_tap(o.tap.clone());
    let workers = tokio::spawn(pull::run(mgr.clone(), exec, opts, stop_rx));
    let bar = progress_bar(1, o.quiet);
    let mut interrupted = false;
    let statuses = loop {
        let st: Vec<pb::JobStatus> = ids.iter().filter_map(|j| mgr.status(j)).collect();
        bar.set_length(st.iter().map(|s| s.work_total).sum::<u64>().max(1));
        bar.set_position(st.iter().map(|s| s.work_done).sum());
        if st.len() < ids.len() || st.iter().all(super::terminal) {
            break st;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = &mut signal, if !interrupted => {
                interrupted = true;
                bar.abandon_with_message("interrupted: removing partial output");
                for j in &ids {
                    mgr.cancel(j).await;
                }
            }
        }
    };
    bar.finish_and_clear();
    let _ = stop_tx.send(true);
    let _ = workers.await;
    Ok(jobs
        .into_iter()
        .zip(statuses)
        .map(|((jid, plan), status)| outcome(jid, plan, status))
        .collect())
}

fn outcome(
    jid: String,
    plan: std::sync::Arc<crate::plan::Plan>,
    status: pb::JobStatus,
) -> PointOutcome {
    match pb::JobState::try_from(status.state) {
        Ok(pb::JobState::Succeeded) => Ok(Summary { status, plan }),
        Ok(pb::JobState::Cancelled) => Err(Error::Cancelled {
            job: jid,
            reason: status.error.clone(),
        }),
        _ => Err(Error::job(jid, &status.error)),
    }
}
