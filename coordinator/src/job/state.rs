//! The pure core of a job: its tasks' states, the queue, the statistics units and the write
//! tasks waiting on them, the receipts of written parts, and the job's status. Synchronous and
//! without I/O: every method takes the time it needs as an argument and returns what must
//! follow (a lease to record, a file to complete, a message to fail the job with), which the
//! `JobManager` then does. Results are accepted in one place, `JobState::record`.
//!
//! `state/leased.rs` hands tasks out and keeps their leases (renewal, expiry, failure),
//! `state/results.rs` checks results and folds statistics passes, `state/work.rs` counts
//! work (bytes read and written), `state/replay.rs` replays a journal's results.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use shardmerge_proto as pb;
use shardmerge_worker::kernels::{Reduced, Stats};
use shardmerge_worker::storage::Receipt;

mod audit;
mod home;
mod leased;
mod replay;
mod results;
mod work;

use crate::cut::Cut;
use crate::error::{Error, Result};
use crate::journal::{task_key, Item};
use crate::plan::{Plan, TensorPlan};
#[cfg(test)]
pub(crate) use audit::sampled;
pub use audit::{AuditEvent, AuditRules};
pub use leased::{Granted, Holder, Renewal, TaskFailed};
use work::{largest_first, stats_work, write_work};

/// How many times a task that fails with a retryable error runs before its job fails.
pub const MAX_ATTEMPTS: u32 = 5;

/// Folds one pass of a statistics unit: `(tensor, pass, state so far, partials)`.
pub type Reducer = fn(&TensorPlan, u32, Stats, Vec<Stats>) -> Result<Reduced>;

/// The reducer jobs use: the tensor's method from the kernel registry.
pub(crate) fn kernel_reduce(
    tensor: &TensorPlan,
    pass: u32,
    state: Stats,
    partials: Vec<Stats>,
) -> Result<Reduced> {
    let ctx = tensor.ctx()?;
    tensor
        .method
        .reduce(&ctx, pass, state, partials)
        .map_err(|source| Error::Kernel {
            method: tensor.method_name(),
            tensor: tensor.name.clone(),
            pass: Some(pass),
            source,
        })
}

#[derive(Clone, Debug)]
enum ItemState {
    Blocked,
    Queued,
    Leased {
        lease: String,
        /// The worker id that polled it; only it may renew, complete or fail it.
        worker: String,
        deadline: Instant,
        /// The end of the task's maximum run time: no renewal reaches past it.
        until: Instant,
    },
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

/// What a recorded result requires of the caller.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// The task was not pending (already done, or the job ended): the result is ignored.
    Ignored,
    Accepted,
    /// Accepted, and it was the last part of output file `.0`: complete that file.
    FileComplete(usize),
    /// Accepted (or an audit decided), and these output files may complete now (with audits
    /// on, files complete together once every audit is decided: `state/audit.rs`).
    FilesComplete(Vec<usize>),
}

pub struct JobState {
    pub id: String,
    pub plan: Arc<Plan>,
    pub cut: Cut,
    pub status: pb::JobStatus,
    receipts: Vec<Vec<Option<Receipt>>>,
    file_remaining: Vec<usize>,
    items: HashMap<Item, ItemSlot>,
    /// How many of `items` are leased, kept as they change state (`ItemSlot::set`): the
    /// status reads it on every poll and completion, and a count by walking the items cost
    /// a 70B job's 33,563 of them per call.
    leased: u32,
    blocked_by: Vec<usize>,
    units: Vec<UnitState>,
    /// The statistics unit of a tensor, and the write tasks waiting on each unit (indexes, so
    /// neither lookup scans a 70B job's tasks).
    unit_of: HashMap<usize, usize>,
    dependents: Vec<Vec<usize>>,
    queue: VecDeque<Item>,
    /// Output files whose upload is complete (renamed / multipart completed).
    files_finished: usize,
    committing: bool,
    reduce: Reducer,
    /// Work (bytes read and written) of one pass of each statistics unit.
    unit_work: Vec<u64>,
    /// The worker process whose row cache holds a statistics range's rows (`state/home.rs`),
    /// the tasks queued for each process, and when each was last heard from.
    home: HashMap<Item, String>,
    homed: HashMap<String, VecDeque<Item>>,
    seen: HashMap<String, Instant>,
    /// The process each statistics unit runs on (the one that took its first range).
    unit_home: HashMap<usize, String>,
    /// Result audits (`state/audit.rs`).
    audits: audit::Audits,
}

/// Each statistics unit's work (one pass over its ranges) and the job's total work: every pass
/// of every unit, and every write task.
fn work_of(plan: &Plan, cut: &Cut) -> (Vec<u64>, u64) {
    let unit_work: Vec<u64> = cut
        .units
        .iter()
        .map(|u| (0..u.ranges.len()).map(|r| stats_work(plan, u, r)).sum())
        .collect();
    let stats_total: u64 = cut
        .units
        .iter()
        .zip(&unit_work)
        .map(|(u, w)| w.saturating_mul(u.passes.max(1) as u64))
        .sum();
    let writes_total: u64 = cut.tasks.iter().map(|t| write_work(plan, t)).sum();
    (unit_work, stats_total + writes_total)
}

