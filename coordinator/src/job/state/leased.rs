//! Leased tasks: handing queued tasks out under fresh lease ids, who holds a lease, renewal
//! up to the task's maximum run time, expiry, and what a failed task means for its job. The
//! lease table (which job and task a lease id names) is `job/lease.rs`.

use std::time::{Duration, Instant};

use super::{ItemState, JobState, MAX_ATTEMPTS};
use crate::job::lease::{self, LeaseRules};
use crate::journal::Item;

/// A task handed out by `lease_next`.
#[derive(Debug, Clone)]
pub struct Granted {
    pub lease: String,
    pub item: Item,
    pub attempt: u32,
}

/// Who holds a lease, as a use of it by `worker` finds it.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Holder {
    /// `worker` holds it.
    Held,
    /// Not (or no longer) held by anyone.
    NotHeld,
    /// Held by another worker id: the use is refused, the holder keeps it.
    OtherWorker,
}

/// The answer to a renewal.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Renewal {
    Renewed,
    NotHeld,
    OtherWorker,
    /// The task has run its maximum time: the lease is left to expire.
    OverTime,
}

/// What a failed task means for its job.
#[derive(Debug, PartialEq, Eq)]
pub enum TaskFailed {
    /// The lease was not (or no longer) held: nothing changes.
    Ignored,
    /// Another worker id holds the lease: refused, nothing changes.
    OtherWorker,
    /// Queued again; this was attempt `.0`.
    Retried(u32),
    /// The job fails with this message.
    Fatal(String),
}

impl JobState {
    /// Leases up to `want` queued tasks to `worker` until `now + rules.ttl`, each with a fresh
    /// random lease id.
    pub(crate) fn lease_next(
        &mut self,
        want: usize,
        worker: &str,
        now: Instant,
        rules: LeaseRules,
    ) -> Vec<Granted> {
        let mut out = Vec::new();
        if self.is_quarantined(worker) {
            return out;
        }
        self.seen
            .insert(super::home::process_of(worker).to_string(), now);
        while out.len() < want {
            // audits first: the job's files wait for them
            let next = match self.pop_audit(worker) {
                Some(a) => Some(a),
                None => self.pop_for(worker, now, rules.ttl * 2),
            };
            let Some(it) = next else {
                break;
            };
            out.extend(self.grant(it, worker, now, rules));
        }
        out
    }

    /// Leases task `it` to `worker` if it is queued (a rider of another job's task that reads
    /// the same rows: `job/group.rs`); its queue entry is skipped when it comes up.
    pub(crate) fn lease_rider(
        &mut self,
        it: Item,
        worker: &str,
        now: Instant,
        rules: LeaseRules,
    ) -> Option<Granted> {
        if self.terminal() || self.is_quarantined(worker) || matches!(it, Item::Audit(_)) {
            return None;
        }
        self.grant(it, worker, now, rules)
    }

    /// Leases `it`, when it is queued, under a fresh lease id.
    fn grant(
        &mut self,
        it: Item,
        worker: &str,
        now: Instant,
        rules: LeaseRules,
    ) -> Option<Granted> {
        let slot = self.items.get_mut(&it)?;
        if !matches!(slot.state, ItemState::Queued) {
            return None;
        }
        slot.attempts += 1;
        let lease = lease::fresh_lease_id();
        let until = now + rules.max_task_time;
        let leased = ItemState::Leased {
            lease: lease.clone(),
            worker: worker.to_string(),
            deadline: (now + rules.ttl).min(until),
            until,
        };
        slot.set(leased, &mut self.leased);
        Some(Granted {
            lease,
            item: it,
            attempt: slot.attempts,
        })
    }

    /// Whether `lease` holds task `it`.
    pub fn holds(&self, it: Item, lease: &str) -> bool {
        matches!(self.items.get(&it).map(|s| &s.state),
            Some(ItemState::Leased { lease: l, .. }) if l == lease)
    }

    /// Whether `lease` on `it` is held, and by `worker`.
    pub fn holder(&self, it: Item, lease: &str, worker: &str) -> Holder {
        match self.items.get(&it).map(|s| &s.state) {
            Some(ItemState::Leased {
                lease: l,
                worker: w,
                ..
            }) if l == lease => {
                if w == worker {
                    Holder::Held
                } else {
                    Holder::OtherWorker
                }
            }
            _ => Holder::NotHeld,
        }
    }

