//! The worker-facing side of the manager: polling for tasks, renewing leases, completing and
//! failing tasks (the gRPC service's and the in-process workers' `WorkSource`), and expiring
//! leases that ran out.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use shardmerge_proto as pb;
use shardmerge_worker::pull::{SourceError, WorkSource};

use super::lease::Lease;
use super::state::{AuditEvent, Holder, Recorded, Renewal, TaskFailed};
use super::{group, lock, tasks, JobManager};

impl JobManager {
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
        // `free_slots` is what the worker can start now, beside what it holds (a slot writing
        // its last group behind it holds that group's leases while it computes the next)
        let want = (req.free_slots.max(1) as usize).min(max_slots.saturating_sub(held));
        if want == 0 {
            tracing::debug!(worker = %req.worker_id, "holds {held} leases, the most one worker may");
            out.retry_after_ms = 250;
            return out;
        }
        let p = group::Poller {
            worker: &req.worker_id,
            now,
            rules,
        };
        let ids: Vec<String> = jobs.keys().cloned().collect();
        for id in ids {
            if out.leases.len() >= want || group::rides(&jobs, &id) {
                continue;
            }
            let Some(j) = jobs.get_mut(&id) else { continue };
            if j.state.terminal() {
                continue;
            }
            let granted = j
                .state
                .lease_next(want - out.leases.len(), &req.worker_id, now, rules);
            let mut given = Vec::with_capacity(granted.len());
            for g in &granted {
                leases.grant(Lease {
                    id: g.lease.clone(),
                    worker: req.worker_id.clone(),
                    job: j.state.id.clone(),
                    item: g.item,
                    granted_at: now,
                });
                given.push(pb::Lease {
                    lease_id: g.lease.clone(),
                    ttl_ms: ttl.as_millis() as u64,
                    task: Some(tasks::build_task(
                        &j.state, &j.out, &j.uploads, g.item, g.attempt,
                    )),
                    riders: Vec::new(),
                });
            }
            if !granted.is_empty() {
                j.publish();
            }
            let riders = j.riders.clone();
            let units: Vec<usize> = match riders.is_empty() {
                true => Vec::new(),
                false => j.state.cut.units.iter().map(|u| u.tensor).collect(),
            };
            for (g, l) in granted.iter().zip(given.iter_mut()) {
                let of = (riders.as_slice(), units.as_slice());
                l.riders = group::lease_riders(&mut jobs, &mut leases, of, g.item, &p);
            }
            out.leases.extend(given);
        }
        out
    }

    /// `poll`, then the audits that wait for a worker process (`JobState::audit_tick`): the
    /// gRPC service's and in-process workers' poll.
    pub async fn poll_work(&self, req: &pb::PollWorkRequest) -> pb::PollWorkResponse {
        let out = self.poll(req);
        let now = Instant::now();
        let gone = self.ttl() * 2;
        let ticked: Vec<(String, Recorded, Vec<AuditEvent>)> = {
            let mut jobs = lock(&self.jobs);
            jobs.values_mut()
                .filter(|j| j.state.auditing() && !j.state.terminal())
                .map(|j| {
                    let r = j.state.audit_tick(now, gone);
                    (j.state.id.clone(), r, j.state.take_audit_events())
                })
                .filter(|(_, r, e)| !e.is_empty() || matches!(r, Recorded::FilesComplete(_)))
                .collect()
        };
        for (jid, r, events) in ticked {
            self.after_audits(&jid, r, events).await;
        }
        out
    }

    /// The job `worker`'s process is quarantined in, if any: it gets no work.
    pub fn quarantined_in(&self, worker: &str) -> Option<String> {
        let jobs = lock(&self.jobs);
        let j = jobs.values().find(|j| j.state.is_quarantined(worker))?;
        Some(j.state.id.clone())
    }

    /// Acts on what audits decided: revoked leases forgotten, quarantines and skipped audits
    /// logged, files completed, an undecidable disagreement failing the job.
    async fn after_audits(&self, jid: &str, r: Recorded, events: Vec<AuditEvent>) {
        let mut fail = None;
        for e in events {
            match e {
                AuditEvent::Quarantined {
                    process,
                    task,
                    why,
                    leases,
                } => {
                    let mut table = lock(&self.leases);
                    leases.iter().for_each(|l| drop(table.take(l)));
                    tracing::warn!(
                        job = %jid,
                        worker = %process,
                        task,
                        "worker process {process:?} quarantined: an audit found its result wrong                          ({why}); it gets no more work and every write task it did in this job                          runs again on other workers"
                    );
                }
                AuditEvent::Alone(msg) => tracing::warn!(job = %jid, "{msg}"),
                AuditEvent::Undecided(msg) => fail = Some(msg),
            }
        }
        if let Some(j) = lock(&self.jobs).get_mut(jid) {
            j.publish();
        }
        if let Some(msg) = fail {
            self.fail_job(jid, &msg).await;
            return;
        }
        if let Recorded::FilesComplete(files) = r {
            for fi in files {
                self.finish_file(jid, fi).await;
            }
        }
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
            if j.state.lease_ran_out(it, &req.lease_id, Instant::now()) {
                drop(jobs);
                self.refuse_late(&jid, it, &req.worker_id);
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
        if !self
            .journal_result(&jid, it, &key, &result, &req.lease_id)
            .await
        {
            return false;
        }
        // (the lease may have expired while the journal was written; the result stands)
        let recorded = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(&jid) else {
                return false;
            };
            let r = j.state.record_by(it, result, Some(&req.worker_id));
            if !matches!(r, Ok(Recorded::Ignored)) {
                j.publish();
            }
            r.map(|r| (r, j.state.take_audit_events()))
        };
        match recorded {
            Ok((Recorded::Ignored, _)) => return false,
            Ok((Recorded::FileComplete(fi), _)) => self.finish_file(&jid, fi).await,
            Ok((r, events)) => self.after_audits(&jid, r, events).await,
            Err(e) => self.fail_job(&jid, &e.to_string()).await,
        }
        true
    }

    /// Journals an accepted result before it is acted on (what a restart finds recorded is what
    /// this coordinator acted on); audits are not journaled (a restart does not resume them).
    /// False when the journal failed: the task runs again.
    async fn journal_result(
        &self,
        jid: &str,
        it: crate::journal::Item,
        key: &str,
        result: &pb::TaskResult,
        lease: &str,
    ) -> bool {
        if matches!(it, crate::journal::Item::Audit(_)) {
            return true;
        }
        let Err(e) = self.journal.task_done(jid, key, result).await else {
            return true;
        };
        tracing::warn!(job = %jid, "journal: {e}; task {key} runs again");
        if let Some(j) = lock(&self.jobs).get_mut(jid) {
            j.state.requeue(it, lease);
        }
        false
    }

    /// A result that came after its lease ran out: refused, not taken, since past its deadline
    /// the task is someone else's to run (the expiry scan may simply not have run yet): the
    /// job's late leases are expired now.
    fn refuse_late(&self, jid: &str, it: crate::journal::Item, worker: &str) {
        tracing::warn!(
            job = %jid,
            worker = %worker,
            "CompleteTask refused: task {it:?}'s lease had already expired (renew it within \
             --lease-ttl); the task runs again"
        );
        let mut jobs = lock(&self.jobs);
        let Some(j) = jobs.get_mut(jid) else { return };
        let gone = j.state.expire(Instant::now());
        j.publish();
        let mut leases = lock(&self.leases);
        for (_, l) in gone {
            leases.take(&l);
        }
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

/// The job manager is itself a work source for in-process workers.
#[async_trait]
impl WorkSource for JobManager {
    async fn poll(
        &self,
        req: pb::PollWorkRequest,
    ) -> std::result::Result<pb::PollWorkResponse, SourceError> {
        Ok(JobManager::poll_work(self, &req).await)
    }
    async fn renew(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> std::result::Result<pb::RenewLeaseResponse, SourceError> {
        Ok(JobManager::renew(self, &req))
    }
    async fn complete(
        &self,
        req: pb::CompleteTaskRequest,
    ) -> std::result::Result<pb::CompleteTaskResponse, SourceError> {
        Ok(pb::CompleteTaskResponse {
            accepted: JobManager::complete(self, &req).await,
        })
    }
    async fn fail(&self, req: pb::FailTaskRequest) -> std::result::Result<(), SourceError> {
        JobManager::fail(self, &req).await;
        Ok(())
    }
}