/// Each input's reads for the status: its location, nothing read yet, and `planned` (by model,
/// in the plan's order).
fn input_reads(plan: &Plan, planned: &[u64]) -> Vec<pb::InputRead> {
    let read = plan
        .models
        .iter()
        .zip(planned)
        .map(|(m, &t)| pb::InputRead {
            input: m.loc.uri(),
            bytes_read: 0,
            bytes_read_total: t,
        });
    read.collect()
}

impl JobState {
    /// A job with every task queued (or blocked on its statistics), writing to `output_uri`.
    pub fn new(id: String, plan: Plan, cut: Cut, output_uri: String, reduce: Reducer) -> Self {
        let mut items = HashMap::new();
        let mut queue = VecDeque::new();
        for (u, unit) in cut.units.iter().enumerate() {
            for r in 0..unit.ranges.len() {
                let it = Item::Stats { unit: u, range: r };
                items.insert(it, slot(ItemState::Queued));
                queue.push_back(it);
            }
        }
        let mut blocked_by = Vec::new();
        let mut dependents = vec![Vec::new(); cut.units.len()];
        let mut file_remaining = vec![0usize; plan.files.len()];
        queue.extend(largest_first(&plan, &cut));
        for (i, t) in cut.tasks.iter().enumerate() {
            let state = if t.deps.is_empty() {
                ItemState::Queued
            } else {
                ItemState::Blocked
            };
            blocked_by.push(t.deps.len());
            items.insert(Item::Write(i), slot(state));
            for &u in &t.deps {
                dependents[u].push(i);
            }
            file_remaining[t.file] += 1;
        }
        let unit_of = cut.units.iter().enumerate().map(|(u, s)| (s.tensor, u));
        let unit_of = unit_of.collect();
        let units = cut.units.iter().map(|u| UnitState {
            pass: 0,
            state: Stats::default(),
            partials: vec![None; u.ranges.len()],
            done: false,
        });
        let units = units.collect();
        let (unit_work, work_total) = work_of(&plan, &cut);
        let planned = crate::reads::planned_reads(&plan, &cut, false);
        let status = pb::JobStatus {
            job_id: id.clone(),
            state: pb::JobState::Running as i32,
            output_uri,
            tasks_total: items.len() as u64,
            bytes_total: plan.bytes_out(),
            work_total,
            bytes_read_total: planned.iter().sum(),
            inputs: input_reads(&plan, &planned),
            ..Default::default()
        };
        JobState {
            id,
            receipts: file_remaining.iter().map(|&n| vec![None; n]).collect(),
            plan: Arc::new(plan),
            cut,
            status,
            file_remaining,
            items,
            leased: 0,
            blocked_by,
            units,
            unit_of,
            dependents,
            queue,
            files_finished: 0,
            committing: false,
            reduce,
            unit_work,
            home: HashMap::new(),
            homed: HashMap::new(),
            seen: HashMap::new(),
            unit_home: HashMap::new(),
            audits: audit::Audits::default(),
        }
    }

    pub fn terminal(&self) -> bool {
        crate::progress::is_terminal(self.status.state)
    }

    pub fn leases_active(&self) -> u32 {
        debug_assert_eq!(
            self.leased as usize,
            self.items.values().filter(|s| s.is_leased()).count(),
            "the count of leased tasks drifted from their states"
        );
        self.leased
    }

    /// Every task leased now: the task, its lease and the worker id holding it.
    #[cfg(test)]
    pub(crate) fn leased_now(&self) -> Vec<(Item, &str, &str)> {
        let leased = self.items.iter().filter_map(|(it, s)| match &s.state {
            ItemState::Leased { lease, worker, .. } => Some((*it, lease.as_str(), worker.as_str())),
            _ => None,
        });
        leased.collect()
    }

    /// Whether every task is done.
    #[cfg(test)]
    pub(crate) fn all_done(&self) -> bool {
        let done = |s: &ItemSlot| matches!(s.state, ItemState::Done);
        self.items.values().all(done)
    }

    /// The statistics state a task reading `tensor` carries (its unit's, if it has one), and
    /// the pass a unit is in.
    pub(crate) fn unit_stats(&self, tensor: usize) -> Option<&Stats> {
        self.unit_of.get(&tensor).map(|&u| &self.units[u].state)
    }

    pub(crate) fn unit_pass(&self, unit: usize) -> u32 {
        self.units[unit].pass
    }

    /// The journal key of task `it` as it runs now.
    pub(crate) fn task_key(&self, it: Item) -> String {
        match it {
            Item::Stats { unit, .. } => task_key(it, self.units[unit].pass),
            Item::Write(_) | Item::Audit(_) => task_key(it, 0),
        }
    }

