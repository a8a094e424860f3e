//! The coordinator's Prometheus metrics: what the gRPC layer observes ([`Metered`]) and the
//! job manager's status snapshots at scrape time.

use super::*;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailLabels {
    retryable: String,
}

/// A lease the service handed out and has not seen end yet.
struct Open {
    kind: &'static str,
    method: String,
    granted: Instant,
    /// Granted or last renewed.
    seen: Instant,
}

/// The coordinator's metrics.
pub struct CoordinatorMetrics {
    registry: Registry,
    mgr: Arc<JobManager>,
    lease_ttl: Duration,
    // counters, from the service layer
    leases: Family<KindLabels, Counter>,
    done: Family<KindLabels, Counter>,
    rejected: Counter,
    failed: Family<FailLabels, Counter>,
    expired: Counter,
    read_bytes: Counter,
    written_bytes: Counter,
    task_seconds: Family<MethodLabels, Histogram>,
    // gauges, from snapshots at scrape time
    jobs: Family<StateLabels, Gauge>,
    queued: Gauge,
    leased: Gauge,
    retried: Gauge,
    planned_bytes: Gauge,
    job_written_bytes: Gauge,
    work_planned: Gauge,
    work_done: Gauge,
    workers: Gauge,
    worker_slots: Gauge,
    resident: Gauge,
    open: Mutex<HashMap<String, Open>>,
    /// Worker slot ids and when each last called.
    seen: Mutex<HashMap<String, Instant>>,
}

const JOB_STATES: [(pb::JobState, &str); 6] = [
    (pb::JobState::Queued, "queued"),
    (pb::JobState::Running, "running"),
    (pb::JobState::Committing, "committing"),
    (pb::JobState::Succeeded, "succeeded"),
    (pb::JobState::Failed, "failed"),
    (pb::JobState::Cancelled, "cancelled"),
];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The gauges set from snapshots at scrape time, in registration order: name and help.
const GAUGES: [(&str, &str); 10] = [
    // queued
    (
        "shardmerge_tasks_queued",
        "Tasks of unfinished jobs waiting for a worker (what the worker pool scales on)",
    ),
    // leased
    (
        "shardmerge_tasks_leased",
        "Tasks of unfinished jobs running on a worker now",
    ),
    // retried
    (
        "shardmerge_tasks_retried",
        "Task retries (expired leases, retryable failures) summed over the jobs known",
    ),
    // planned_bytes
    (
        "shardmerge_job_planned_bytes",
        "Output bytes planned, summed over the jobs known",
    ),
    // job_written_bytes
    (
        "shardmerge_job_written_bytes",
        "Output bytes written so far, summed over the jobs known",
    ),
    // work_planned
    (
        "shardmerge_job_work_planned_bytes",
        "All the work planned (bytes read and written by every pass, statistics passes \
             included), summed over the jobs known",
    ),
    // work_done
    (
        "shardmerge_job_work_done_bytes",
        "Work done so far (bytes read and written by every pass), summed over the jobs known",
    ),
    // workers
    (
        "shardmerge_workers_live",
        "Worker processes that called within the lease ttl",
    ),
    // worker_slots
    (
        "shardmerge_worker_slots_live",
        "Worker task slots that called within the lease ttl",
    ),
    // resident
    (
        "shardmerge_coordinator_resident_memory_bytes",
        "Resident memory of the coordinator process",
    ),
];

