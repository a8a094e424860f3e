//! Replaying a job's journaled task results after a coordinator restart.

use shardmerge_proto as pb;

use super::audit::{sampled, AuditRules};
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

    /// Of a journal's task records, those a resumed job may take as done. With audits on
    /// (`rules`), a write result in the audit sample whose file was not completed before the
    /// restart is left out: its audit was not journaled, so the task runs again (and is
    /// audited again) rather than being believed on the word of a worker nobody checked.
    /// Files completed before the restart had every audit decided.
    pub fn believable(
        &self,
        records: Vec<(String, pb::TaskResult)>,
        rules: AuditRules,
        files_finished: &[usize],
    ) -> Vec<(String, pb::TaskResult)> {
        if rules.fraction <= 0.0 {
            return records;
        }
        records
            .into_iter()
            .filter(|(k, _)| match parse_task_key(k) {
                Some((Item::Write(i), _)) => {
                    let file = self.cut.tasks.get(i).map(|t| t.file);
                    !sampled(rules, i) || file.is_some_and(|f| files_finished.contains(&f))
                }
                _ => true,
            })
            .collect()
    }

    fn is_queued(&self, it: Item) -> bool {
        matches!(
            self.items.get(&it).map(|s| &s.state),
            Some(ItemState::Queued)
        )
    }
}
