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
//! - this file: the async orchestration: planning a submitted job, leases, results, journal
//!   writes.
//!
//! State is in memory; with a journal (`--state`), every fact a restart needs is recorded
//! before it is acted on, and `recover` resumes the journal's unfinished jobs.
//!
//! **Lock order**: `jobs`, then `leases` or `history`. `lease_ttl`, `limits` and
//! `last_expiry_scan` are taken alone (copied out, never held while taking another). No lock is held across an
//! `.await`.

mod finish;
pub mod lease;
pub mod limits;
mod options;
mod resume;
pub mod state;
mod tasks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shardmerge_proto as pb;
use shardmerge_worker::pull::WorkSource;
use shardmerge_worker::storage::{Location, Resolver, Upload};
use tokio::sync::watch;

use crate::cut::{self, Cut, CutOptions};
use crate::error::{Error, Result};
use crate::journal::{layout_crc, JobJournal, Journal, NoJournal};
use crate::plan::{self, Plan, PlanOptions};
use crate::recipe::Recipe;
use lease::{Lease, LeaseRules, LeaseTable};
pub use limits::Limits;
pub use options::{SubmitOptions, DEFAULT_SLOT_MEMORY, DEFAULT_TASK_SIZE};
pub use state::MAX_ATTEMPTS;
use state::{Holder, JobState, Recorded, Renewal, TaskFailed};

/// A job as the manager holds it: its state, where it writes, and who watches it.
struct Job {
    state: JobState,
    out: Location,
    uploads: Vec<Upload>,
    /// An `--overwrite` job: its data files complete only at the commit (see
    /// `commit::commit_checkpoint`), so the output's old checkpoint stays whole until then.
    replace: bool,
    started: Instant,
    /// When it was first seen ended (for its retention in memory).
    ended: Option<Instant>,
    tx: watch::Sender<pb::JobStatus>,
}

impl Job {
    fn new(state: JobState, out: Location, uploads: Vec<Upload>, replace: bool) -> Job {
        let (tx, _) = watch::channel(state.status.clone());
        Job {
            state,
            out,
            uploads,
            replace,
            started: Instant::now(),
            ended: None,
            tx,
        }
    }

