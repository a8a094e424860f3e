//! Job state: queued tasks, leases, statistics units, per-file completion and the commit.
//! One `JobManager` serves in-process workers (embedded mode) and the gRPC service alike.
//! State is in memory; with a journal (`--state`), every fact a restart needs is recorded
//! before it is acted on, and `recover` resumes the journal's unfinished jobs.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use shardmerge_proto as pb;
use shardmerge_worker::exec::tensor_ctx;
use shardmerge_worker::kernels::{self, Reduced, Stats};
use shardmerge_worker::pull::WorkSource;
use shardmerge_worker::storage::{Location, Receipt, Resolver, Storage, Upload};
use tokio::sync::watch;

use crate::commit;
use crate::cut::{self, Cut, CutOptions, SegDef};
use crate::error::{Error, Result};
use crate::journal::{Journal, Unfinished};
use crate::plan::{self, Plan, PlanOptions};
use crate::recipe::Recipe;

/// Small enough that a task's output bytes are still in cache when they are written (0.75B
/// bench, alternating runs: task_arithmetic 3.0-3.3 s with 4 MiB tasks against 4.0-4.7 s with
/// 8 MiB, where the copy into the page cache went from 8% to 24% of the profile; ties 5%
/// slower; peak memory 108 MB against 182 MB). S3 outputs raise it to the 5 MiB part minimum.
pub const DEFAULT_TASK_SIZE: u64 = 4 << 20;
pub const DEFAULT_SLOT_MEMORY: u64 = 512 << 20;
pub const MAX_ATTEMPTS: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Item {
    Write(usize),
    Stats { unit: usize, range: usize },
}

#[derive(Clone, Debug)]
enum ItemState {
    Blocked,
    Queued,
    Leased { lease: String, deadline: Instant },
    Done,
}

struct ItemSlot {
    state: ItemState,
    attempts: u32,
}

struct UnitState {
    pass: u32,
    state: Stats,
    partials: Vec<Option<Stats>>,
    done: bool,
}

struct Job {
    id: String,
    plan: Arc<Plan>,
    cut: Cut,
    out: Location,
    uploads: Vec<Upload>,
    receipts: Vec<Vec<Option<Receipt>>>,
    file_remaining: Vec<usize>,
    items: HashMap<Item, ItemSlot>,
    blocked_by: Vec<usize>,
    units: Vec<UnitState>,
    /// The statistics unit of a tensor, and the write tasks waiting on each unit (indexes, so
    /// neither lookup scans a 70B job's tasks).
    unit_of: HashMap<usize, usize>,
    dependents: Vec<Vec<usize>>,
    queue: VecDeque<Item>,
    status: pb::JobStatus,
    started: Instant,
    tx: watch::Sender<pb::JobStatus>,
    /// Output files whose upload is complete (renamed / multipart completed).
    files_finished: usize,
    committing: bool,
}

impl Job {
    fn terminal(&self) -> bool {
        matches!(
            pb::JobState::try_from(self.status.state),
            Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
        )
    }

    fn publish(&mut self) {
        self.status.elapsed_seconds = self.started.elapsed().as_secs_f64();
        self.status.leases_active = self
            .items
            .values()
            .filter(|s| matches!(s.state, ItemState::Leased { .. }))
            .count() as u32;
        let _ = self.tx.send(self.status.clone());
    }

