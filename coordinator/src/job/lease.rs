//! Leases: which worker holds which task of which job, by lease id. A task's deadline lives
//! with its state (`JobState`, which expires it given the time); this table finds the job and
//! task a lease id names, and forgets leases when they end. Change the lease rules here and in
//! `JobState::{lease_next, renew, expire}`.

use std::collections::HashMap;
use std::time::Instant;

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

/// The id of the lease on attempt `attempt` of task `item` of job `job`.
pub fn lease_id(job: &str, item: Item, attempt: u32) -> String {
    format!("{job}:{item:?}:{attempt}")
}

/// Every lease in force, by id.
#[derive(Default)]
pub struct LeaseTable {
    leases: HashMap<String, Lease>,
}

impl LeaseTable {
    pub fn grant(&mut self, lease: Lease) {
        self.leases.insert(lease.id.clone(), lease);
    }

    pub fn get(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id)
    }

    /// Removes lease `id` (its task was reported, or it expired); returns it if it was held.
    pub fn take(&mut self, id: &str) -> Option<Lease> {
        self.leases.remove(id)
    }

    /// Forgets every lease of job `job` (it ended).
    pub fn forget_job(&mut self, job: &str) {
        self.leases.retain(|_, l| l.job != job);
    }
}
