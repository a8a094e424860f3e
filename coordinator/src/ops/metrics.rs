//! The coordinator's Prometheus metrics: what the gRPC layer observes (through [`Metered`], in
//! `metered.rs`) and the job manager's status snapshots at scrape time.

use super::inputs::as_i64;
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
struct ResultLabels {
    result: String,
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
    counters: ServiceCounters,
    gauges: SnapshotGauges,
    inputs: super::inputs::InputGauges,
    open: Mutex<HashMap<String, Open>>,
    /// Worker slot ids and when each last called.
    seen: Mutex<HashMap<String, Instant>>,
}

/// Counters the service layer moves as calls pass ([`Metered`]).
struct ServiceCounters {
    leases: Family<KindLabels, Counter>,
    done: Family<KindLabels, Counter>,
    rejected: Counter,
    failed: Family<FailLabels, Counter>,
    expired: Counter,
    read_bytes: Counter,
    written_bytes: Counter,
    task_seconds: Family<MethodLabels, Histogram>,
}

/// Gauges set from the job manager's status snapshots at scrape time.
struct SnapshotGauges {
    jobs: Family<StateLabels, Gauge>,
    queued: Gauge,
    leased: Gauge,
    retried: Gauge,
    planned_bytes: Gauge,
    job_written_bytes: Gauge,
    work_planned: Gauge,
    work_done: Gauge,
    read_planned: Gauge,
    read_done: Gauge,
    workers: Gauge,
    worker_slots: Gauge,
    resident: Gauge,
    audits: Family<ResultLabels, Gauge>,
    quarantined: Gauge,
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

/// The gauges set from snapshots at scrape time, in registration order: name and help.
const GAUGES: [(&str, &str); 12] = [
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
    // read_planned
    (
        "shardmerge_job_read_planned_bytes",
        "Input bytes the jobs known read from storage by their plans, every pass included",
    ),
    // read_done
    (
        "shardmerge_job_read_bytes",
        "Input bytes read from storage so far by the accepted tasks of the jobs known, every \
             pass included (rows a worker's row cache served are not counted)",
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

impl ServiceCounters {
    fn register(r: &mut Registry) -> Self {
        let leases = Family::<KindLabels, Counter>::default();
        r.register(
            "shardmerge_leases_granted",
            "Task leases handed to workers, by task kind (write, stats, audit)",
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
        ServiceCounters {
            leases,
            done,
            rejected,
            failed,
            expired,
            read_bytes,
            written_bytes,
            task_seconds,
        }
    }
}

impl SnapshotGauges {
    fn register(r: &mut Registry) -> Self {
        let jobs = Family::<StateLabels, Gauge>::default();
        r.register(
            "shardmerge_jobs",
            "Jobs this coordinator knows, by state",
            jobs.clone(),
        );
        let [queued, leased, retried, planned_bytes, job_written_bytes, work_planned, work_done, read_planned, read_done, workers, worker_slots, resident] =
            GAUGES.map(|(name, help)| {
                let g = Gauge::default();
                r.register(name, help, g.clone());
                g
            });
        let audits = Family::<ResultLabels, Gauge>::default();
        r.register(
            "shardmerge_audits",
            "Result audits of the jobs known, by result: passed (another worker process computed \
             the same bytes), failed (a worker's result was found wrong and it was quarantined), \
             skipped (no other worker process could run it)",
            audits.clone(),
        );
        let quarantined = Gauge::default();
        r.register(
            "shardmerge_workers_quarantined",
            "Worker processes quarantined by a failed audit in the jobs known",
            quarantined.clone(),
        );
        SnapshotGauges {
            audits,
            quarantined,
            jobs,
            queued,
            leased,
            retried,
            planned_bytes,
            job_written_bytes,
            work_planned,
            work_done,
            read_planned,
            read_done,
            workers,
            worker_slots,
            resident,
        }
    }
}

impl CoordinatorMetrics {
    pub fn new(mgr: Arc<JobManager>, lease_ttl: Duration) -> Arc<Self> {
        let mut r = Registry::default();
        // registration order is the order of the scrape
        let counters = ServiceCounters::register(&mut r);
        let gauges = SnapshotGauges::register(&mut r);
        let inputs = super::inputs::InputGauges::register(&mut r);
        Arc::new(CoordinatorMetrics {
            registry: r,
            mgr,
            lease_ttl,
            counters,
            gauges,
            inputs,
            open: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn saw_worker(&self, id: &str) {
        let now = Instant::now();
        let mut seen = lock(&self.seen);
        // (every worker call passes here: no new key unless the worker is new)
        match seen.get_mut(id) {
            Some(at) => *at = now,
            None => drop(seen.insert(id.to_string(), now)),
        }
    }

    pub(super) fn granted(&self, lease: &pb::Lease) {
        let Some(task) = &lease.task else { return };
        let kind = wm::task_kind(task);
        self.counters
            .leases
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

    pub(super) fn renewed(&self, req: &pb::RenewLeaseRequest, resp: &pb::RenewLeaseResponse) {
        let now = Instant::now();
        let mut open = lock(&self.open);
        for id in &req.lease_ids {
            if resp.lost.contains(id) {
                if open.remove(id).is_some() {
                    self.counters.expired.inc();
                }
            } else if let Some(o) = open.get_mut(id) {
                o.seen = now;
            }
        }
    }

    /// A CompleteTask call: `bytes` (read, written) of its result; `stats`: it carried
    /// statistics.
    pub(super) fn completed(
        &self,
        lease_id: &str,
        bytes: Option<(u64, u64)>,
        stats: bool,
        accepted: bool,
    ) {
        let open = lock(&self.open).remove(lease_id);
        if !accepted {
            self.counters.rejected.inc();
            if open.is_some() {
                // the lease had run out before the report came
                self.counters.expired.inc();
            }
            return;
        }
        let kind = match &open {
            Some(o) => o.kind,
            None if stats => "stats",
            None => "write",
        };
        self.counters
            .done
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
        if let Some((read, written)) = bytes {
            self.counters.read_bytes.inc_by(read);
            self.counters.written_bytes.inc_by(written);
        }
        if let Some(o) = open {
            self.counters
                .task_seconds
                .get_or_create(&MethodLabels { method: o.method })
                .observe(o.granted.elapsed().as_secs_f64());
        }
    }

    pub(super) fn failed(&self, req: &pb::FailTaskRequest) {
        lock(&self.open).remove(&req.lease_id);
        self.counters
            .failed
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
        self.counters.expired.inc_by((before - open.len()) as u64);
    }

    fn snapshot(&self) {
        let now = Instant::now();
        self.sweep(now);
        let mut by_state = HashMap::new();
        let (mut queued, mut leased, mut retried, mut planned, mut written) = (0u64, 0, 0, 0, 0);
        let (mut work_planned, mut work_done) = (0u64, 0u64);
        let (mut read_planned, mut read_done) = (0u64, 0u64);
        let mut audits = [0i64; 3];
        let mut quarantined = std::collections::HashSet::new();
        let jobs = self.mgr.list();
        self.inputs.set(&jobs);
        for s in jobs {
            audits[0] += i64::from(s.audits_passed);
            audits[1] += i64::from(s.audits_failed);
            audits[2] += i64::from(s.audits_skipped);
            quarantined.extend(s.quarantined.iter().cloned());
            *by_state.entry(s.state).or_insert(0i64) += 1;
            retried += u64::from(s.retries);
            planned += s.bytes_total;
            written += s.bytes_done;
            work_planned += s.work_total;
            work_done += s.work_done;
            read_planned += s.bytes_read_total;
            read_done += s.bytes_read;
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
            self.gauges
                .jobs
                .get_or_create(&StateLabels { state: name.into() })
                .set(by_state.get(&(state as i32)).copied().unwrap_or(0));
        }
        for (n, result) in audits.iter().zip(["passed", "failed", "skipped"]) {
            let labels = ResultLabels {
                result: result.into(),
            };
            self.gauges.audits.get_or_create(&labels).set(*n);
        }
        self.gauges.quarantined.set(quarantined.len() as i64);
        self.gauges.queued.set(as_i64(queued));
        self.gauges.leased.set(as_i64(leased));
        self.gauges.retried.set(as_i64(retried));
        self.gauges.planned_bytes.set(as_i64(planned));
        self.gauges.job_written_bytes.set(as_i64(written));
        self.gauges.work_planned.set(as_i64(work_planned));
        self.gauges.work_done.set(as_i64(work_done));
        self.gauges.read_planned.set(as_i64(read_planned));
        self.gauges.read_done.set(as_i64(read_done));
        let mut seen = lock(&self.seen);
        seen.retain(|_, at| now.duration_since(*at) <= self.lease_ttl);
        let processes: std::collections::HashSet<&str> = seen
            .keys()
            .map(|id| id.rsplit_once('/').map_or(id.as_str(), |(p, _)| p))
            .collect();
        self.gauges.workers.set(processes.len() as i64);
        self.gauges.worker_slots.set(seen.len() as i64);
        if let Some(b) = wm::resident_bytes() {
            self.gauges.resident.set(as_i64(b));
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