    fn build_task(&self, item: Item, attempt: u32) -> pb::Task {
        let plan = &self.plan;
        let rows = |tensor: usize, start: u64, end: u64, range_index: u32, with_stats: bool| {
            let unit = self.unit_of.get(&tensor).copied();
            pb::TensorRows {
                tensor: Some(plan.tensors[tensor].clone()),
                row_start: start,
                row_end: end,
                range_index,
                stats: match unit {
                    Some(u) if with_stats => Some(self.units[u].state.to_proto()),
                    _ => None,
                },
            }
        };
        let kind = match item {
            Item::Write(i) => {
                let t = &self.cut.tasks[i];
                let up = &self.uploads[t.file];
                let file_uri = self.out.join(&plan.files[t.file].name).uri();
                let sink = if self.out.store.scheme_root() == "file://" {
                    pb::output_target::Sink::Local(pb::LocalSink {
                        path: up.id.clone(),
                    })
                } else {
                    pb::output_target::Sink::Multipart(pb::MultipartSink {
                        store: self.out.store.scheme_root(),
                        key: up.path.clone(),
                        upload_id: up.id.clone(),
                        part_index: t.part_index,
                    })
                };
                pb::task::Kind::Write(pb::WriteTask {
                    output: Some(pb::OutputTarget {
                        uri: file_uri,
                        offset: t.offset,
                        length: t.length,
                        sink: Some(sink),
                    }),
                    segments: t
                        .segments
                        .iter()
                        .map(|s| pb::Segment {
                            kind: Some(match s {
                                SegDef::Literal(b) => pb::segment::Kind::Literal(b.clone()),
                                SegDef::Rows {
                                    tensor,
                                    start,
                                    end,
                                    range_index,
                                } => pb::segment::Kind::Rows(rows(
                                    *tensor,
                                    *start,
                                    *end,
                                    *range_index,
                                    true,
                                )),
                            }),
                        })
                        .collect(),
                })
            }
            Item::Stats { unit, range } => {
                let u = &self.cut.units[unit];
                let (a, b) = u.ranges[range];
                pb::task::Kind::Stats(pb::StatsTask {
                    rows: Some(rows(u.tensor, a, b, range as u32, true)),
                    pass: self.units[unit].pass,
                })
            }
        };
        let task_id = match item {
            Item::Write(i) => i as u64,
            Item::Stats { unit, range } => (1u64 << 40) | ((unit as u64) << 20) | range as u64,
        };
        pb::Task {
            job_id: self.id.clone(),
            task_id,
            attempt,
            kind: Some(kind),
        }
    }
}

/// The journal's name of a task: `w<task>`, or `s<unit>.<pass>.<range>` for a statistics task
/// (a unit's ranges run once per pass).
fn task_key(it: Item, pass: u32) -> String {
    match it {
        Item::Write(i) => format!("w{i}"),
        Item::Stats { unit, range } => format!("s{unit}.{pass}.{range}"),
    }
}

fn parse_task_key(k: &str) -> Option<(Item, u32)> {
    if let Some(i) = k.strip_prefix('w') {
        return Some((Item::Write(i.parse().ok()?), 0));
    }
    let mut it = k.strip_prefix('s')?.split('.');
    let (unit, pass, range) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    Some((
        Item::Stats {
            unit: unit.parse().ok()?,
            range: range.parse().ok()?,
        },
        pass.parse().ok()?,
    ))
}

/// Aborts a job's uploads in flight and removes its files already completed: a job that ends
/// without succeeding leaves nothing that looks like part of a finished checkpoint.
async fn remove_outputs(store: &Arc<dyn Storage>, uploads: &[Upload]) {
    for u in uploads {
        if let Err(e) = store.abort_upload(u).await {
            tracing::warn!("aborting {}: {e}", u.path);
        }
        if let Err(e) = store.delete(&u.path).await {
            tracing::warn!("removing {}: {e}", u.path);
        }
    }
}

/// The output uploads a job record names.
fn uploads_of(rec: &pb::JournalJob) -> Vec<Upload> {
    rec.uploads
        .iter()
        .map(|x| Upload {
            path: x.path.clone(),
            id: x.id.clone(),
        })
        .collect()
}

/// CRC-32 of a job's plan: each tensor's method and shape, where each input tensor lies (file,
/// offset, dtype, shape), the output files' headers and every task's place. A job is resumed
/// only when its inputs still plan to exactly this. (An input replaced by another checkpoint
/// of the very same layout is not noticed.)
fn layout_crc(plan: &Plan, cut: &Cut) -> u32 {
    let mut h = crc32fast::Hasher::new();
    fn num(h: &mut crc32fast::Hasher, v: u64) {
        h.update(&v.to_le_bytes());
    }
    for t in &plan.tensors {
        h.update(t.name.as_bytes());
        h.update(t.method.as_bytes());
        t.shape.iter().for_each(|&d| num(&mut h, d));
        for src in &t.inputs {
            h.update(src.uri.as_bytes());
            num(&mut h, src.data_offset);
            num(&mut h, src.dtype as u64);
            src.shape.iter().for_each(|&d| num(&mut h, d));
        }
    }
    for f in &plan.files {
        h.update(f.name.as_bytes());
        h.update(&(f.layout.header.len() as u64).to_le_bytes());
        h.update(&f.layout.header);
    }
    for t in &cut.tasks {
        for v in [t.file as u64, t.offset, t.length, t.segments.len() as u64] {
            h.update(&v.to_le_bytes());
        }
    }
    for u in &cut.units {
        h.update(&(u.tensor as u64).to_le_bytes());
        h.update(&(u.ranges.len() as u64).to_le_bytes());
    }
    h.finalize()
}

/// What a completed report requires outside the lock.
enum Followup {
    None,
    FinishFile(usize),
}