impl CoordinatorMetrics {
    pub fn new(mgr: Arc<JobManager>, lease_ttl: Duration) -> Arc<Self> {
        let mut r = Registry::default();
        let leases = Family::<KindLabels, Counter>::default();
        r.register(
            "shardmerge_leases_granted",
            "Task leases handed to workers, by task kind (write, stats)",
            leases.clone(),
        );
        let done = Family::<KindLabels, Counter>::default();
        r.register(
            "shardmerge_tasks_done",
            "Task results accepted, by task kind",
            done.clone(),
        );
        let rejected = Counter::default();
        r.register(
            "shardmerge_tasks_rejected",
            "Task results ignored because their lease had ended (the task ran again elsewhere)",
            rejected.clone(),
        );
        let failed = Family::<FailLabels, Counter>::default();
        r.register(
            "shardmerge_tasks_failed",
            "Task failures reported by workers; retryable ones run again, others fail the job",
            failed.clone(),
        );
        let expired = Counter::default();
        r.register(
            "shardmerge_lease_expiries",
            "Leases that ended without a report (worker lost or too slow to renew)",
            expired.clone(),
        );
        let read_bytes = Counter::default();
        r.register(
            "shardmerge_read_bytes",
            "Input bytes read by accepted tasks",
            read_bytes.clone(),
        );
        let written_bytes = Counter::default();
        r.register(
            "shardmerge_written_bytes",
            "Output bytes written by accepted tasks",
            written_bytes.clone(),
        );
        let task_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(wm::task_seconds_buckets())) as fn() -> Histogram,
        );
        r.register(
            "shardmerge_task_seconds",
            "Time from lease to accepted result, by merge method (header: a file header alone)",
            task_seconds.clone(),
        );
        let jobs = Family::<StateLabels, Gauge>::default();
        r.register(
            "shardmerge_jobs",
            "Jobs this coordinator knows, by state",
            jobs.clone(),
        );
        let [queued, leased, retried, planned_bytes, job_written_bytes, work_planned, work_done, workers, worker_slots, resident] =
            GAUGES.map(|(name, help)| {
                let g = Gauge::default();
                r.register(name, help, g.clone());
                g
            });
        Arc::new(CoordinatorMetrics {
            registry: r,
            mgr,
            lease_ttl,
            leases,
            done,
            rejected,
            failed,
            expired,
            read_bytes,
            written_bytes,
            task_seconds,
            jobs,
            queued,
            leased,
            retried,
            planned_bytes,
            job_written_bytes,
            work_planned,
            work_done,
            workers,
            worker_slots,
            resident,
            open: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        })
    }

    fn saw_worker(&self, id: &str) {
        lock(&self.seen).insert(id.to_string(), Instant::now());
    }

    fn granted(&self, lease: &pb::Lease) {
        let Some(task) = &lease.task else { return };
        let kind = wm::task_kind(task);
        self.leases
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
        let now = Instant::now();
        lock(&self.open).insert(
            lease.lease_id.clone(),
            Open {
                kind,
                method: wm::task_method(task),
                granted: now,
                seen: now,
            },
        );
    }

    fn renewed(&self, req: &pb::RenewLeaseRequest, resp: &pb::RenewLeaseResponse) {
        let now = Instant::now();
        let mut open = lock(&self.open);
        for id in &req.lease_ids {
            if resp.lost.contains(id) {
                if open.remove(id).is_some() {
                    self.expired.inc();
                }
            } else if let Some(o) = open.get_mut(id) {
                o.seen = now;
            }
        }
    }

    /// A CompleteTask call: `bytes` (read, written) of its result; `stats`: it carried
    /// statistics.
    fn completed(&self, lease_id: &str, bytes: Option<(u64, u64)>, stats: bool, accepted: bool) {
        let open = lock(&self.open).remove(lease_id);
        if !accepted {
            self.rejected.inc();
            if open.is_some() {
                // the lease had run out before the report came
                self.expired.inc();
            }
            return;
        }
        let kind = match &open {
            Some(o) => o.kind,
            None if stats => "stats",
            None => "write",
        };
        self.done
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
        if let Some((read, written)) = bytes {
            self.read_bytes.inc_by(read);
            self.written_bytes.inc_by(written);
        }
        if let Some(o) = open {
            self.task_seconds
                .get_or_create(&MethodLabels { method: o.method })
                .observe(o.granted.elapsed().as_secs_f64());
        }
    }

    fn failed(&self, req: &pb::FailTaskRequest) {
        lock(&self.open).remove(&req.lease_id);
        self.failed
            .get_or_create(&FailLabels {
                retryable: req.retryable.to_string(),
            })
            .inc();
    }

    /// Leases neither renewed nor reported for longer than the ttl have expired.
    fn sweep(&self, now: Instant) {
        let mut open = lock(&self.open);
        let before = open.len();
        open.retain(|_, o| now.duration_since(o.seen) <= self.lease_ttl);
        self.expired.inc_by((before - open.len()) as u64);
    }

    fn snapshot(&self) {
        let now = Instant::now();
        self.sweep(now);
        let mut by_state = HashMap::new();
        let (mut queued, mut leased, mut retried, mut planned, mut written) = (0u64, 0, 0, 0, 0);
        let (mut work_planned, mut work_done) = (0u64, 0u64);
        for s in self.mgr.list() {
            *by_state.entry(s.state).or_insert(0i64) += 1;
            retried += u64::from(s.retries);
            planned += s.bytes_total;
            written += s.bytes_done;
            work_planned += s.work_total;
            work_done += s.work_done;
            let active = matches!(
                pb::JobState::try_from(s.state),
                Ok(pb::JobState::Queued | pb::JobState::Running)
            );
            if active {
                let running = u64::from(s.leases_active);
                leased += running;
                queued += s.tasks_total.saturating_sub(s.tasks_done + running);
            }
        }
        for (state, name) in JOB_STATES {
            self.jobs
                .get_or_create(&StateLabels { state: name.into() })
                .set(by_state.get(&(state as i32)).copied().unwrap_or(0));
        }
        self.queued.set(as_i64(queued));
        self.leased.set(as_i64(leased));
        self.retried.set(as_i64(retried));
        self.planned_bytes.set(as_i64(planned));
        self.job_written_bytes.set(as_i64(written));
        self.work_planned.set(as_i64(work_planned));
        self.work_done.set(as_i64(work_done));
        let mut seen = lock(&self.seen);
        seen.retain(|_, at| now.duration_since(*at) <= self.lease_ttl);
        let processes: std::collections::HashSet<&str> = seen
            .keys()
            .map(|id| id.rsplit_once('/').map_or(id.as_str(), |(p, _)| p))
            .collect();
        self.workers.set(processes.len() as i64);
        self.worker_slots.set(seen.len() as i64);
        if let Some(b) = wm::resident_bytes() {
            self.resident.set(as_i64(b));
        }
    }
}

