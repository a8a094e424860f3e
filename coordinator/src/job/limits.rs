//! What one coordinator holds at most: lease rules (a task's maximum run time, the slots one
//! worker may hold), jobs kept in memory, and how long an ended job stays there. (A recipe's
//! size is capped where it is parsed: `recipe::max_recipe_bytes`.) Ended jobs past their
//! retention leave memory for `history` (their final status only; the journal keeps it
//! across restarts).

use std::time::{Duration, Instant};

use super::{lock, JobManager};
use crate::error::{Error, Result};

pub const DEFAULT_MAX_TASK_TIME: Duration = Duration::from_secs(3600);
pub const DEFAULT_MAX_SLOTS_PER_WORKER: u32 = 64;
pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(3600);
pub const DEFAULT_MAX_JOBS: usize = 100;
/// The default of `--max-plan-memory`: a 70B merge's plan takes a few MiB; a recipe of
/// thousands of models or an input of hundreds of thousands of tensors takes hundreds.
pub const DEFAULT_MAX_PLAN_MEMORY: u64 = 4 << 30;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a task may run under one lease, renewals included.
    pub max_task_time: Duration,
    /// Leases one worker id may hold at once (and so get from one poll).
    pub max_slots_per_worker: u32,
    /// How long an ended job stays in memory with its plan.
    pub job_retention: Duration,
    /// Jobs held in memory at once; submissions past it are refused.
    pub max_jobs: usize,
    /// How long planning one submitted job may take (`--max-plan-time`).
    pub max_plan_time: Duration,
    /// Memory the plans of the jobs held at once may take in all (`--max-plan-memory`).
    pub max_plan_memory: u64,
    /// Result audits of the jobs' write tasks (`--audit-fraction`; none by default, as in
    /// embedded mode, whose workers are the coordinator's own).
    pub audit: super::state::AuditRules,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_task_time: DEFAULT_MAX_TASK_TIME,
            max_slots_per_worker: DEFAULT_MAX_SLOTS_PER_WORKER,
            job_retention: DEFAULT_JOB_RETENTION,
            max_jobs: DEFAULT_MAX_JOBS,
            max_plan_time: super::prepare::DEFAULT_MAX_PLAN_TIME,
            max_plan_memory: DEFAULT_MAX_PLAN_MEMORY,
            audit: Default::default(),
        }
    }
}

impl JobManager {
    pub(crate) fn set_limits(&self, limits: Limits) {
        *lock(&self.limits) = limits;
    }

    pub(crate) fn limits(&self) -> Limits {
        *lock(&self.limits)
    }

    /// Whether `n` new jobs (a sweep's points are a job each) may be submitted now: the jobs
    /// held stay within `max_jobs` (ended jobs are dropped first, oldest first, retention or
    /// not, to make room).
    pub(crate) fn admit(&self, n: usize) -> Result<()> {
        let l = self.limits();
        let now = Instant::now();
        self.sweep(now);
        let mut jobs = lock(&self.jobs);
        if jobs.len() + n <= l.max_jobs {
            return Ok(());
        }
        let mut ended: Vec<(Instant, String)> = jobs
            .iter()
            .filter(|(_, j)| j.state.terminal())
            .map(|(id, j)| (j.ended.unwrap_or(now), id.clone()))
            .collect();
        ended.sort();
        let excess = jobs.len() + n - l.max_jobs;
        let mut history = lock(&self.history);
        for (_, id) in ended.into_iter().take(excess) {
            if let Some(j) = jobs.remove(&id) {
                history.insert(id, j.state.status.clone());
            }
        }
        if jobs.len() + n <= l.max_jobs {
            return Ok(());
        }
        let asked = if n == 1 {
            String::new()
        } else {
            format!(" and this sweep's {n} points are a job each")
        };
        Err(Error::Exhausted {
            limit: "--max-jobs",
            reason: format!(
                "this coordinator already runs {} jobs (--max-jobs {}){asked}; wait for one to \
                 end, or cancel one",
                jobs.len(),
                l.max_jobs
            ),
        })
    }

    /// Whether a plan of `need` bytes may be held with the plans of the jobs held now (ended
    /// jobs are dropped first, oldest first, to make room).
    pub(super) fn plan_room(&self, need: u64) -> Result<()> {
        let max = self.limits().max_plan_memory;
        let mut jobs = lock(&self.jobs);
        let held = |jobs: &std::collections::HashMap<String, super::Job>| -> u64 {
            jobs.values().map(|j| j.state.plan.memory()).sum()
        };
        let mut ended: Vec<(Option<Instant>, String)> = jobs
            .iter()
            .filter(|(_, j)| j.state.terminal())
            .map(|(id, j)| (j.ended, id.clone()))
            .collect();
        ended.sort();
        let mut history = lock(&self.history);
        for (_, id) in ended {
            if held(&jobs).saturating_add(need) <= max {
                break;
            }
            if let Some(j) = jobs.remove(&id) {
                history.insert(id, j.state.status.clone());
            }
        }
        let held = held(&jobs);
        if held.saturating_add(need) <= max {
            return Ok(());
        }
        Err(Error::Exhausted {
            limit: "--max-plan-memory",
            reason: format!(
                "this job's plan takes about {} and the jobs held hold {} of the \
                 coordinator's --max-plan-memory {}; wait for a job to end, or merge fewer \
                 models or tensors at once",
                crate::size::human(need),
                crate::size::human(held),
                crate::size::human(max)
            ),
        })
    }

    /// Notes when each job ended, and moves the ones ended longer than the retention ago out
    /// of memory into `history` (their status only).
    pub(super) fn sweep(&self, now: Instant) {
        let retention = self.limits().job_retention;
        let mut jobs = lock(&self.jobs);
        let mut gone = Vec::new();
        for (id, j) in jobs.iter_mut() {
            if !j.state.terminal() {
                continue;
            }
            let ended = *j.ended.get_or_insert(now);
            if now.duration_since(ended) >= retention {
                gone.push(id.clone());
            }
        }
        if gone.is_empty() {
            return;
        }
        let mut history = lock(&self.history);
        for id in gone {
            if let Some(j) = jobs.remove(&id) {
                tracing::debug!(job = %id, "ended job dropped from memory (its status stays)");
                history.insert(id, j.state.status.clone());
            }
        }
        drop((jobs, history));
        // a job's plan is many small allocations: give their pages back, not only to malloc
        shardmerge_worker::exec::release_free_memory();
    }
}
