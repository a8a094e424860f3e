//! Work accounting: the bytes a task reads and writes, the unit `JobStatus` progress counts in.

use crate::cut::{SegDef, StatsUnit, TaskDef};
use crate::plan::Plan;

/// The work of write task `t`: the input bytes of its rows plus the bytes it writes.
pub(super) fn write_work(plan: &Plan, t: &TaskDef) -> u64 {
    let reads: u64 = t
        .segments
        .iter()
        .map(|s| match s {
            SegDef::Rows {
                tensor, start, end, ..
            } => (end - start).saturating_mul(plan.tensors[*tensor].input_row_bytes()),
            SegDef::Literal(_) => 0,
        })
        .sum();
    t.length + reads
}

/// The work of range `range` of statistics unit `u` (one pass over those rows).
pub(super) fn stats_work(plan: &Plan, u: &StatsUnit, range: usize) -> u64 {
    let (a, b) = u.ranges[range];
    (b - a).saturating_mul(plan.tensors[u.tensor].input_row_bytes())
}
