//! Building the task a worker runs from the plan: the bytes it writes (header literals and
//! tensor rows with their resolved method), the statistics it carries, and where its output
//! goes (a local file at an offset, or one part of a multipart upload).

use shardmerge_proto as pb;
use shardmerge_worker::kernels::{rng, round::Work};
use shardmerge_worker::storage::{Location, Upload};

use super::state::JobState;
use crate::cut::SegDef;
use crate::journal::Item;
use crate::plan::lora::{AdapterTensor, LoraPlan};
use crate::plan::{vocab, InputPlan, TensorPlan};

/// The wire id of a task: its index for a write task; bit 40 set, then unit and range, for a
/// statistics task; bit 41 set, then the write task's index, for an audit.
pub fn task_id(item: Item) -> u64 {
    match item {
        Item::Write(i) => i as u64,
        Item::Stats { unit, range } => (1u64 << 40) | ((unit as u64) << 20) | range as u64,
        Item::Audit(i) => (1u64 << 41) | i as u64,
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
        Item::Audit(i) => {
            // an audit writes nothing: its target has no sink (no temporary file, no upload
            // id), so not even a hostile auditor can write through it
            let mut w = write_task(st, out, uploads, i);
            if let Some(o) = w.output.as_mut() {
                o.sink = None;
            }
            pb::task::Kind::Write(w)
        }
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
        audit: matches!(item, Item::Audit(_)),
        kind: Some(kind),
    }
}

fn rows(st: &JobState, tensor: usize, start: u64, end: u64, range_index: u32) -> pb::TensorRows {
    pb::TensorRows {
        tensor: Some(tensor_job(&st.plan.tensors[tensor], start, end)),
        row_start: start,
        row_end: end,
        range_index,
        stats: st.unit_stats(tensor).map(|s| s.to_proto()),
        tensor_index: 0,
    }
}

/// The tensors a write task's segments write, each once, with the rows of all its segments
/// (a row map cropped to their span), and each segment's place among them.
fn tensor_table(st: &JobState, segs: &[SegDef]) -> (Vec<pb::TensorJob>, Vec<u32>) {
    let mut spans: Vec<(usize, u64, u64)> = Vec::new();
    let mut place = Vec::with_capacity(segs.len());
    for s in segs {
        let SegDef::Rows {
            tensor, start, end, ..
        } = s
        else {
            place.push(0);
            continue;
        };
        // a tensor's segments in one task are adjacent: look at the last entry only
        match spans.last_mut() {
            Some((t, a, b)) if t == tensor => {
                *a = (*a).min(*start);
                *b = (*b).max(*end);
            }
            _ => spans.push((*tensor, *start, *end)),
        }
        place.push((spans.len() - 1) as u32);
    }
    let table = spans
        .iter()
        .map(|&(t, a, b)| tensor_job(&st.plan.tensors[t], a, b))
        .collect();
    (table, place)
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
    let (tensors, place) = tensor_table(st, &t.segments);
    let segment = |(s, &k): (&SegDef, &u32)| pb::Segment {
        kind: Some(match s {
            SegDef::Literal(b) => pb::segment::Kind::Literal(b.clone()),
            SegDef::Rows {
                tensor,
                start,
                end,
                range_index,
            } => pb::segment::Kind::Rows(pb::TensorRows {
                tensor: None,
                row_start: *start,
                row_end: *end,
                range_index: *range_index,
                stats: st.unit_stats(*tensor).map(|s| s.to_proto()),
                tensor_index: k,
            }),
        }),
    };
    pb::WriteTask {
        output: Some(pb::OutputTarget {
            uri: file_uri,
            offset: t.offset,
            length: t.length,
            sink: Some(sink),
        }),
        segments: t.segments.iter().zip(&place).map(segment).collect(),
        tensors,
    }
}

/// The wire message of tensor `t` for a task over its rows `[start, end)` (its row map cut to
/// those rows): the only place a plan becomes a `TensorJob`.
pub(crate) fn tensor_job(t: &TensorPlan, start: u64, end: u64) -> pb::TensorJob {
    let params = |p: &std::collections::HashMap<String, f64>| pb::ParamMap { values: p.clone() };
    pb::TensorJob {
        name: t.name.clone(),
        shape: t.shape.clone(),
        out_dtype: t.out_dtype.to_proto() as i32,
        method: t.method_name().to_string(),
        params: Some(params(&t.params)),
        inputs: t.inputs.iter().map(|s| source(s, start, end)).collect(),
        model_params: t.model_params.iter().map(|p| params(p)).collect(),
        base_index: t.base.map(|b| b as u32),
        seed: t.seed,
        rng: match t.rng {
            rng::Mode::Mergekit => pb::Rng::Mergekit,
            rng::Mode::Counter => pb::Rng::Counter,
        } as i32,
        work_dtype: t.work_dtype.map_or(0, |d| d.to_proto() as i32),
        compute_dtype: match t.compute {
            Work::F32 => 0,
            Work::BF16 => pb::Dtype::Bf16 as i32,
            Work::F16 => pb::Dtype::F16 as i32,
        },
        row_map: t.row_map.as_ref().map(|m| vocab::for_rows(m, start, end)),
    }
}

