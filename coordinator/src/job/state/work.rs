//! Work accounting: the bytes a task reads and writes, the unit `JobStatus` progress counts in.

use shardmerge_proto as pb;
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::tensor::view2d;

use crate::cut::{SegDef, StatsUnit, TaskDef};
use crate::plan::Plan;

/// Input bytes one row of `t` reads: its row length times the inputs' element sizes.
fn input_row_bytes(t: &pb::TensorJob) -> u64 {
    let (_, row_len) = view2d(&t.shape);
    let elem: u64 = t
        .inputs
        .iter()
        .map(|i| DType::from_proto(i.dtype).map_or(4, |d| d.size() as u64))
        .sum();
    row_len.saturating_mul(elem)
}

/// The work of write task `t`: the input bytes of its rows plus the bytes it writes.
pub(super) fn write_work(plan: &Plan, t: &TaskDef) -> u64 {
    let reads: u64 = t
        .segments
        .iter()
        .map(|s| match s {
            SegDef::Rows {
                tensor, start, end, ..
            } => (end - start).saturating_mul(input_row_bytes(&plan.tensors[*tensor])),
            SegDef::Literal(_) => 0,
        })
        .sum();
    t.length + reads
}

/// The work of range `range` of statistics unit `u` (one pass over those rows).
pub(super) fn stats_work(plan: &Plan, u: &StatsUnit, range: usize) -> u64 {
    let (a, b) = u.ranges[range];
    (b - a).saturating_mul(input_row_bytes(&plan.tensors[u.tensor]))
}
