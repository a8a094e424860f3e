//! Result audits (`--audit-fraction`, docs/security.md "Result audits"). A worker holding the
//! worker token is not believed on its word: a deterministic sample of write tasks (and every
//! write task of a process party to a disagreement) is computed again by another worker
//! *process*, which writes nothing and reports the size and CRC-32C of the bytes. Equal: the
//! audit passed. Different: a third process breaks the tie, and the process that disagrees with
//! it is quarantined: its leases are revoked, its polls get no work, and every write task it did
//! in this job runs again elsewhere. While audits are on, the job's files complete only once
//! every write task is done and every audit decided, so a re-run never meets a completed file.
//!
//! An audit that no other process can run (one worker process, or none but the two that
//! disagree) waits until every write task is done; then it is decided once it has waited
//! `gone` (two lease TTLs) for one to poll again, or, when the job never saw such a process,
//! once `gone` (at least [`ALONE_WAIT`]) has passed since the job first polled (since it was
//! started or resumed: after a coordinator restart the first process to poll again is not
//! alone just for being first):
//! an unaudited result is accepted
//! (counted as skipped, said once per job); an undecided disagreement fails the job.
//! Statistics tasks are not audited (their results are folded as they arrive).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use shardmerge_proto as pb;

use super::home::process_of;
use super::{slot, ItemState, JobState, Recorded};
use crate::journal::Item;

/// The least a job waits from its first poll before it decides that no process but the one
/// whose results await audit is there: twice the workers' longest reconnect backoff (5 s), so
/// that after a coordinator restart the honest workers are back before a fast liar is alone.
const ALONE_WAIT: Duration = Duration::from_secs(10);

/// How a coordinator samples write tasks for audit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AuditRules {
    /// The fraction of write tasks another worker process computes again (0: no audits).
    pub fraction: f64,
    /// Seeds which tasks are sampled (random per coordinator unless `--audit-seed` is given:
    /// a worker that knew the seed would know which of its results go unchecked).
    pub seed: u64,
}

/// What a write result says its part is: size and CRC-32C.
type Digest = (u64, u32);

struct Pending {
    /// The process whose result stands until the audit is decided.
    writer: String,
    expect: Digest,
    /// An auditor that disagreed and what it reported: a third process decides.
    dispute: Option<(String, Digest)>,
    /// Since when no process that may run the audit has been polling.
    waiting_since: Option<Instant>,
}

/// What an audit requires of the job manager (beyond the files `Recorded` names).
#[derive(Debug, PartialEq, Eq)]
pub enum AuditEvent {
    /// `process` was quarantined because of write task `task`; the `leases` it (or audits of
    /// its tasks) held are revoked: forget them.
    Quarantined {
        process: String,
        task: usize,
        why: String,
        leases: Vec<String>,
    },
    /// Audits cannot run (said once per job).
    Alone(String),
    /// A disagreement no third process can decide: the job fails with this message.
    Undecided(String),
}

#[derive(Default)]
pub(super) struct Audits {
    rules: AuditRules,
    /// The process whose accepted result each write task holds.
    by: HashMap<usize, String>,
    pending: BTreeMap<usize, Pending>,
    /// Audits waiting for a process (write task indexes).
    queue: VecDeque<usize>,
    quarantined: BTreeSet<String>,
    /// Processes party to a disagreement: every later write task of theirs is audited.
    suspects: HashSet<String>,
    /// Output files already handed out for completion.
    released: Vec<bool>,
    said_alone: bool,
    events: Vec<AuditEvent>,
    /// The first audit tick of this job (its first poll since it started or was resumed).
    first_tick: Option<Instant>,
}

/// Whether write task `i` is in the sample: a hash of (seed, task) below `fraction`.
pub(crate) fn sampled(rules: AuditRules, i: usize) -> bool {
    if rules.fraction >= 1.0 {
        return true;
    }
    // splitmix64
    let mut z = rules.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < rules.fraction
}

fn digest(r: &pb::TaskResult) -> Digest {
    r.part.as_ref().map_or((0, 0), |p| (p.size, p.crc32c))
}

impl JobState {
    /// Audits this job's write tasks by `rules` (set before the first task is leased, after a
    /// journal's results are replayed: files they completed count as completed).
    pub fn set_audits(&mut self, rules: AuditRules) {
        self.audits.rules = rules;
        self.audits.released = self.file_remaining.iter().map(|&n| n == 0).collect();
    }

    pub(crate) fn auditing(&self) -> bool {
        self.audits.rules.fraction > 0.0
    }

    /// Whether `worker`'s process is quarantined in this job.
    pub fn is_quarantined(&self, worker: &str) -> bool {
        self.audits.quarantined.contains(process_of(worker))
    }

    /// What the manager must do about the audits decided since the last call.
    pub(crate) fn take_audit_events(&mut self) -> Vec<AuditEvent> {
        std::mem::take(&mut self.audits.events)
    }

