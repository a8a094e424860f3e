//! Building the task a worker runs from the plan: the bytes it writes (header literals and
//! tensor rows with their resolved method), the statistics it carries, and where its output
//! goes (a local file at an offset, or one part of a multipart upload).

use shardmerge_proto as pb;
use shardmerge_worker::storage::{Location, Upload};

use super::state::JobState;
use crate::cut::SegDef;
use crate::journal::Item;

/// The wire id of a task: its index for a write task; bit 40 set, then unit and range, for a
/// statistics task.
pub fn task_id(item: Item) -> u64 {
    match item {
        Item::Write(i) => i as u64,
        Item::Stats { unit, range } => (1u64 << 40) | ((unit as u64) << 20) | range as u64,
    }
}

/// Task `item` of job `st` (attempt `attempt`), writing into `out` through `uploads`.
pub fn build_task(
    st: &JobState,
    out: &Location,
    uploads: &[Upload],
    item: Item,
    attempt: u32,
) -> pb::Task {
    let kind = match item {
        Item::Write(i) => pb::task::Kind::Write(write_task(st, out, uploads, i)),
        Item::Stats { unit, range } => {
            let u = &st.cut.units[unit];
            let (a, b) = u.ranges[range];
            pb::task::Kind::Stats(pb::StatsTask {
                rows: Some(rows(st, u.tensor, a, b, range as u32)),
                pass: st.unit_pass(unit),
            })
        }
    };
    pb::Task {
        job_id: st.id.clone(),
        task_id: task_id(item),
        attempt,
        kind: Some(kind),
    }
}

fn rows(st: &JobState, tensor: usize, start: u64, end: u64, range_index: u32) -> pb::TensorRows {
    pb::TensorRows {
        tensor: Some(crate::plan::vocab::for_rows(
            &st.plan.tensors[tensor],
            start,
            end,
        )),
        row_start: start,
        row_end: end,
        range_index,
        stats: st.unit_stats(tensor).map(|s| s.to_proto()),
    }
}

fn write_task(st: &JobState, out: &Location, uploads: &[Upload], i: usize) -> pb::WriteTask {
    let t = &st.cut.tasks[i];
    let up = &uploads[t.file];
    let file_uri = out.join(&st.plan.files[t.file].name).uri();
    let sink = if out.store.is_local() {
        pb::output_target::Sink::Local(pb::LocalSink {
            path: up.id.clone(),
        })
    } else {
        pb::output_target::Sink::Multipart(pb::MultipartSink {
            store: out.store.scheme_root(),
            key: up.path.clone(),
            upload_id: up.id.clone(),
            part_index: t.part_index,
        })
    };
    let segment = |s: &SegDef| pb::Segment {
        kind: Some(match s {
            SegDef::Literal(b) => pb::segment::Kind::Literal(b.clone()),
            SegDef::Rows {
                tensor,
                start,
                end,
                range_index,
            } => pb::segment::Kind::Rows(rows(st, *tensor, *start, *end, *range_index)),
        }),
    };
    pb::WriteTask {
        output: Some(pb::OutputTarget {
            uri: file_uri,
            offset: t.offset,
            length: t.length,
            sink: Some(sink),
        }),
        segments: t.segments.iter().map(segment).collect(),
    }
}
