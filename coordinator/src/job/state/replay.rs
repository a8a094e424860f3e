//! Replaying a job's journaled task results after a coordinator restart.

use shardmerge_proto as pb;

use super::{ItemState, JobState, Recorded};
use crate::error::Result;
use crate::journal::{parse_task_key, Item};

impl JobState {
    /// Replays the task results a journal holds for this job (by task key): statistics first,
    /// pass by pass (a pass's results only count once the ones before it are folded), then
    /// writes whose inputs are ready; anything else runs again. Returns the output files the
    /// replayed results complete.
    pub fn replay(&mut self, records: Vec<(String, pb::TaskResult)>) -> Result<Vec<usize>> {
        let mut stats = Vec::new();
        let mut writes = Vec::new();
        for (k, r) in records {
            match parse_task_key(&k) {
                Some((Item::Write(i), _)) => writes.push((i, r)),
                Some((Item::Stats { unit, range }, pass)) => stats.push(((unit, pass, range), r)),
                Some((Item::Audit(_), _)) | None => {
                    tracing::warn!(job = %self.id, "journal: ignoring unknown record {k}")
                }
            }
        }
        stats.sort_by_key(|(k, _)| *k);
        for ((unit, pass, range), r) in stats {
            let it = Item::Stats { unit, range };
            let current = self
                .units
                .get(unit)
                .is_some_and(|s| s.pass == pass && !s.done);
            if current && self.is_queued(it) {
                self.record(it, r)?;
            }
        }
        let mut complete = Vec::new();
        writes.sort_by_key(|(i, _)| *i);
        for (i, r) in writes {
            if self.is_queued(Item::Write(i)) {
                if let Recorded::FileComplete(f) = self.record(Item::Write(i), r)? {
                    complete.push(f);
                }
            }
        }
        Ok(complete)
    }

    fn is_queued(&self, it: Item) -> bool {
        matches!(
            self.items.get(&it).map(|s| &s.state),
            Some(ItemState::Queued)
        )
    }
}