    /// Write task `i`'s result was accepted from `worker` (None: replayed from the journal,
    /// not audited): samples it for audit; returns what the caller must complete.
    pub(super) fn after_write(&mut self, i: usize, worker: Option<&str>, d: Digest) -> Recorded {
        let file = self.cut.tasks[i].file;
        if !self.auditing() {
            if self.file_remaining[file] == 0 {
                return Recorded::FileComplete(file);
            }
            return Recorded::Accepted;
        }
        if let Some(w) = worker {
            let p = process_of(w).to_string();
            let audit = self.audits.suspects.contains(&p) || sampled(self.audits.rules, i);
            self.audits.by.insert(i, p.clone());
            if audit {
                let pending = Pending {
                    writer: p,
                    expect: d,
                    dispute: None,
                    waiting_since: None,
                };
                self.audits.pending.insert(i, pending);
                self.queue_audit(i);
            }
        }
        self.release_files()
    }

    fn queue_audit(&mut self, i: usize) {
        let s = self
            .items
            .entry(Item::Audit(i))
            .or_insert_with(|| slot(ItemState::Blocked));
        s.set(ItemState::Queued, &mut self.leased);
        self.audits.queue.push_back(i);
    }

    /// Moves an audit found in the job's queue (re-queued by an expiry or a failure) to the
    /// audit queue, where it waits for a process other than the ones it is about.
    pub(super) fn requeue_audit(&mut self, i: usize) {
        self.audits.queue.push_back(i);
    }

    /// The next audit `worker`'s process may run: not of its own result, nor one it disputes.
    pub(super) fn pop_audit(&mut self, worker: &str) -> Option<Item> {
        let p = process_of(worker);
        let pending = &self.audits.pending;
        self.audits.queue.retain(|i| pending.contains_key(i));
        let pos = self.audits.queue.iter().position(|i| {
            pending
                .get(i)
                .is_some_and(|a| a.writer != p && a.dispute.as_ref().is_none_or(|(q, _)| q != p))
        })?;
        self.audits.queue.remove(pos).map(Item::Audit)
    }

    /// Every output file, once every write task is done and every audit decided (while audits
    /// are on, files complete together: a quarantined worker's tasks may still run again).
    fn release_files(&mut self) -> Recorded {
        if !self.audits.pending.is_empty() || self.file_remaining.iter().any(|&n| n > 0) {
            return Recorded::Accepted;
        }
        let released = &mut self.audits.released;
        released.resize(self.file_remaining.len(), false);
        let files: Vec<usize> = (0..released.len()).filter(|&f| !released[f]).collect();
        files.iter().for_each(|&f| released[f] = true);
        if files.is_empty() {
            Recorded::Accepted
        } else {
            Recorded::FilesComplete(files)
        }
    }

    /// File `fi` is to be completed again (its parts run again).
    pub(super) fn unrelease(&mut self, fi: usize) {
        if let Some(r) = self.audits.released.get_mut(fi) {
            *r = false;
        }
    }

    /// The result of the audit of write task `i`.
    pub(super) fn record_audit(&mut self, i: usize, result: &pb::TaskResult) -> Recorded {
        let auditor = match self.items.get(&Item::Audit(i)).map(|s| &s.state) {
            Some(ItemState::Leased { worker, .. }) => process_of(worker).to_string(),
            _ => return Recorded::Ignored,
        };
        if let Some(s) = self.items.get_mut(&Item::Audit(i)) {
            s.set(ItemState::Done, &mut self.leased);
        }
        let Some(a) = self.audits.pending.get_mut(&i) else {
            return Recorded::Ignored;
        };
        let got = digest(result);
        match a.dispute.clone() {
            None if got == a.expect => {
                self.audits.pending.remove(&i);
                self.status.audits_passed += 1;
            }
            None => {
                // one of the two lies: both are suspects, and a third process decides
                let writer = a.writer.clone();
                a.dispute = Some((auditor.clone(), got));
                a.waiting_since = None;
                self.audits.suspects.insert(writer);
                self.audits.suspects.insert(auditor);
                self.queue_audit(i);
            }
            Some((q, theirs)) => {
                let (writer, expect) = (a.writer.clone(), a.expect);
                self.audits.pending.remove(&i);
                self.status.audits_failed += 1;
                let say = |d: Digest| format!("{} bytes, CRC-32C {:08x}", d.0, d.1);
                let why = format!(
                    "write task {i}: worker processes {writer:?} reported {}, {q:?} {}, and \
                     {auditor:?} (tie-break) {}",
                    say(expect),
                    say(theirs),
                    say(got)
                );
                if got != theirs {
                    self.quarantine(&q, i, &why);
                }
                if got != expect {
                    self.quarantine(&writer, i, &why);
                }
            }
        }
        self.release_files()
    }