/// The wire message of an input, for a task over rows `[start, end)`: a derived input carries
/// the job of the tensor it is computed from, for the same rows.
fn source(s: &InputPlan, start: u64, end: u64) -> pb::TensorSource {
    pb::TensorSource {
        uri: s.uri.to_string(),
        data_offset: s.data_offset,
        dtype: s.dtype.to_proto() as i32,
        shape: s.shape.clone(),
        model: s.model.to_string(),
        model_key: s.model_key,
        tensor: s.tensor.clone(),
        rng_offset: s.rng_offset,
        lora: s.lora.as_deref().map(|l| Box::new(lora(l))),
        derived: s.derived.as_ref().map(|d| tensor_job(&d.0, start, end)),
    }
}

/// The wire message of an input's LoRA adapter.
fn lora(l: &LoraPlan) -> pb::LoraDelta {
    let part = |t: &AdapterTensor| pb::TensorSource {
        uri: t.uri.to_string(),
        data_offset: t.offset,
        dtype: t.dtype.to_proto() as i32,
        shape: t.shape.clone(),
        model: l.adapter.to_string(),
        tensor: t.name.clone(),
        ..Default::default()
    };
    pb::LoraDelta {
        a: l.delta.as_ref().map(|d| Box::new(part(&d.a))),
        b: l.delta.as_ref().map(|d| Box::new(part(&d.b))),
        scaling: l.delta.as_ref().map_or(1.0, |d| d.scaling),
        transpose: l.delta.as_ref().is_some_and(|d| d.transpose),
        merged_dtype: l.merged.to_proto() as i32,
        adapter: l.adapter.to_string(),
        round_delta: l.delta.as_ref().is_some_and(|d| d.embedding),
    }
}

#[cfg(test)]
mod tests {
    use shardmerge_worker::format::dtype::DType;
    use shardmerge_worker::kernels::{rng, round::Work};

    use super::tensor_job;
    use crate::plan::test_tensor;

    /// The worker's view of the wire message is the planner's view of the plan.
    #[test]
    fn the_worker_decodes_what_the_planner_planned() {
        let mut t = test_tensor("model.layers.0.w", "dare_ties", &[3, 5], 3);
        t.inputs[1].dtype = DType::BF16;
        t.inputs[2].rng_offset = 42;
        t.inputs[2].model_key = 7;
        t.base = Some(0);
        t.seed = 9;
        t.rng = rng::Mode::Counter;
        t.work_dtype = Some(DType::BF16);
        t.compute = Work::F16;
        std::sync::Arc::make_mut(&mut t.model_params[1]).insert("weight".into(), 0.5);
        let job = tensor_job(&t, 0, 3);
        let (a, b) = (
            t.ctx().expect("plan ctx"),
            shardmerge_worker::tensor::tensor_ctx(&job).expect("wire ctx"),
        );
        assert_eq!(
            (a.name, a.shape, a.rows, a.row_len),
            (b.name, b.shape, b.rows, b.row_len)
        );
        assert_eq!(a.params, b.params);
        assert_eq!(a.model_params, b.model_params);
        assert_eq!(
            (a.base, &a.model_keys, a.tensor_key),
            (b.base, &b.model_keys, b.tensor_key)
        );
        assert_eq!(
            (a.seed, a.rng, &a.rng_offsets),
            (b.seed, b.rng, &b.rng_offsets)
        );
        assert_eq!((a.work_bf16, a.work), (b.work_bf16, b.work));
        assert_eq!(job.method, "dare_ties");
        assert_eq!(job.inputs[1].dtype, DType::BF16.to_proto() as i32);
    }

    /// A derived input (a streamed stage) carries the earlier stage's job for the same rows.
    #[test]
    fn a_derived_input_carries_its_stage_job_for_the_task_rows() {
        let inner = test_tensor("model.layers.0.w", "ties", &[8, 4], 2);
        let mut t = test_tensor("model.layers.0.w", "linear", &[8, 4], 2);
        t.inputs[1].derived = Some(crate::plan::Derived(std::sync::Arc::new(inner)));
        let job = tensor_job(&t, 2, 5);
        assert!(job.inputs[0].derived.is_none());
        let d = job.inputs[1].derived.as_ref().expect("derived");
        assert_eq!((d.method.as_str(), d.inputs.len()), ("ties", 2));
        assert_eq!(d.shape, vec![8, 4]);
    }
}