#[derive(Clone, Debug)]
pub struct SubmitOptions {
    pub out_shard_size: u64,
    pub task_size: u64,
    pub slot_memory: u64,
    pub seed: Option<u64>,
    /// How randomised methods draw.
    pub rng: pb::Rng,
    pub base_dir: PathBuf,
    pub lease_ttl: Duration,
    /// Refuse to write into a folder that already holds a checkpoint.
    pub overwrite: bool,
    /// Merge embeddings of different vocabulary sizes by cropping them (`--unsafe-truncate-embeddings`).
    pub unsafe_truncate_embeddings: bool,
    /// Compute in f32 whatever the recipe's `dtype` (`--compute-dtype float32`).
    pub compute_float32: bool,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        SubmitOptions {
            out_shard_size: plan::DEFAULT_SHARD_SIZE,
            task_size: DEFAULT_TASK_SIZE,
            slot_memory: DEFAULT_SLOT_MEMORY,
            seed: None,
            rng: pb::Rng::Mergekit,
            base_dir: PathBuf::from("."),
            lease_ttl: Duration::from_secs(30),
            overwrite: true,
            unsafe_truncate_embeddings: false,
            compute_float32: false,
        }
    }
}

impl SubmitOptions {
    /// The options a job record keeps (everything that shapes the output).
    pub fn to_proto(&self) -> pb::JobOptions {
        pb::JobOptions {
            out_shard_size: self.out_shard_size,
            task_size: self.task_size,
            slot_memory: self.slot_memory,
            seed: self.seed,
            base_dir: self.base_dir.to_string_lossy().into_owned(),
            min_part_size: 0,
            rng: self.rng as i32,
            unsafe_truncate_embeddings: self.unsafe_truncate_embeddings,
            compute_float32: self.compute_float32,
        }
    }

    /// Options from their message; 0 or empty means the default, and relative model paths
    /// resolve against the coordinator's working directory when `base_dir` is empty.
    pub fn from_proto(o: &pb::JobOptions, lease_ttl: Duration) -> Self {
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        SubmitOptions {
            out_shard_size: or(o.out_shard_size, plan::DEFAULT_SHARD_SIZE),
            task_size: or(o.task_size, DEFAULT_TASK_SIZE),
            slot_memory: or(o.slot_memory, DEFAULT_SLOT_MEMORY),
            seed: o.seed,
            rng: pb::Rng::try_from(o.rng).unwrap_or(pb::Rng::Mergekit),
            base_dir: if o.base_dir.is_empty() {
                crate::embedded::cwd()
            } else {
                PathBuf::from(&o.base_dir)
            },
            lease_ttl,
            unsafe_truncate_embeddings: o.unsafe_truncate_embeddings,
            compute_float32: o.compute_float32,
            ..Default::default()
        }
    }
}