    /// Whether `lease` on `it` has run out by `now` (its deadline or its maximum run time has
    /// passed), whether or not the expiry scan has re-queued it yet.
    pub fn lease_ran_out(&self, it: Item, lease: &str, now: Instant) -> bool {
        matches!(self.items.get(&it).map(|s| &s.state),
            Some(ItemState::Leased { lease: l, deadline, until, .. })
                if l == lease && (*deadline <= now || *until <= now))
    }

    /// Extends `lease` on `it`, held by `worker`, to `now + ttl`, but never past the task's
    /// maximum run time: a task past it is not renewed and its lease runs out.
    pub fn renew(
        &mut self,
        it: Item,
        lease: &str,
        worker: &str,
        now: Instant,
        ttl: Duration,
    ) -> Renewal {
        if self.terminal() {
            return Renewal::NotHeld;
        }
        match self.holder(it, lease, worker) {
            Holder::Held => {}
            Holder::NotHeld => return Renewal::NotHeld,
            Holder::OtherWorker => return Renewal::OtherWorker,
        }
        // a process busy with long tasks polls seldom, but it is there
        self.seen
            .insert(super::home::process_of(worker).to_string(), now);
        match self.items.get_mut(&it).map(|s| &mut s.state) {
            Some(ItemState::Leased {
                deadline, until, ..
            }) => {
                if now >= *until {
                    return Renewal::OverTime;
                }
                if now >= *deadline {
                    // ran out before this renewal arrived (the expiry scan had not run yet):
                    // the task is no longer this worker's
                    return Renewal::NotHeld;
                }
                *deadline = (now + ttl).min(*until);
                Renewal::Renewed
            }
            _ => Renewal::NotHeld,
        }
    }

    /// Re-queues every task whose lease ran out by `now` (its last renewal, or its maximum
    /// run time); returns the tasks and the leases that expired.
    pub fn expire(&mut self, now: Instant) -> Vec<(Item, String)> {
        let mut gone = Vec::new();
        for (it, slot) in self.items.iter_mut() {
            if let ItemState::Leased {
                lease,
                deadline,
                until,
                ..
            } = &slot.state
            {
                if *deadline <= now || *until <= now {
                    gone.push((*it, lease.clone()));
                    slot.set(ItemState::Queued, &mut self.leased);
                    self.queue.push_back(*it);
                    self.status.retries += 1;
                    // its process did not finish it in time: whoever is free takes it
                    if let Item::Stats { unit, .. } = it {
                        self.unit_home.remove(unit);
                    }
                }
            }
        }
        gone
    }

    /// Queues `it` again (its result could not be recorded) if `lease` still holds it.
    pub(crate) fn requeue(&mut self, it: Item, lease: &str) {
        if self.holds(it, lease) {
            if let Some(slot) = self.items.get_mut(&it) {
                slot.set(ItemState::Queued, &mut self.leased);
            }
            self.queue.push_back(it);
            self.status.retries += 1;
        }
    }

    /// A task failed under `lease`, held by `worker`: retried while attempts remain and the
    /// error allows it. (A result refused by `check_result` fails its task this way too, as
    /// retryable: a worker that keeps sending bad results uses up the task's attempts.)
    pub fn fail_task(
        &mut self,
        it: Item,
        lease: &str,
        worker: &str,
        retryable: bool,
        error: &str,
    ) -> TaskFailed {
        match self.holder(it, lease, worker) {
            Holder::Held => {}
            Holder::NotHeld => return TaskFailed::Ignored,
            Holder::OtherWorker => return TaskFailed::OtherWorker,
        }
        let Some(slot) = self.items.get_mut(&it) else {
            return TaskFailed::Ignored;
        };
        if retryable && slot.attempts < MAX_ATTEMPTS {
            slot.set(ItemState::Queued, &mut self.leased);
            self.queue.push_back(it);
            self.status.retries += 1;
            TaskFailed::Retried(slot.attempts)
        } else if retryable {
            TaskFailed::Fatal(format!("{error} (gave up after {MAX_ATTEMPTS} attempts)"))
        } else {
            TaskFailed::Fatal(error.to_string())
        }
    }
}
