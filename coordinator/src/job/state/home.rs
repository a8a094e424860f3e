//! Where a statistics unit's rows are: the worker process that ran a range's last pass keeps
//! the input rows it read in its row cache, so the range's next pass and the write task of
//! those rows are leased to that process first (each from the front of its own queue, so a
//! unit's passes and its writes run before new units start and the cache holds a few tensors,
//! not the model). A process that stops polling loses its queue to everyone after a lease's
//! time; whoever runs a task elsewhere reads storage, with the same result.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{ItemState, JobState};
use crate::cut::SegDef;
use crate::journal::Item;

/// The process a worker slot belongs to: workers poll as `<process>/<slot>`
/// (`shardmerge_worker::pull`), and the row cache is the process's.
pub(super) fn process_of(worker: &str) -> &str {
    worker.rsplit_once('/').map_or(worker, |(p, _)| p)
}

impl JobState {
    /// Notes that the worker holding `it` (a statistics range) now has its rows.
    pub(super) fn note_home(&mut self, it: Item) {
        if let Some(ItemState::Leased { worker, .. }) = self.items.get(&it).map(|s| &s.state) {
            let p = process_of(worker).to_string();
            self.home.insert(it, p);
        }
    }

    /// Queues `items` where their rows are, in their order: each at the back of its home
    /// process's queue, the others at the front of the job's queue.
    pub(super) fn queue_near(&mut self, items: &[Item]) {
        let mut front = Vec::new();
        for &it in items {
            if let Some(s) = self.items.get_mut(&it) {
                s.state = ItemState::Queued;
            }
            let home = match it {
                Item::Stats { .. } => self.home.get(&it).cloned(),
                Item::Write(i) => self.write_home(i),
                Item::Audit(_) => None,
            };
            match home {
                Some(p) => self.homed.entry(p).or_default().push_back(it),
                None => front.push(it),
            }
        }
        for it in front.into_iter().rev() {
            self.queue.push_front(it);
        }
    }

    /// The home of write task `i`: that of the first statistics range it writes.
    fn write_home(&self, i: usize) -> Option<String> {
        self.cut.tasks[i].segments.iter().find_map(|s| match s {
            SegDef::Rows {
                tensor,
                range_index,
                ..
            } => {
                let unit = *self.unit_of.get(tensor)?;
                let range = *range_index as usize;
                self.home.get(&Item::Stats { unit, range }).cloned()
            }
            SegDef::Literal(_) => None,
        })
    }

    /// The next task queued for `worker`'s process, after handing the queues of processes
    /// not seen for `gone` to everyone.
    pub(super) fn pop_for(&mut self, worker: &str, now: Instant, gone: Duration) -> Option<Item> {
        let p = process_of(worker);
        self.seen.insert(p.to_string(), now);
        let lost: Vec<String> = self
            .homed
            .keys()
            .filter(|h| {
                self.seen
                    .get(h.as_str())
                    .is_none_or(|&t| now.duration_since(t) > gone)
            })
            .cloned()
            .collect();
        for h in lost {
            let q: VecDeque<Item> = self.homed.remove(&h).unwrap_or_default();
            for it in q.into_iter().rev() {
                self.queue.push_front(it);
            }
        }
        if let Some(it) = self.homed.get_mut(p).and_then(VecDeque::pop_front) {
            return Some(it);
        }
        // a unit runs on the process that took its first range (a write task then finds all
        // the unit's rows in one cache): its other ranges wait in that process's queue
        while let Some(it) = self.queue.pop_front() {
            // (an audit queued again by an expiry or failure waits for a process it may go to)
            if let Item::Audit(i) = it {
                self.requeue_audit(i);
                continue;
            }
            let Item::Stats { unit, .. } = it else {
                return Some(it);
            };
            let owner = match self.unit_home.get(&unit) {
                Some(q)
                    if q != p
                        && self
                            .seen
                            .get(q)
                            .is_some_and(|&t| now.duration_since(t) <= gone) =>
                {
                    q.clone()
                }
                // no owner yet, or this process, or a process gone: the unit runs here
                _ => {
                    self.unit_home.insert(unit, p.to_string());
                    return Some(it);
                }
            };
            self.homed.entry(owner).or_default().push_back(it);
        }
        None
    }
}
