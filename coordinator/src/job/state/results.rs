//! Results: checking a reported result against the plan, folding statistics passes, and
//! running an output file's write tasks again when storage does not hold what was reported.

use shardmerge_proto as pb;
use shardmerge_worker::kernels::Reduced;

use super::{ItemState, JobState, MAX_ATTEMPTS};
use crate::error::Result;
use crate::journal::Item;

impl JobState {
    /// Checks a reported result of task `it` against the plan: its reads by input add up to
    /// its reads; a write task's receipt names the task's part and exactly its byte length; a
    /// statistics task carries statistics and no receipt. `multipart`: the output is written
    /// in numbered parts (a local file's positioned writes carry no part number). `Err` says
    /// what was wrong (the result is refused and the task runs again).
    pub(crate) fn check_result(
        &self,
        it: Item,
        result: &pb::TaskResult,
        multipart: bool,
    ) -> std::result::Result<(), String> {
        // an audit reports the part it would have written, by no part number
        let multipart = multipart && matches!(it, Item::Write(_));
        // the reads by input add up to the reads (none: a worker that does not report them)
        let by_input = result.inputs.iter().map(|r| r.bytes_read);
        let by_input = by_input.fold(0u64, u64::saturating_add);
        if !result.inputs.is_empty() && by_input != result.bytes_read {
            return Err(format!(
                "task {it:?}: the result reports {} bytes read, and {by_input} by input",
                result.bytes_read
            ));
        }
        match it {
            Item::Write(i) | Item::Audit(i) => {
                let Some(t) = self.cut.tasks.get(i) else {
                    return Err(format!("write task {i} is not in the plan"));
                };
                let file = self.plan.files.get(t.file).map_or("?", |f| f.name.as_str());
                let Some(p) = &result.part else {
                    return Err(format!(
                        "write task {i} ({file} bytes {}..{}): the result has no part receipt",
                        t.offset,
                        t.offset + t.length
                    ));
                };
                if multipart && p.part_index != t.part_index {
                    return Err(format!(
                        "write task {i} ({file}): the receipt names part {}, the plan part {}",
                        p.part_index, t.part_index
                    ));
                }
                // an audit writes nothing: its receipt describes the bytes it computed
                let written = if matches!(it, Item::Audit(_)) {
                    0
                } else {
                    t.length
                };
                if p.size != t.length || result.bytes_written != written {
                    return Err(format!(
                        "write task {i} ({file} part {}): the result reports {} bytes (receipt) \
                         and {} bytes (written), the plan {} bytes (written: {written})",
                        t.part_index, p.size, result.bytes_written, t.length
                    ));
                }
                if result.stats.is_some() {
                    return Err(format!(
                        "write task {i} ({file}): the result carries statistics"
                    ));
                }
            }
            Item::Stats { unit, range } => {
                let Some(u) = self.cut.units.get(unit) else {
                    return Err(format!("statistics unit {unit} is not in the plan"));
                };
                let tensor = self
                    .plan
                    .tensors
                    .get(u.tensor)
                    .map_or("?", |t| t.name.as_str());
                if result.stats.is_none() {
                    return Err(format!(
                        "statistics task of tensor {tensor} (range {range}): the result carries \
                         no statistics"
                    ));
                }
                if result.part.is_some() {
                    return Err(format!(
                        "statistics task of tensor {tensor} (range {range}): the result carries \
                         a part receipt"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Folds a statistics pass; queues the next pass or releases the tasks that wait.
    pub(super) fn reduce_unit(&mut self, unit: usize) -> Result<()> {
        let tensor = &self.plan.tensors[self.cut.units[unit].tensor];
        let u = &mut self.units[unit];
        let partials = u.partials.iter_mut().map(|p| p.take().unwrap_or_default());
        let state = std::mem::take(&mut u.state);
        let (state, done) = match (self.reduce)(tensor, u.pass, state, partials.collect())? {
            Reduced::More(s) => (s, u.pass + 1 >= self.cut.units[unit].passes),
            Reduced::Done(s) => (s, true),
        };
        u.state = state;
        if done {
            // a method that needed fewer passes than planned: the passes left are not work
            let left = self.cut.units[unit].passes.saturating_sub(u.pass + 1);
            let unplanned = self.unit_work[unit].saturating_mul(left as u64);
            self.status.work_total = self.status.work_total.saturating_sub(unplanned);
            u.done = true;
            let mut ready = Vec::new();
            for k in 0..self.dependents[unit].len() {
                let i = self.dependents[unit][k];
                self.blocked_by[i] -= 1;
                if self.blocked_by[i] == 0 {
                    ready.push(Item::Write(i));
                }
            }
            self.queue_near(&ready);
        } else {
            u.pass += 1;
            let n = self.cut.units[unit].ranges.len();
            u.partials = vec![None; n];
            // next, before other units: each to its process's queue, or to the job's front
            let next: Vec<Item> = (0..n).map(|range| Item::Stats { unit, range }).collect();
            self.queue_near(&next);
            self.status.tasks_total += n as u64;
        }
        Ok(())
    }

    /// Runs every write task of output file `fi` again: what storage holds for it did not
    /// check out (a part missing or of the wrong size), so its parts are written again.
    /// Counts an attempt on each; `Err` with a message when one has no attempts left (the
    /// job fails).
    pub(crate) fn reopen_file(&mut self, fi: usize) -> std::result::Result<(), String> {
        let tasks: Vec<usize> = (0..self.cut.tasks.len())
            .filter(|&i| self.cut.tasks[i].file == fi)
            .collect();
        for &i in &tasks {
            let attempts = self.items.get(&Item::Write(i)).map_or(0, |s| s.attempts);
            if attempts >= MAX_ATTEMPTS {
                return Err(format!(
                    "output file {} did not check out in storage after {MAX_ATTEMPTS} attempts",
                    self.plan.files.get(fi).map_or("?", |f| f.name.as_str())
                ));
            }
        }
        for i in tasks {
            self.undo_write(i);
        }
        self.unrelease(fi);
        Ok(())
    }

    /// Runs write task `i` again if it is done: its result is dropped (progress goes back,
    /// and never passes its total) and it is queued. Returns whether it was done.
    pub(super) fn undo_write(&mut self, i: usize) -> bool {
        let was_done = matches!(
            self.items.get(&Item::Write(i)).map(|s| &s.state),
            Some(ItemState::Done)
        );
        if !was_done {
            return false;
        }
        let t = &self.cut.tasks[i];
        self.status.tasks_done = self.status.tasks_done.saturating_sub(1);
        self.status.bytes_done = self.status.bytes_done.saturating_sub(t.length);
        let work = super::write_work(&self.plan, t);
        self.status.work_done = self.status.work_done.saturating_sub(work);
        self.file_remaining[t.file] += 1;
        if let Some(r) = self.receipts[t.file].get_mut(t.part_index as usize) {
            *r = None;
        }
        self.set_queued(Item::Write(i));
        self.status.retries += 1;
        true
    }
}