    fn publish(&mut self) {
        self.state.status.elapsed_seconds = self.started.elapsed().as_secs_f64();
        self.state.status.leases_active = self.state.leases_active();
        let _ = self.tx.send(self.state.status.clone());
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

    /// Plans a job and cuts it into tasks (reads headers only).
    async fn prepare(
        &self,
        recipe_text: &str,
        output: &str,
        o: &SubmitOptions,
    ) -> Result<(Plan, Cut, Location)> {
        let recipe = Recipe::parse(recipe_text)?;
        let plan_options = PlanOptions {
            out_shard_size: o.out_shard_size,
            seed: o.seed,
            rng: o.rng,
            unsafe_truncate_embeddings: o.unsafe_truncate_embeddings,
            compute_float32: o.compute_float32,
        };
        let plan = plan::plan(recipe, &self.resolver, &o.base_dir, &plan_options).await?;
        let out = self.resolver.resolve(output, &o.base_dir)?;
        let cut = cut::cut(
            &plan,
            &CutOptions {
                task_size: o.task_size,
                slot_memory: o.slot_memory,
                min_part: out.store.min_part_size(),
            },
        );
        Ok((plan, cut, out))
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
        let (plan, cut, out) = self.prepare(recipe_text, output, o).await?;
        // Refuses an output that overlaps an input, or holds files without --overwrite. With
        // --overwrite nothing in it changes until the commit.
        crate::output::check(&plan, &out, o.overwrite).await?;
        let uploads = begin_uploads(&plan, &out).await?;
        let id = self.fresh_id();
        let rec = pb::JournalJob {
            job_id: id.clone(),
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
            layout_crc: layout_crc(&plan, &cut),
        };
        if let Err(e) = self.journal.job_started(&rec).await {
            for u in &uploads {
                let _ = out.store.abort_upload(u).await;
            }
            return Err(Error::Journal(format!(
                "recording the job in the journal {}: {e}",
                self.journal.uri()
            )));
        }
        let state = JobState::new(id.clone(), plan, cut, out.uri(), state::kernel_reduce);
        let plan = state.plan.clone();
        lock(&self.jobs).insert(id.clone(), Job::new(state, out, uploads, o.overwrite));
        Ok((id, plan))
    }

    pub fn status(&self, job: &str) -> Option<pb::JobStatus> {
        let mut jobs = lock(&self.jobs);
        let Some(j) = jobs.get_mut(job) else {
            return lock(&self.history).get(job).cloned();
        };
        j.state.status.elapsed_seconds = j.started.elapsed().as_secs_f64();
        Some(j.state.status.clone())
    }

    pub fn list(&self) -> Vec<pb::JobStatus> {
        self.sweep(Instant::now());
        let mut all: Vec<pb::JobStatus> = lock(&self.history).values().cloned().collect();
        all.extend(lock(&self.jobs).values().map(|j| j.state.status.clone()));
        all
    }

    pub fn watch(&self, job: &str) -> Option<watch::Receiver<pb::JobStatus>> {
        lock(&self.jobs).get(job).map(|j| j.tx.subscribe())
    }

    /// Re-queues work whose lease ran out.
    fn expire(&self, now: Instant) {
        let ttl = self.ttl();
        {
            let mut last = lock(&self.last_expiry_scan);
            let every = (ttl / 20).min(Duration::from_millis(250));
            if last.is_some_and(|t| now.duration_since(t) < every) {
                return;
            }
            *last = Some(now);
        }
        self.sweep(now);
        let mut jobs = lock(&self.jobs);
        let mut leases = lock(&self.leases);
        for j in jobs.values_mut() {
            let gone = j.state.expire(now);
            for (item, lease) in &gone {
                let worker = leases.take(lease).map(|l| l.worker).unwrap_or_default();
                tracing::warn!(
                    job = %j.state.id,
                    "task {item:?}: the lease of worker {worker:?} expired (no renewal, or the \
                     task ran past --max-task-time); the task runs again"
                );
            }
            if !gone.is_empty() {
                j.publish();
            }
        }
    }

    /// Hands `req.worker_id` queued tasks: as many as it has free slots, but no more than
    /// `--max-slots-per-worker` leases held at once by that worker id.
    pub fn poll(&self, req: &pb::PollWorkRequest) -> pb::PollWorkResponse {
        let now = Instant::now();
        self.expire(now);
        let rules = self.rules();
        let ttl = rules.ttl;
        let max_slots = self.limits().max_slots_per_worker.max(1) as usize;
        let mut out = pb::PollWorkResponse {
            leases: Vec::new(),
            retry_after_ms: 20,
        };
        let mut jobs = lock(&self.jobs);
        let mut leases = lock(&self.leases);
        let held = leases.held_by(&req.worker_id);
        let want = (req.free_slots.max(1) as usize)
            .min(max_slots)
            .saturating_sub(held);
        if want == 0 {
            tracing::debug!(worker = %req.worker_id, "holds {held} leases, the most one worker may");
            out.retry_after_ms = 250;
            return out;
        }
        for j in jobs.values_mut() {
            if j.state.terminal() || out.leases.len() >= want {
                continue;
            }
            let granted = j
                .state
                .lease_next(want - out.leases.len(), &req.worker_id, now, rules);
            for g in &granted {
                leases.grant(Lease {
                    id: g.lease.clone(),
                    worker: req.worker_id.clone(),
                    job: j.state.id.clone(),
                    item: g.item,
                    granted_at: now,
                });
                out.leases.push(pb::Lease {
                    lease_id: g.lease.clone(),
                    ttl_ms: ttl.as_millis() as u64,
                    task: Some(tasks::build_task(
                        &j.state, &j.out, &j.uploads, g.item, g.attempt,
                    )),
                });
            }
            if !granted.is_empty() {
                j.publish();
            }
        }
        out
    }

    pub fn renew(&self, req: &pb::RenewLeaseRequest) -> pb::RenewLeaseResponse {
        let ttl = self.ttl();
        let now = Instant::now();
        let mut jobs = lock(&self.jobs);
        let leases = lock(&self.leases);
        let mut lost = Vec::new();
        for l in &req.lease_ids {
            let answer = match leases.get(l) {
                Some(lease) => jobs.get_mut(&lease.job).map_or(Renewal::NotHeld, |j| {
                    j.state.renew(lease.item, l, &req.worker_id, now, ttl)
                }),
                None => Renewal::NotHeld,
            };
            match answer {
                Renewal::Renewed => continue,
                Renewal::NotHeld => {}
                Renewal::OtherWorker => refused_use("RenewLease", &req.worker_id),
                Renewal::OverTime => {
                    if let Some(lease) = leases.get(l) {
                        tracing::warn!(
                            job = %lease.job,
                            "task {:?} of worker {:?} ran past --max-task-time: its lease is \
                             no longer renewed and the task will run again",
                            lease.item,
                            req.worker_id
                        );
                    }
                }
            }
            lost.push(l.clone());
        }
        pb::RenewLeaseResponse {
            lost,
            ttl_ms: ttl.as_millis() as u64,
        }
    }

    /// Records a task's result. Returns false when the lease was no longer held, is held by
    /// another worker id, or the result does not check out against the plan (refused; the
    /// task runs again and the refusal counts as one of its attempts).
    pub async fn complete(&self, req: &pb::CompleteTaskRequest) -> bool {
        let Some(lease) = self.lease_of(&req.lease_id, &req.worker_id, "CompleteTask") else {
            return false;
        };
        let (jid, it) = (lease.job, lease.item);
        let result = req.result.clone().unwrap_or_default();
        let checked = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(&jid) else {
                return false;
            };
            if j.state.terminal()
                || j.state.holder(it, &req.lease_id, &req.worker_id) != Holder::Held
            {
                return false;
            }
            let multipart = !j.out.store.is_local();
            match j.state.check_result(it, &result, multipart) {
                Ok(()) => Ok(j.state.task_key(it)),
                Err(why) => {
                    tracing::warn!(job = %jid, worker = %req.worker_id, "result refused: {why}; the task runs again");
                    let failed = j.state.fail_task(
                        it,
                        &req.lease_id,
                        &req.worker_id,
                        true,
                        &format!("result refused: {why}"),
                    );
                    j.publish();
                    Err(failed)
                }
            }
        };
        lock(&self.leases).take(&req.lease_id);
        let key = match checked {
            Ok(key) => key,
            Err(TaskFailed::Fatal(msg)) => {
                self.fail_job(&jid, &msg).await;
                return false;
            }
            Err(_) => return false,
        };
        // Journal first: what a restart finds recorded is what this coordinator acted on.
        if let Err(e) = self.journal.task_done(&jid, &key, &result).await {
            tracing::warn!(job = %jid, "journal: {e}; task {key} runs again");
            if let Some(j) = lock(&self.jobs).get_mut(&jid) {
                j.state.requeue(it, &req.lease_id);
            }
            return false;
        }
        // (the lease may have expired while the journal was written; the result stands)
        let recorded = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(&jid) else {
                return false;
            };
            let r = j.state.record(it, result);
            if !matches!(r, Ok(Recorded::Ignored)) {
                j.publish();
            }
            r
        };
        match recorded {
            Ok(Recorded::Ignored) => return false,
            Ok(Recorded::FileComplete(fi)) => self.finish_file(&jid, fi).await,
            Ok(Recorded::Accepted) => {}
            Err(e) => self.fail_job(&jid, &e.to_string()).await,
        }
        true
    }

    pub async fn fail(&self, req: &pb::FailTaskRequest) {
        let Some(lease) = self.lease_of(&req.lease_id, &req.worker_id, "FailTask") else {
            return;
        };
        lock(&self.leases).take(&req.lease_id);
        let jid = lease.job;
        let fatal = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(&jid) else { return };
            match j.state.fail_task(
                lease.item,
                &req.lease_id,
                &req.worker_id,
                req.retryable,
                &req.error,
            ) {
                TaskFailed::Ignored => return,
                TaskFailed::OtherWorker => {
                    refused_use("FailTask", &req.worker_id);
                    return;
                }
                TaskFailed::Retried(attempt) => {
                    tracing::warn!(job = %jid, "task failed (attempt {attempt}), retrying: {}", req.error);
                    j.publish();
                    return;
                }
                TaskFailed::Fatal(msg) => msg,
            }
        };
        self.fail_job(&jid, &fatal).await;
    }

    /// The lease `id` if it is in force and `worker` holds it; a use by another worker id is
    /// refused (logged, without the lease id) and leaves the lease to its holder.
    fn lease_of(&self, id: &str, worker: &str, rpc: &str) -> Option<Lease> {
        let leases = lock(&self.leases);
        let lease = leases.get(id)?;
        if lease.worker != worker {
            refused_use(rpc, worker);
            return None;
        }
        Some(lease.clone())
    }

    /// Fails a job: aborts its uploads so nothing looks finished.
    pub async fn fail_job(&self, jid: &str, msg: &str) {
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

/// Logs a lease use refused because another worker id holds the lease (the lease id is not
/// logged: it is the holder's secret).
fn refused_use(rpc: &str, worker: &str) {
    tracing::warn!(
        worker = %worker,
        "{rpc} refused: the lease is held by another worker id (a misconfigured worker, or a \
         client using a lease it did not poll)"
    );
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

/// The job manager is itself a work source for in-process workers.
#[async_trait]
impl WorkSource for JobManager {
    async fn poll(
        &self,
        req: pb::PollWorkRequest,
    ) -> std::result::Result<pb::PollWorkResponse, String> {
        Ok(JobManager::poll(self, &req))
    }
    async fn renew(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> std::result::Result<pb::RenewLeaseResponse, String> {
        Ok(JobManager::renew(self, &req))
    }
    async fn complete(
        &self,
        req: pb::CompleteTaskRequest,
    ) -> std::result::Result<pb::CompleteTaskResponse, String> {
        Ok(pb::CompleteTaskResponse {
            accepted: JobManager::complete(self, &req).await,
        })
    }
    async fn fail(&self, req: pb::FailTaskRequest) -> std::result::Result<(), String> {
        JobManager::fail(self, &req).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
