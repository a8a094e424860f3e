//! Jobs: one `JobManager` serves in-process workers (embedded mode) and the gRPC service alike.
//!
//! Where each concern lives:
//! - `state.rs`: the pure core of one job (`JobState`): task states, queue, statistics units,
//!   receipts; synchronous, given the time, no I/O. Results are accepted in `JobState::record`.
//! - `lease.rs`: the lease table (lease id → worker, job, task) and lease ids (random,
//!   bound to the worker that polled them).
//! - `limits.rs`: the coordinator's limits (task run time, slots per worker, jobs held, ended
//!   jobs' retention, recipe size).
//! - `tasks.rs`: building the `pb::Task` a worker runs from the plan.
//! - `options.rs`: `SubmitOptions` and their `JobOptions` message.
//! - `resume.rs`: `recover`/`resume`, rebuilding the journal's unfinished jobs after a restart.
//! - `finish.rs`: completing output files, the commit, and ending jobs (removing the outputs of
//!   a job that does not succeed).
//! - `group.rs`: jobs that share their reads (a sweep's points), leased together.
//! - `workers.rs`: the worker RPCs (poll, renew, complete, fail), lease expiry, and the
//!   `WorkSource` in-process workers use.
//! - this file: the async orchestration: planning and submitting a job, its status.
//!
//! State is in memory; with a journal (`--state`), every fact a restart needs is recorded
//! before it is acted on, and `recover` resumes the journal's unfinished jobs.
//!
//! **Lock order**: `jobs`, then `leases` or `history`. `lease_ttl`, `limits` and
//! `last_expiry_scan` are taken alone (copied out, never held while taking another). No lock is held across an
//! `.await`.

mod finish;
mod group;
pub mod lease;
pub(crate) mod limits;
mod options;
mod prepare;
mod resume;
pub mod state;
mod tasks;
mod workers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardmerge_proto as pb;
use shardmerge_worker::storage::{Location, Resolver, Upload};
use tokio::sync::watch;

use crate::claim::Claim;
use crate::cut::Cut;
use crate::error::{Error, Result};
use crate::journal::{layout_crc, JobJournal, Journal, NoJournal};
use crate::plan::Plan;
use lease::{LeaseRules, LeaseTable};
pub(crate) use limits::Limits;
pub use options::{ProcessBudget, SubmitOptions, MIN_SLOT_MEMORY};
use prepare::CutLike;
pub use state::AuditRules;
use state::JobState;
pub(crate) use tasks::tensor_job;

/// A job as the manager holds it: its state, where it writes, and who watches it.
struct Job {
    state: JobState,
    out: Location,
    uploads: Vec<Upload>,
    /// An `--overwrite` job: its data files complete only at the commit (see
    /// `commit::commit_checkpoint`), so the output's old checkpoint stays whole until then.
    replace: bool,
    /// The job's claim on its output (`claim.rs`), released at the commit or the job's end.
    claim: Option<Arc<Claim>>,
    started: Instant,
    /// When it ended (set as its final status is published; its elapsed time stops there, and
    /// its retention in memory counts from there).
    ended: Option<Instant>,
    tx: watch::Sender<pb::JobStatus>,
    /// Jobs sharing this one's reads (`group.rs`): the leader it rides on, or its riders.
    leader: Option<String>,
    riders: Vec<String>,
    /// A point of a grid not linked yet (`group.rs`): it leases nothing until it is.
    held: bool,
}

impl Job {
    fn new(state: JobState, out: Location, uploads: Vec<Upload>, replace: bool) -> Job {
        let (tx, _) = watch::channel(state.status.clone());
        Job {
            state,
            out,
            uploads,
            replace,
            claim: None,
            started: Instant::now(),
            ended: None,
            tx,
            leader: None,
            riders: Vec::new(),
            held: false,
        }
    }

    /// The job's status as of `now`: its elapsed time stops when it ends, and an ended job
    /// holds no leases (its lease table entries are dropped as it ends).
    fn refresh(&mut self, now: Instant) {
        if self.state.terminal() && self.ended.is_none() {
            self.ended = Some(now);
        }
        let until = self.ended.unwrap_or(now);
        self.state.status.elapsed_seconds = until.duration_since(self.started).as_secs_f64();
        self.state.status.leases_active = if self.state.terminal() {
            0
        } else {
            self.state.leases_active()
        };
    }