pub struct JobManager {
    resolver: Resolver,
    journal: Option<Journal>,
    /// Jobs that ended before this coordinator started (from the journal), for `status`.
    history: Mutex<HashMap<String, pb::JobStatus>>,
    jobs: Mutex<HashMap<String, Job>>,
    leases: Mutex<HashMap<String, (String, Item)>>,
    next_id: std::sync::atomic::AtomicU64,
    lease_ttl: Mutex<Duration>,
    /// When leases were last checked for expiry: polls arrive far more often than leases
    /// can expire, and a check walks every task.
    last_expiry_scan: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobManager {
    pub fn new(resolver: Resolver) -> Arc<Self> {
        Self::build(resolver, None)
    }

    /// A job manager that records its jobs in `journal` (call `recover` to resume the ones
    /// it holds).
    pub fn with_journal(resolver: Resolver, journal: Journal) -> Arc<Self> {
        Self::build(resolver, Some(journal))
    }

    fn build(resolver: Resolver, journal: Option<Journal>) -> Arc<Self> {
        Arc::new(JobManager {
            resolver,
            journal,
            history: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
            lease_ttl: Mutex::new(Duration::from_secs(30)),
            last_expiry_scan: Mutex::new(None),
        })
    }

    /// How long a lease lasts without renewal (also set by each submitted job's options).
    pub fn set_lease_ttl(&self, ttl: Duration) {
        *lock(&self.lease_ttl) = ttl;
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
        let plan = plan::plan(
            recipe,
            &self.resolver,
            &o.base_dir,
            &PlanOptions {
                out_shard_size: o.out_shard_size,
                seed: o.seed,
                rng: o.rng,
                unsafe_truncate_embeddings: o.unsafe_truncate_embeddings,
                compute_float32: o.compute_float32,
            },
        )
        .await?;
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
        let index = out.join("model.safetensors.index.json");
        if !o.overwrite && index.store.exists(&index.path).await? {
            return Err(Error::Other(format!(
                "{} already holds a finished checkpoint; pick a new output or remove it",
                out.uri()
            )));
        }
        // A stale index from an earlier run must not make a half-written folder look finished.
        index.store.delete(&index.path).await?;
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
        let id = self.fresh_id();
        if let Some(journal) = &self.journal {
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
            if let Err(e) = journal.job_started(&rec).await {
                for u in &uploads {
                    let _ = out.store.abort_upload(u).await;
                }
                return Err(Error::Other(format!(
                    "recording the job in the journal {}: {e}",
                    journal.uri()
                )));
            }
        }
        *lock(&self.lease_ttl) = o.lease_ttl;
        let job = build_job(id.clone(), plan, cut, out, uploads);
        let plan = job.plan.clone();
        lock(&self.jobs).insert(id.clone(), job);
        Ok((id, plan))
    }

    /// Resumes the journal's unfinished jobs and remembers its ended ones; returns the ids
    /// resumed. A job that cannot resume (its inputs are gone or changed) fails, with the
    /// reason in its status.
    pub async fn recover(&self) -> Result<Vec<String>> {
        let Some(journal) = &self.journal else {
            return Ok(Vec::new());
        };
        let contents = journal.load().await?;
        {
            let mut h = lock(&self.history);
            for st in contents.ended {
                h.insert(st.job_id.clone(), st);
            }
        }
        let mut resumed = Vec::new();
        for u in contents.unfinished {
            let id = u.job.job_id.clone();
            let out = u.job.output_uri.clone();
            let uploads = uploads_of(&u.job);
            match self.resume(u).await {
                Ok(()) => resumed.push(id),
                Err(e) => {
                    let msg = format!("cannot resume after a coordinator restart: {e}");
                    tracing::error!(job = %id, "{msg}");
                    let status = pb::JobStatus {
                        job_id: id.clone(),
                        state: pb::JobState::Failed as i32,
                        output_uri: out.clone(),
                        error: msg,
                        ..Default::default()
                    };
                    self.journal_end(&status).await;
                    lock(&self.history).insert(id, status);
                    if let Ok(loc) = self.resolver.resolve(&out, std::path::Path::new("/")) {
                        remove_outputs(&loc.store, &uploads).await;
                    }
                }
            }
        }
        Ok(resumed)
    }

    /// Rebuilds one job from its record, replays the task results it holds, and finishes what
    /// they complete.
    async fn resume(&self, u: Unfinished) -> Result<()> {
        let ttl = *lock(&self.lease_ttl);
        let o = SubmitOptions::from_proto(&u.job.options.clone().unwrap_or_default(), ttl);
        let (plan, cut, out) = self
            .prepare(&u.job.recipe_yaml, &u.job.output_uri, &o)
            .await?;
        if layout_crc(&plan, &cut) != u.job.layout_crc || u.job.uploads.len() != plan.files.len() {
            return Err(Error::Job(
                "its inputs now plan to a different output than when it started (changed or \
                 replaced?); submit it again"
                    .into(),
            ));
        }
        let uploads = uploads_of(&u.job);
        let id = u.job.job_id.clone();
        let mut job = build_job(id.clone(), plan, cut, out, uploads);
        // Statistics first, pass by pass (a pass's results only count once the ones before it
        // are folded), then writes whose inputs are ready. Anything else runs again.
        let mut stats = Vec::new();
        let mut writes = Vec::new();
        for (k, r) in u.tasks {
            match parse_task_key(&k) {
                Some((Item::Write(i), _)) => writes.push((i, r)),
                Some((Item::Stats { unit, range }, pass)) => stats.push(((unit, pass, range), r)),
                None => tracing::warn!(job = %id, "journal: ignoring unknown record {k}"),
            }
        }
        stats.sort_by_key(|(k, _)| *k);
        let queued = |j: &Job, it: &Item| {
            matches!(j.items.get(it).map(|s| &s.state), Some(ItemState::Queued))
        };
        for ((unit, pass, range), r) in stats {
            let it = Item::Stats { unit, range };
            let current = job
                .units
                .get(unit)
                .is_some_and(|s| s.pass == pass && !s.done);
            if current && queued(&job, &it) {
                self.record(&mut job, it, r)?;
            }
        }
        let mut complete = Vec::new();
        writes.sort_by_key(|(i, _)| *i);
        for (i, r) in writes {
            if queued(&job, &Item::Write(i)) {
                if let Followup::FinishFile(f) = self.record(&mut job, Item::Write(i), r)? {
                    complete.push(f);
                }
            }
        }
        tracing::info!(
            job = %id,
            "resumed from the journal: {} of {} tasks done",
            job.status.tasks_done,
            job.status.tasks_total
        );
        lock(&self.jobs).insert(id.clone(), job);
        for f in complete {
            if u.files_finished.contains(&f) {
                self.file_done(&id).await;
            } else {
                self.finish_file_as(&id, f, true).await;
            }
        }
        Ok(())
    }

    pub fn status(&self, job: &str) -> Option<pb::JobStatus> {
        let mut jobs = lock(&self.jobs);
        let Some(j) = jobs.get_mut(job) else {
            return lock(&self.history).get(job).cloned();
        };
        j.status.elapsed_seconds = j.started.elapsed().as_secs_f64();
        Some(j.status.clone())
    }

    pub fn list(&self) -> Vec<pb::JobStatus> {
        let mut all: Vec<pb::JobStatus> = lock(&self.history).values().cloned().collect();
        all.extend(lock(&self.jobs).values().map(|j| j.status.clone()));
        all
    }

    pub fn watch(&self, job: &str) -> Option<watch::Receiver<pb::JobStatus>> {
        lock(&self.jobs).get(job).map(|j| j.tx.subscribe())
    }

    /// Re-queues work whose lease ran out.
    fn expire(&self, now: Instant) {
        {
            let ttl = *lock(&self.lease_ttl);
            let mut last = lock(&self.last_expiry_scan);
            if last
                .is_some_and(|t| now.duration_since(t) < (ttl / 20).min(Duration::from_millis(250)))
            {
                return;
            }
            *last = Some(now);
        }
        let mut jobs = lock(&self.jobs);
        let mut leases = lock(&self.leases);
        for j in jobs.values_mut() {
            let mut changed = false;
            for (it, slot) in j.items.iter_mut() {
                if let ItemState::Leased { lease, deadline } = &slot.state {
                    if *deadline <= now {
                        tracing::warn!(job = %j.id, "lease {lease} expired; the task runs again");
                        leases.remove(lease);
                        slot.state = ItemState::Queued;
                        j.queue.push_back(*it);
                        j.status.retries += 1;
                        changed = true;
                    }
                }
            }
            if changed {
                j.publish();
            }
        }
    }

    pub fn poll(&self, req: &pb::PollWorkRequest) -> pb::PollWorkResponse {
        let now = Instant::now();
        self.expire(now);
        let ttl = *lock(&self.lease_ttl);
        let mut out = pb::PollWorkResponse {
            leases: Vec::new(),
            retry_after_ms: 20,
        };
        let mut jobs = lock(&self.jobs);
        let mut leases = lock(&self.leases);
        let want = req.free_slots.max(1) as usize;
        for j in jobs.values_mut() {
            if j.terminal() {
                continue;
            }
            while out.leases.len() < want {
                let Some(it) = j.queue.pop_front() else { break };
                let Some(slot) = j.items.get_mut(&it) else {
                    continue;
                };
                if !matches!(slot.state, ItemState::Queued) {
                    continue;
                }
                slot.attempts += 1;
                let lease = format!("{}:{:?}:{}", j.id, it, slot.attempts);
                slot.state = ItemState::Leased {
                    lease: lease.clone(),
                    deadline: now + ttl,
                };
                let attempt = slot.attempts;
                leases.insert(lease.clone(), (j.id.clone(), it));
                out.leases.push(pb::Lease {
                    lease_id: lease,
                    ttl_ms: ttl.as_millis() as u64,
                    task: Some(j.build_task(it, attempt)),
                });
            }
            if !out.leases.is_empty() {
                j.publish();
            }
        }
        out
    }

    pub fn renew(&self, req: &pb::RenewLeaseRequest) -> pb::RenewLeaseResponse {
        let ttl = *lock(&self.lease_ttl);
        let mut jobs = lock(&self.jobs);
        let leases = lock(&self.leases);
        let mut lost = Vec::new();
        for l in &req.lease_ids {
            let held = leases.get(l).and_then(|(jid, it)| {
                let j = jobs.get_mut(jid)?;
                if j.terminal() {
                    return None;
                }
                match &mut j.items.get_mut(it)?.state {
                    ItemState::Leased { lease, deadline } if *lease == *l => {
                        *deadline = Instant::now() + ttl;
                        Some(())
                    }
                    _ => None,
                }
            });
            if held.is_none() {
                lost.push(l.clone());
            }
        }
        pb::RenewLeaseResponse {
            lost,
            ttl_ms: ttl.as_millis() as u64,
        }
    }

    /// Records a task's result. Returns false when the lease was no longer held (ignored).
    pub async fn complete(&self, req: &pb::CompleteTaskRequest) -> bool {
        let Some((jid, it)) = lock(&self.leases).remove(&req.lease_id) else {
            return false;
        };
        let result = req.result.clone().unwrap_or_default();
        let key = {
            let jobs = lock(&self.jobs);
            let Some(j) = jobs.get(&jid) else {
                return false;
            };
            match j.items.get(&it).map(|s| &s.state) {
                Some(ItemState::Leased { lease, .. }) if *lease == req.lease_id => {}
                _ => return false,
            }
            if j.terminal() {
                return false;
            }
            match it {
                Item::Stats { unit, .. } => task_key(it, j.units[unit].pass),
                Item::Write(_) => task_key(it, 0),
            }
        };
        // Journal first: what a restart finds recorded is what this coordinator acted on.
        if let Some(journal) = &self.journal {
            if let Err(e) = journal.task_done(&jid, &key, &result).await {
                tracing::warn!(job = %jid, "journal: {e}; task {key} runs again");
                let mut jobs = lock(&self.jobs);
                if let Some(j) = jobs.get_mut(&jid) {
                    if let Some(slot) = j.items.get_mut(&it) {
                        if matches!(&slot.state, ItemState::Leased { lease, .. } if *lease == req.lease_id)
                        {
                            slot.state = ItemState::Queued;
                            j.queue.push_back(it);
                            j.status.retries += 1;
                        }
                    }
                }
                return false;
            }
        }
        let follow = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(&jid) else {
                return false;
            };
            // (the lease may have expired while the journal was written; the result stands)
            let pending = matches!(
                j.items.get(&it).map(|s| &s.state),
                Some(ItemState::Leased { .. } | ItemState::Queued)
            );
            if j.terminal() || !pending {
                return false;
            }
            self.record(j, it, result)
        };
        match follow {
            Ok(Followup::FinishFile(fi)) => self.finish_file(&jid, fi).await,
            Ok(Followup::None) => {}
            Err(e) => self.fail_job(&jid, &e.to_string()).await,
        }
        true
    }