    /// Quarantines `p` in this job: its leases are revoked (their tasks queued again), every
    /// write task whose result it gave runs again, and it gets no more work.
    fn quarantine(&mut self, p: &str, task: usize, why: &str) {
        if !self.audits.quarantined.insert(p.to_string()) {
            return;
        }
        self.status.quarantined.push(p.to_string());
        let mut leases = Vec::new();
        let held: Vec<Item> = self
            .items
            .iter()
            .filter(|(_, s)| {
                matches!(&s.state, ItemState::Leased { worker, .. } if process_of(worker) == p)
            })
            .map(|(it, _)| *it)
            .collect();
        for it in held {
            leases.extend(self.revoke(it));
        }
        // what waited for its row cache (a statistics unit's next pass, a write of its rows)
        // goes to whoever is free now, not after its queue is found abandoned
        self.seen.remove(p);
        self.unit_home.retain(|_, h| h != p);
        self.home.retain(|_, h| h != p);
        for it in self.homed.remove(p).unwrap_or_default() {
            self.queue.push_back(it);
        }
        let mut mine: Vec<usize> = self
            .audits
            .by
            .iter()
            .filter(|(_, w)| w.as_str() == p)
            .map(|(i, _)| *i)
            .collect();
        mine.sort_unstable();
        for i in mine {
            self.audits.by.remove(&i);
            leases.extend(self.drop_audit(i));
            self.undo_write(i);
        }
        // a disagreement it was party to as an auditor: the writer's result is audited again
        for a in self.audits.pending.values_mut() {
            if a.dispute.as_ref().is_some_and(|(q, _)| q == p) {
                a.dispute = None;
            }
        }
        self.audits.events.push(AuditEvent::Quarantined {
            process: p.to_string(),
            task,
            why: why.to_string(),
            leases,
        });
    }

    /// Takes a lease back from its holder: the task is queued again. Returns the lease id.
    fn revoke(&mut self, it: Item) -> Option<String> {
        let lease = match self.items.get(&it).map(|s| &s.state) {
            Some(ItemState::Leased { lease, .. }) => lease.clone(),
            _ => return None,
        };
        self.set_queued(it);
        Some(lease)
    }

    /// Forgets the audit of write task `i` (its result is dropped); returns a lease it held.
    fn drop_audit(&mut self, i: usize) -> Option<String> {
        self.audits.pending.remove(&i)?;
        let s = self.items.get_mut(&Item::Audit(i))?;
        let lease = match &s.state {
            ItemState::Leased { lease, .. } => Some(lease.clone()),
            _ => None,
        };
        s.set(ItemState::Done, &mut self.leased);
        lease
    }

    /// Audits waiting for a process: given the processes polling within `gone` of `now`, an
    /// audit none of them may run waits `gone`, then is skipped (an undisputed result stands
    /// unaudited) or fails the job (a disagreement nobody can decide). Returns the files the
    /// decisions release.
    pub(crate) fn audit_tick(&mut self, now: Instant, gone: Duration) -> Recorded {
        let first = *self.audits.first_tick.get_or_insert(now);
        // (while write tasks remain, audits wait: the files wait for them anyway, and the
        // processes that may run them may still come)
        if self.audits.pending.is_empty()
            || self.terminal()
            || self.file_remaining.iter().any(|&n| n > 0)
        {
            return Recorded::Accepted;
        }
        // processes polling now, and every one this job has seen (not quarantined)
        let (mut live, mut ever) = (Vec::new(), Vec::new());
        for (p, t) in &self.seen {
            if !self.audits.quarantined.contains(p) {
                ever.push(p.clone());
                if now.duration_since(*t) <= gone {
                    live.push(p.clone());
                }
            }
        }
        let mut skip = Vec::new();
        for (&i, a) in self.audits.pending.iter_mut() {
            let queued = matches!(
                self.items.get(&Item::Audit(i)).map(|s| &s.state),
                Some(ItemState::Queued)
            );
            let may = |r: &String| *r != a.writer && a.dispute.as_ref().is_none_or(|(q, _)| q != r);
            if !queued || live.iter().any(may) {
                a.waiting_since = None;
                continue;
            }
            // one that may run it, gone for a while, gets `gone` to come back; when none was
            // ever seen, the job waits `gone` from its first poll for one to come
            let since = *a.waiting_since.get_or_insert(now);
            let (from, wait) = if ever.iter().any(may) {
                (since, gone)
            } else {
                (first, gone.max(ALONE_WAIT))
            };
            if now.duration_since(from) < wait {
                continue;
            }
            match &a.dispute {
                None => skip.push((i, a.writer.clone())),
                Some((q, _)) => {
                    let msg = format!(
                        "write task {i}: worker processes {:?} and {q:?} computed different bytes \
                         and no third worker process polled within {:.0} s to decide which one \
                         is wrong; the job fails rather than commit either result",
                        a.writer,
                        gone.as_secs_f64()
                    );
                    self.audits.events.push(AuditEvent::Undecided(msg));
                    return Recorded::Accepted;
                }
            }
        }
        for (i, writer) in skip {
            self.drop_audit(i);
            self.status.audits_skipped += 1;
            if !self.audits.said_alone {
                self.audits.said_alone = true;
                self.audits.events.push(AuditEvent::Alone(format!(
                    "audits cannot run: no worker process but {writer:?} polled within {:.0} s; \
                     its results stand unaudited (audits need at least two worker processes)",
                    gone.as_secs_f64()
                )));
            }
        }
        self.release_files()
    }

    /// Ends the audits of an ended job.
    pub(super) fn end_audits(&mut self) {
        self.audits.queue.clear();
    }
}
