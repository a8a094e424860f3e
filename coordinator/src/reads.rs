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
    for task in &cut.tasks {
        for seg in &task.segments {
            if let SegDef::Rows {
                tensor, start, end, ..
            } = seg
            {
                add_reads(plan, &plan.tensors[*tensor], end - start, &mut by_model);
            }
        }
    }
    for u in &cut.units {
        let t = &plan.tensors[u.tensor];
        for &(a, b) in &u.ranges {
            let rows = (b - a).saturating_mul(u.passes as u64);
            if reread {
                add_reads(plan, t, rows, &mut by_model);
            } else {
                // a streamed stage's rows are computed again for every pass (never cached)
                for d in t.inputs.iter().filter_map(|s| s.derived.as_ref()) {
                    add_reads(plan, &d.0, rows, &mut by_model);
                }
            }
        }
    }
    by_model
}

/// Adds what `rows` rows of `t` read to each model's count: a derived input (a streamed stage)
/// reads the inputs of the tensor it is computed from.
fn add_reads(plan: &Plan, t: &TensorPlan, rows: u64, by_model: &mut [u64]) {
    for s in &t.inputs {
        if let Some(d) = &s.derived {
            add_reads(plan, &d.0, rows, by_model);
        } else if let Some(m) = plan.models.iter().position(|m| *m.name == *s.model) {
            let n = rows.saturating_mul(s.row_bytes());
            by_model[m] = by_model[m].saturating_add(n);
        }
    }
}