    fn record(&self, j: &mut Job, it: Item, result: pb::TaskResult) -> Result<Followup> {
        if let Some(slot) = j.items.get_mut(&it) {
            slot.state = ItemState::Done;
        }
        j.status.tasks_done += 1;
        let mut follow = Followup::None;
        match it {
            Item::Write(i) => {
                let t = &j.cut.tasks[i];
                j.status.bytes_done += t.length;
                let receipt = result.part.map(|p| Receipt {
                    part_index: p.part_index,
                    etag: p.etag,
                    size: p.size,
                });
                j.receipts[t.file][t.part_index as usize] = receipt;
                j.file_remaining[t.file] -= 1;
                if j.file_remaining[t.file] == 0 {
                    follow = Followup::FinishFile(t.file);
                }
            }
            Item::Stats { unit, range } => {
                let stats = result
                    .stats
                    .as_ref()
                    .map(Stats::from_proto)
                    .unwrap_or_default();
                j.units[unit].partials[range] = Some(stats);
                if j.units[unit].partials.iter().all(Option::is_some) {
                    self.reduce_unit(j, unit)?;
                }
            }
        }
        j.publish();
        Ok(follow)
    }

    /// Folds a statistics pass; queues the next pass or releases the tasks that wait.
    fn reduce_unit(&self, j: &mut Job, unit: usize) -> Result<()> {
        let tensor = &j.plan.tensors[j.cut.units[unit].tensor];
        let m = kernels::method(&tensor.method)
            .ok_or_else(|| Error::Job(format!("unknown method {}", tensor.method)))?;
        let ctx = tensor_ctx(tensor).map_err(|e| Error::Job(e.message))?;
        let u = &mut j.units[unit];
        let partials: Vec<Stats> = u
            .partials
            .iter_mut()
            .map(|p| p.take().unwrap_or_default())
            .collect();
        let state = std::mem::take(&mut u.state);
        let reduced = m
            .reduce(&ctx, u.pass, state, partials)
            .map_err(|e| Error::Job(format!("tensor {}: {e}", tensor.name)))?;
        let (state, done) = match reduced {
            Reduced::More(s) => (s, u.pass + 1 >= j.cut.units[unit].passes),
            Reduced::Done(s) => (s, true),
        };
        u.state = state;
        let n = j.cut.units[unit].ranges.len();
        if done {
            u.done = true;
            for k in 0..j.dependents[unit].len() {
                let i = j.dependents[unit][k];
                j.blocked_by[i] -= 1;
                if j.blocked_by[i] == 0 {
                    if let Some(s) = j.items.get_mut(&Item::Write(i)) {
                        s.state = ItemState::Queued;
                    }
                    j.queue.push_back(Item::Write(i));
                }
            }
        } else {
            u.pass += 1;
            u.partials = vec![None; n];
            for r in 0..n {
                let it = Item::Stats { unit, range: r };
                if let Some(s) = j.items.get_mut(&it) {
                    s.state = ItemState::Queued;
                }
                j.queue.push_back(it);
                j.status.tasks_total += 1;
            }
        }
        Ok(())
    }