    fn publish(&mut self) {
        self.refresh(Instant::now());
        // send_replace, not send: with no watcher subscribed at this moment, `send` would drop
        // the status, and a client that starts watching afterwards would wait forever on the
        // last one it was given (seen: `submit --wait` of a job that ended within a poll)
        self.tx.send_replace(self.state.status.clone());
    }
}

pub struct JobManager {
    resolver: Resolver,
    journal: Arc<dyn JobJournal>,
    /// Jobs that ended before this coordinator started (from the journal), for `status`.
    history: Mutex<HashMap<String, pb::JobStatus>>,
    jobs: Mutex<HashMap<String, Job>>,
    leases: Mutex<LeaseTable>,
    next_id: std::sync::atomic::AtomicU64,
    lease_ttl: Mutex<Duration>,
    limits: Mutex<Limits>,
    /// When leases were last checked for expiry: polls arrive far more often than leases
    /// can expire, and a check walks every task.
    last_expiry_scan: Mutex<Option<Instant>>,
    /// Plans running at once (`prepare`).
    planning: Arc<tokio::sync::Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobManager {
    pub fn new(resolver: Resolver) -> Arc<Self> {
        Self::build(resolver, Arc::new(NoJournal))
    }

    /// A job manager that records its jobs in `journal` (call `recover` to resume the ones
    /// it holds).
    pub fn with_journal(resolver: Resolver, journal: Journal) -> Arc<Self> {
        Self::build(resolver, Arc::new(journal))
    }

    fn build(resolver: Resolver, journal: Arc<dyn JobJournal>) -> Arc<Self> {
        Arc::new(JobManager {
            resolver,
            journal,
            history: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            leases: Mutex::new(LeaseTable::default()),
            next_id: std::sync::atomic::AtomicU64::new(1),
            lease_ttl: Mutex::new(Duration::from_secs(30)),
            limits: Mutex::new(Limits::default()),
            last_expiry_scan: Mutex::new(None),
            planning: Arc::new(tokio::sync::Semaphore::new(prepare::PLANS_AT_ONCE)),
        })
    }

    /// How long a lease lasts without renewal: the coordinator's one setting (`--lease-ttl`),
    /// set once before any job; jobs carry no TTL of their own.
    pub fn set_lease_ttl(&self, ttl: Duration) {
        *lock(&self.lease_ttl) = ttl;
    }

    fn ttl(&self) -> Duration {
        *lock(&self.lease_ttl)
    }

    fn rules(&self) -> LeaseRules {
        LeaseRules {
            ttl: self.ttl(),
            max_task_time: self.limits().max_task_time,
        }
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// A job id no job of this coordinator or its journal has.
    fn fresh_id(&self) -> String {
        loop {
            let id = format!(
                "job-{}-{}",
                std::process::id(),
                self.next_id
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            );
            if !lock(&self.jobs).contains_key(&id) && !lock(&self.history).contains_key(&id) {
                return id;
            }
        }
    }

    /// Plans a job, starts its output files, records it in the journal, and queues its tasks.
    pub async fn submit(
        &self,
        recipe_text: &str,
        output: &str,
        o: &SubmitOptions,
    ) -> Result<(String, Arc<Plan>)> {
        let alone = CutLike::new(Vec::new());
        self.submit_point(recipe_text, output, o, None, &alone)
            .await
    }

    /// [`Self::submit`] of a point of a grid, recording the grid's first job (`grid_leader`)
    /// in the journal so that a restart links the points again.
    pub(crate) async fn submit_point(
        &self,
        recipe_text: &str,
        output: &str,
        o: &SubmitOptions,
        grid_leader: Option<&str>,
        cut_like: &Arc<CutLike>,
    ) -> Result<(String, Arc<Plan>)> {
        let (plan, cut, out) = self.prepare(recipe_text, output, o, cut_like).await?;
        // Refuses an output that overlaps an input, before anything is written there.
        crate::output::check_overlap(&plan, &out)?;
        let id = self.fresh_id();
        // One owner per output: claimed before anything is checked or written there; given
        // back if the job does not start.
        let claim = Arc::new(Claim::take(&out, &id, o.overwrite, None).await?);
        match self
            .start(
                &id,
                recipe_text,
                &plan,
                &cut,
                &out,
                o,
                &claim,
                (grid_leader, cut_like),
            )
            .await
        {
            Ok(uploads) => {
                let mut state =
                    JobState::new(id.clone(), plan, cut, out.uri(), state::kernel_reduce);
                state.set_audits(self.limits().audit);
                let plan = state.plan.clone();
                let mut job = Job::new(state, out, uploads, o.overwrite);
                job.claim = Some(claim);
                job.held = o.points > 1;
                lock(&self.jobs).insert(id.clone(), job);
                Ok((id, plan))
            }
            Err(e) => {
                claim.release().await;
                Err(e)
            }
        }
    }

    /// Checks a claimed output, starts its uploads and records the job in the journal.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        id: &str,
        recipe_text: &str,
        plan: &Plan,
        cut: &Cut,
        out: &Location,
        o: &SubmitOptions,
        claim: &Claim,
        (grid_leader, cut_like): (Option<&str>, &CutLike),
    ) -> Result<Vec<Upload>> {
        // Refuses an output that holds files without --overwrite. With --overwrite nothing in
        // it changes until the commit.
        crate::output::check_held(out, o.overwrite).await?;
        let uploads = begin_uploads(plan, out).await?;
        let rec = pb::JournalJob {
            job_id: id.to_string(),
            recipe_yaml: recipe_text.to_string(),
            output_uri: out.uri(),
            options: Some(o.to_proto()),
            uploads: uploads
                .iter()
                .map(|u| pb::JournalUpload {
                    path: u.path.clone(),
                    id: u.id.clone(),
                })
                .collect(),
            layout_crc: layout_crc(plan, cut),
            claim: claim.token(),
            grid_leader: grid_leader.unwrap_or_default().to_string(),
            cut_like: cut_like.texts.clone(),
        };
        if let Err(e) = self.journal.job_started(&rec).await {
            for u in &uploads {
                let _ = out.store.abort_upload(u).await;
            }
            return Err(Error::Journal {
                uri: self.journal.uri(),
                reason: format!(
                    "recording the job in the journal {}: {e}",
                    self.journal.uri()
                ),
            });
        }
        Ok(uploads)
    }

    pub fn status(&self, job: &str) -> Option<pb::JobStatus> {
        let mut jobs = lock(&self.jobs);
        let Some(j) = jobs.get_mut(job) else {
            return lock(&self.history).get(job).cloned();
        };
        j.refresh(Instant::now());
        Some(j.state.status.clone())
    }

    pub fn list(&self) -> Vec<pb::JobStatus> {
        let now = Instant::now();
        self.sweep(now);
        let mut all: Vec<pb::JobStatus> = lock(&self.history).values().cloned().collect();
        all.extend(lock(&self.jobs).values_mut().map(|j| {
            j.refresh(now);
            j.state.status.clone()
        }));
        all
    }

    pub fn watch(&self, job: &str) -> Option<watch::Receiver<pb::JobStatus>> {
        lock(&self.jobs).get(job).map(|j| j.tx.subscribe())
    }

    /// Fails a job: aborts its uploads so nothing looks finished.
    pub(crate) async fn fail_job(&self, jid: &str, msg: &str) {
        self.end_job(jid, pb::JobState::Failed, msg).await;
    }

    /// Cancels a job, unless it is already committing its checkpoint (every data file is
    /// complete; removing them under the commit could leave an index without its files) or has
    /// ended. Returns the job's status afterwards: CANCELLED, or the state that refused it.
    pub async fn cancel(&self, jid: &str) -> Option<pb::JobStatus> {
        self.end_job(jid, pb::JobState::Cancelled, "cancelled")
            .await;
        self.status(jid)
    }
}

/// Starts the upload of every output file (aborting the ones started if one cannot start).
async fn begin_uploads(plan: &Plan, out: &Location) -> Result<Vec<Upload>> {
    let mut uploads = Vec::new();
    for f in &plan.files {
        let loc = out.join(&f.name);
        match loc.store.begin_upload(&loc.path, f.layout.total_size).await {
            Ok(u) => uploads.push(u),
            Err(e) => {
                for u in &uploads {
                    let _ = out.store.abort_upload(u).await;
                }
                return Err(e.into());
            }
        }
    }
    Ok(uploads)
}

#[cfg(test)]
mod audit_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