    /// Accepts the result of task `it` (from a journal: not audited); see `record_by`.
    pub(crate) fn record(&mut self, it: Item, result: pb::TaskResult) -> Result<Recorded> {
        self.record_by(it, result, None)
    }

    /// Accepts the result of task `it` from `worker` if it is pending (leased, or queued again
    /// after its lease expired: the result stands). The one place results are accepted.
    pub(crate) fn record_by(
        &mut self,
        it: Item,
        result: pb::TaskResult,
        worker: Option<&str>,
    ) -> Result<Recorded> {
        if let Item::Audit(i) = it {
            if self.terminal() {
                return Ok(Recorded::Ignored);
            }
            return Ok(self.record_audit(i, &result));
        }
        let pending = matches!(
            self.items.get(&it).map(|s| &s.state),
            Some(ItemState::Leased { .. } | ItemState::Queued)
        );
        if self.terminal() || !pending {
            return Ok(Recorded::Ignored);
        }
        if let Item::Stats { .. } = it {
            self.note_home(it);
        }
        if let Some(slot) = self.items.get_mut(&it) {
            slot.set(ItemState::Done, &mut self.leased);
        }
        self.status.tasks_done += 1;
        self.status.bytes_read += result.bytes_read;
        self.count_reads(&result.inputs);
        match it {
            Item::Write(i) => {
                let t = &self.cut.tasks[i];
                self.status.bytes_done += t.length;
                self.status.work_done += write_work(&self.plan, t);
                let d = result.part.as_ref().map_or((0, 0), |p| (p.size, p.crc32c));
                let receipt = result.part.map(|p| Receipt {
                    part_index: p.part_index,
                    etag: p.etag,
                    size: p.size,
                    crc32c: p.crc32c,
                });
                self.receipts[t.file][t.part_index as usize] = receipt;
                self.file_remaining[t.file] -= 1;
                return Ok(self.after_write(i, worker, d));
            }
            Item::Audit(_) => {}
            Item::Stats { unit, range } => {
                self.status.work_done += stats_work(&self.plan, &self.cut.units[unit], range);
                let stats = result.stats.as_ref().map(Stats::from_proto);
                self.units[unit].partials[range] = Some(stats.unwrap_or_default());
                if self.units[unit].partials.iter().all(Option::is_some) {
                    self.reduce_unit(unit)?;
                }
            }
        }
        Ok(Recorded::Accepted)
    }

    /// Adds a result's reads by input (named by model, as its task's sources name them) to
    /// the status's reads by input (by location, in the plan's order).
    fn count_reads(&mut self, reads: &[pb::InputRead]) {
        for r in reads {
            let m = self.plan.models.iter().position(|m| m.name == r.input);
            if let Some(s) = m.and_then(|m| self.status.inputs.get_mut(m)) {
                s.bytes_read += r.bytes_read;
            }
        }
    }

    fn set_queued(&mut self, it: Item) {
        if let Some(s) = self.items.get_mut(&it) {
            s.set(ItemState::Queued, &mut self.leased);
        }
        self.queue.push_back(it);
    }

    /// Ends the job as `state` with `msg`, unless it has ended already, or it is committing
    /// and this is a cancel (every data file is complete; removing them under the commit could
    /// leave an index without its files). Returns whether it ended now.
    pub fn end(&mut self, state: pb::JobState, msg: &str) -> bool {
        if self.terminal() || (self.committing && state == pb::JobState::Cancelled) {
            return false;
        }
        self.status.state = state as i32;
        self.status.error = msg.to_string();
        self.queue.clear();
        self.homed.clear();
        self.end_audits();
        true
    }

    /// The receipts of output file `fi`'s parts.
    pub(crate) fn receipts_of(&self, fi: usize) -> Vec<Receipt> {
        self.receipts[fi].iter().flatten().cloned().collect()
    }

    /// Counts a completed output file. Files complete in any order (a slow multipart
    /// completion may finish last): true when this was the last one, and the job now commits.
    pub(crate) fn file_finished(&mut self) -> bool {
        self.files_finished += 1;
        let last = self.files_finished == self.plan.files.len();
        if last && !self.committing && !self.terminal() {
            self.committing = true;
            self.status.state = pb::JobState::Committing as i32;
            return true;
        }
        false
    }

    pub fn succeed(&mut self) {
        self.status.state = pb::JobState::Succeeded as i32;
    }
}

impl ItemSlot {
    fn is_leased(&self) -> bool {
        matches!(self.state, ItemState::Leased { .. })
    }

    /// Moves the item to `state`, keeping `leased` (the job's count of leased items) true.
    fn set(&mut self, state: ItemState, leased: &mut u32) {
        let was = self.is_leased();
        self.state = state;
        match (was, self.is_leased()) {
            (true, false) => *leased -= 1,
            (false, true) => *leased += 1,
            _ => {}
        }
    }
}

fn slot(state: ItemState) -> ItemSlot {
    ItemSlot { state, attempts: 0 }
}
