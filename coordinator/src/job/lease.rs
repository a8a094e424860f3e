//! Leases: which worker holds which task of which job, by lease id. A task's deadline lives
//! with its state (`JobState`, which expires it given the time); this table finds the job and
//! task a lease id names, counts what each worker holds, and forgets leases when they end.
//! Change the lease rules here and in `JobState::{lease_next, renew, expire}`
//! (`job/state/leased.rs`).
//!
//! Lease ids are 128 random bits from the operating system, in hex: a lease cannot be guessed
//! from another one, and every use of it must come from the worker id that polled it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::journal::Item;

/// A lease handed to a worker.
#[derive(Clone, Debug)]
pub struct Lease {
    pub id: String,
    /// The worker that polled it (as it named itself).
    pub worker: String,
    pub job: String,
    pub item: Item,
    pub granted_at: Instant,
}

/// The coordinator's rules for leases.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaseRules {
    /// How long a lease lasts without a renewal.
    pub ttl: Duration,
    /// How long a task may run under one lease, renewals included; past it, renewals are
    /// refused and the lease expires, so the task runs elsewhere.
    pub max_task_time: Duration,
}

/// A fresh lease id: 128 bits from the operating system's generator, in hex.
pub(crate) fn fresh_lease_id() -> String {
    crate::random::hex128("lease ids")
}

/// Every lease in force, by id.
#[derive(Default)]
pub(crate) struct LeaseTable {
    leases: HashMap<String, Lease>,
    /// Leases held per worker id.
    held: HashMap<String, usize>,
}

impl LeaseTable {
    pub fn grant(&mut self, lease: Lease) {
        *self.held.entry(lease.worker.clone()).or_default() += 1;
        if let Some(old) = self.leases.insert(lease.id.clone(), lease) {
            self.release(&old.worker);
        }
    }

    pub fn get(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id)
    }

    /// How many leases worker `worker` holds.
    pub fn held_by(&self, worker: &str) -> usize {
        self.held.get(worker).copied().unwrap_or(0)
    }

    /// Removes lease `id` (its task was reported, or it expired); returns it if it was held.
    pub fn take(&mut self, id: &str) -> Option<Lease> {
        let l = self.leases.remove(id)?;
        self.release(&l.worker);
        Some(l)
    }

    /// Forgets every lease of job `job` (it ended).
    pub fn forget_job(&mut self, job: &str) {
        let ids: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.job == job)
            .map(|l| l.id.clone())
            .collect();
        for id in ids {
            self.take(&id);
        }
    }

    fn release(&mut self, worker: &str) {
        if let Some(n) = self.held.get_mut(worker) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(worker);
            }
        }
    }
}