    pub async fn fail(&self, req: &pb::FailTaskRequest) {
        let Some((jid, it)) = lock(&self.leases).remove(&req.lease_id) else {
            return;
        };
        let fatal = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(&jid) else { return };
            let Some(slot) = j.items.get_mut(&it) else {
                return;
            };
            match &slot.state {
                ItemState::Leased { lease, .. } if *lease == req.lease_id => {}
                _ => return,
            }
            if req.retryable && slot.attempts < MAX_ATTEMPTS {
                tracing::warn!(job = %jid, "task failed (attempt {}), retrying: {}", slot.attempts, req.error);
                slot.state = ItemState::Queued;
                j.queue.push_back(it);
                j.status.retries += 1;
                j.publish();
                None
            } else {
                Some(if req.retryable {
                    format!("{} (gave up after {MAX_ATTEMPTS} attempts)", req.error)
                } else {
                    req.error.clone()
                })
            }
        };
        if let Some(msg) = fatal {
            self.fail_job(&jid, &msg).await;
        }
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

    async fn end_job(&self, jid: &str, state: pb::JobState, msg: &str) {
        let (store, uploads, status) = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(jid) else { return };
            if j.terminal() {
                return;
            }
            // a committing job is ended only by its own commit failing
            if j.committing && state == pb::JobState::Cancelled {
                return;
            }
            j.status.state = state as i32;
            j.status.error = msg.to_string();
            j.queue.clear();
            let mut leases = lock(&self.leases);
            leases.retain(|_, (id, _)| id != jid);
            j.publish();
            (j.out.store.clone(), j.uploads.clone(), j.status.clone())
        };
        // Recorded before the cleanup: a restart must not resume a job that was ending.
        self.journal_end(&status).await;
        remove_outputs(&store, &uploads).await;
    }

    async fn journal_end(&self, status: &pb::JobStatus) {
        let Some(journal) = &self.journal else { return };
        if let Err(e) = journal.job_ended(status).await {
            tracing::warn!(job = %status.job_id, "journal: {e}");
            return;
        }
        // Its task records are no longer needed: removed in the background (one delete per
        // task; whoever reported the last task need not wait for them).
        let (journal, id) = (journal.clone(), status.job_id.clone());
        tokio::spawn(async move {
            match journal.forget_tasks(&id).await {
                Ok(n) => tracing::debug!(job = %id, "journal: removed {n} task records"),
                Err(e) => tracing::warn!(job = %id, "journal: removing task records: {e}"),
            }
        });
    }

    async fn finish_file(&self, jid: &str, fi: usize) {
        self.finish_file_as(jid, fi, false).await
    }

    /// Completes output file `fi`. `resumed`: the previous coordinator may have completed it
    /// already without recording so; a file at its final path with its full size counts.
    async fn finish_file_as(&self, jid: &str, fi: usize, resumed: bool) {
        let (store, upload, receipts, size) = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(jid) else { return };
            let receipts: Vec<Receipt> = j.receipts[fi].iter().flatten().cloned().collect();
            let size = j.plan.files[fi].layout.total_size;
            (j.out.store.clone(), j.uploads[fi].clone(), receipts, size)
        };
        if let Err(e) = store.finish_upload(&upload, &receipts).await {
            let already = resumed && store.size(&upload.path).await.is_ok_and(|n| n == size);
            if !already {
                self.fail_job(jid, &format!("completing {}: {e}", upload.path))
                    .await;
                return;
            }
        }
        if let Some(journal) = &self.journal {
            if let Err(e) = journal.file_finished(jid, fi).await {
                tracing::warn!(job = %jid, "journal: {e}");
            }
        }
        self.file_done(jid).await;
    }

    /// Counts a completed output file; the last one commits the checkpoint.
    async fn file_done(&self, jid: &str) {
        // Files complete in any order (a slow multipart completion may finish last): whoever
        // completes the last one commits, so the index is written after every file exists.
        let commit_now = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(jid) else { return };
            j.files_finished += 1;
            let last = j.files_finished == j.plan.files.len() && !j.committing && !j.terminal();
            if last {
                j.committing = true;
                j.status.state = pb::JobState::Committing as i32;
                j.publish();
            }
            last
        };
        if commit_now {
            self.commit(jid).await;
        }
    }

    async fn commit(&self, jid: &str) {
        let (plan, out) = {
            let jobs = lock(&self.jobs);
            let Some(j) = jobs.get(jid) else { return };
            (j.plan.clone(), j.out.clone())
        };
        match commit::write_checkpoint_files(&plan, &out).await {
            Ok(()) => {
                let status = {
                    let mut jobs = lock(&self.jobs);
                    let Some(j) = jobs.get_mut(jid) else { return };
                    j.status.state = pb::JobState::Succeeded as i32;
                    j.publish();
                    j.status.clone()
                };
                self.journal_end(&status).await;
            }
            Err(e) => self.fail_job(jid, &format!("commit: {e}")).await,
        }
    }
}