impl Endpoint for CoordinatorMetrics {
    fn render(&self) -> String {
        self.snapshot();
        wm::encode(&self.registry)
    }

    fn ready(&self) -> bool {
        true
    }
}

/// The `Coordinator` service with its calls observed for the metrics.
pub struct Metered {
    pub(super) inner: Service,
    pub(super) metrics: Arc<CoordinatorMetrics>,
}

#[tonic::async_trait]
impl Coordinator for Metered {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.inner.submit_job(req).await
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.inner.get_job(req).await
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.inner.list_jobs(req).await
    }

    type WatchJobStream = <Service as Coordinator>::WatchJobStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.inner.watch_job(req).await
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.inner.cancel_job(req).await
    }

    async fn poll_work(
        &self,
        req: Request<pb::PollWorkRequest>,
    ) -> Result<Response<pb::PollWorkResponse>, Status> {
        self.metrics.saw_worker(&req.get_ref().worker_id);
        let resp = self.inner.poll_work(req).await?;
        for lease in &resp.get_ref().leases {
            self.metrics.granted(lease);
        }
        Ok(resp)
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        self.metrics.saw_worker(&req.get_ref().worker_id);
        let r = req.get_ref().clone();
        let resp = self.inner.renew_lease(req).await?;
        self.metrics.renewed(&r, resp.get_ref());
        Ok(resp)
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        self.metrics.saw_worker(&req.get_ref().worker_id);
        let lease_id = req.get_ref().lease_id.clone();
        let result = req.get_ref().result.as_ref();
        let bytes = result.map(|r| (r.bytes_read, r.bytes_written));
        let stats = result.is_some_and(|r| r.stats.is_some());
        let resp = self.inner.complete_task(req).await?;
        self.metrics
            .completed(&lease_id, bytes, stats, resp.get_ref().accepted);
        Ok(resp)
    }

    async fn fail_task(
        &self,
        req: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        self.metrics.saw_worker(&req.get_ref().worker_id);
        self.metrics.failed(req.get_ref());
        self.inner.fail_task(req).await
    }
}
