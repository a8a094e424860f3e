//! What a job reads from its inputs, from the cut: every write task's rows, and every
//! statistics pass over a unit's rows that cannot be served from a worker's row cache. The
//! figure `plan`, the run summary, `status` and the metrics give for the bytes a job will read.

use crate::cut::{Cut, SegDef};
use crate::plan::{Plan, TensorPlan};

/// The input bytes a job reads from each of `plan.models` (in their order), every pass
/// included: each write task reads its rows; each statistics pass after the first is served
/// from the row cache of the worker that ran the first, so a unit's rows are read once more
/// only when `reread` (no row cache).
pub fn planned_reads(plan: &Plan, cut: &Cut, reread: bool) -> Vec<u64> {
    let mut by_model = vec![0u64; plan.models.len()];
    let model_of = |name: &str| plan.models.iter().position(|m| m.name == name);
    let mut add = |t: &TensorPlan, rows: u64, times: u64| {
        for s in &t.inputs {
            if let Some(m) = model_of(&s.model) {
                let n = rows.saturating_mul(s.row_bytes()).saturating_mul(times);
                by_model[m] = by_model[m].saturating_add(n);
            }
        }
    };
    for task in &cut.tasks {
        for seg in &task.segments {
            if let SegDef::Rows {
                tensor, start, end, ..
            } = seg
            {
                add(&plan.tensors[*tensor], end - start, 1);
            }
        }
    }
    if reread {
        for u in &cut.units {
            for &(a, b) in &u.ranges {
                add(&plan.tensors[u.tensor], b - a, u.passes as u64);
            }
        }
    }
    by_model
}