/// A job's in-memory state, every task queued (or blocked on its statistics).
fn build_job(id: String, plan: Plan, cut: Cut, out: Location, uploads: Vec<Upload>) -> Job {
    let plan = Arc::new(plan);
    let mut items = HashMap::new();
    let mut queue = VecDeque::new();
    let mut blocked_by = Vec::new();
    for (u, unit) in cut.units.iter().enumerate() {
        for r in 0..unit.ranges.len() {
            let it = Item::Stats { unit: u, range: r };
            items.insert(
                it,
                ItemSlot {
                    state: ItemState::Queued,
                    attempts: 0,
                },
            );
            queue.push_back(it);
        }
    }
    for (i, t) in cut.tasks.iter().enumerate() {
        let it = Item::Write(i);
        let state = if t.deps.is_empty() {
            queue.push_back(it);
            ItemState::Queued
        } else {
            ItemState::Blocked
        };
        blocked_by.push(t.deps.len());
        items.insert(it, ItemSlot { state, attempts: 0 });
    }
    let unit_of = cut
        .units
        .iter()
        .enumerate()
        .map(|(u, unit)| (unit.tensor, u))
        .collect();
    let mut dependents = vec![Vec::new(); cut.units.len()];
    for (i, t) in cut.tasks.iter().enumerate() {
        for &u in &t.deps {
            dependents[u].push(i);
        }
    }
    let mut file_remaining = vec![0usize; plan.files.len()];
    for t in &cut.tasks {
        file_remaining[t.file] += 1;
    }
    let status = pb::JobStatus {
        job_id: id.clone(),
        state: pb::JobState::Running as i32,
        output_uri: out.uri(),
        tasks_total: items.len() as u64,
        bytes_total: plan.bytes_out(),
        ..Default::default()
    };
    let (tx, _) = watch::channel(status.clone());
    let units = cut
        .units
        .iter()
        .map(|u| UnitState {
            pass: 0,
            state: Stats::default(),
            partials: vec![None; u.ranges.len()],
            done: false,
        })
        .collect();
    let receipts = plan
        .files
        .iter()
        .enumerate()
        .map(|(fi, _)| vec![None; cut.tasks.iter().filter(|t| t.file == fi).count()])
        .collect();
    Job {
        id: id.clone(),
        plan: plan.clone(),
        cut,
        out,
        uploads,
        receipts,
        file_remaining,
        items,
        blocked_by,
        units,
        unit_of,
        dependents,
        queue,
        status,
        started: Instant::now(),
        tx,
        files_finished: 0,
        committing: false,
    }
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

/// Writes a small file into the output folder.
pub async fn put(loc: &Location, name: &str, data: impl Into<Bytes>) -> Result<()> {
    let l = loc.join(name);
    l.store.put(&l.path, data.into()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_keys_round_trip() {
        for (it, pass) in [
            (Item::Write(0), 0),
            (Item::Write(17_493), 0),
            (Item::Stats { unit: 3, range: 9 }, 2),
        ] {
            assert_eq!(parse_task_key(&task_key(it, pass)), Some((it, pass)));
        }
        for bad in ["", "w", "wx", "s1.2", "s1.2.3.4", "f0", "x1"] {
            assert_eq!(parse_task_key(bad), None, "{bad}");
        }
    }
}
