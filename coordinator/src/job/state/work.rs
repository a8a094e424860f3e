//! Work accounting: the bytes a task reads and writes, the unit `JobStatus` progress counts in,
//! and the order the ready writes go out in by it.

use crate::cut::{Cut, SegDef, StatsUnit, TaskDef};
use crate::journal::Item;
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

/// The write tasks ready from the start (no statistics to wait for), largest first ([`write_work`]),
/// in task order among equals: a whole embedding left for last kept one slot busy while the
/// others had nothing left to do.
pub(super) fn largest_first(plan: &Plan, cut: &Cut) -> Vec<Item> {
    let mut ready: Vec<(u64, usize)> = (cut.tasks.iter().enumerate())
        .filter(|(_, t)| t.deps.is_empty())
        .map(|(i, t)| (write_work(plan, t), i))
        .collect();
    ready.sort_by_key(|&(w, i)| (std::cmp::Reverse(w), i));
    ready.into_iter().map(|(_, i)| Item::Write(i)).collect()
}
