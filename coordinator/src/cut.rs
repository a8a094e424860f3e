//! Cutting: each output file becomes contiguous byte-range tasks of whole rows. A tensor cut
//! across several pieces whose method needs whole-tensor statistics becomes a *statistics unit*:
//! its pieces run the statistics passes first, and the tasks writing them wait for it.

use crate::error::{Error, Result};
use crate::plan::{Plan, TensorPlan};
use crate::size::human;
use shardmerge_worker::exec::{reads_as_stored, whole_as_stored};
use shardmerge_worker::kernels::NOTED_SHARE;
use shardmerge_worker::tensor::view2d;

#[derive(Clone, Debug, PartialEq)]
pub enum SegDef {
    Literal(Vec<u8>),
    Rows {
        tensor: usize,
        start: u64,
        end: u64,
        range_index: u32,
    },
}

#[derive(Clone, Debug)]
pub struct TaskDef {
    pub file: usize,
    pub part_index: u32,
    pub offset: u64,
    pub length: u64,
    pub segments: Vec<SegDef>,
    /// Statistics units this task waits for.
    pub deps: Vec<usize>,
}

/// A tensor cut into several row ranges whose method needs statistics passes.
#[derive(Clone, Debug)]
pub struct StatsUnit {
    pub tensor: usize,
    pub ranges: Vec<(u64, u64)>,
    pub passes: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Cut {
    pub tasks: Vec<TaskDef>,
    pub units: Vec<StatsUnit>,
}

#[derive(Clone, Copy, Debug)]
pub struct CutOptions {
    /// Target output bytes per task.
    pub task_size: u64,
    /// Memory one worker slot may use.
    pub slot_memory: u64,
    /// Smallest part the output store accepts (all but a file's last task reach it).
    pub min_part: u64,
}

/// Memory a task needs per output element of a tensor: the output bytes, f32 output, and per
/// input its f32 copy and its raw bytes (every input is read at once, each in pieces of at
/// most a few MiB that the slot keeps for the next task: a segment's rows of every input are
/// held raw and decoded together, up to that size; kernels work in small chunks).
/// A derived input (an earlier stage streamed) also holds that stage's working set for its
/// rows. A tensor whose rows the worker computes a block at a time from its inputs as stored
/// ([`reads_as_stored`]) needs the output bytes and each input's bytes as read, except a local
/// file's, which the worker reads a block at a time too (the blocks' buffers are small and
/// fixed).
pub fn bytes_per_element(t: &TensorPlan) -> u64 {
    let (_, out_row) = view2d(&t.shape);
    let stored = t.inputs.iter().map(|s| {
        let plain = s.lora.is_none() && s.derived.is_none();
        (s.dtype.size(), view2d(&s.shape).1, plain)
    });
    if reads_as_stored(
        t.passes,
        t.out_dtype.is_float(),
        out_row,
        t.row_map.is_some(),
        stored,
    ) {
        let held = t.inputs.iter().filter(|s| !is_local_file(&s.uri));
        let inputs: u64 = held.map(|s| s.dtype.size() as u64).sum();
        return t.out_dtype.size() as u64 + inputs;
    }
    as_f32(t)
}

/// Bytes an element of tensor `t` takes in a task that computes it whole: less than
/// [`bytes_per_element`] for a statistics tensor whose kernel takes its inputs as stored
/// ([`whole_as_stored`]), which holds its f32 output, the one walk's working space (the
/// elements it notes, at most one in [`NOTED_SHARE`]: a position, each input's 2 bytes and a
/// mix) and the inputs that are not local files (a local one is mapped: page cache, not the
/// slot's memory).
pub fn whole_bytes_per_element(t: &TensorPlan) -> u64 {
    let (_, out_row) = view2d(&t.shape);
    let stored = t.inputs.iter().map(|s| {
        let plain = s.lora.is_none() && s.derived.is_none();
        (s.dtype, view2d(&s.shape).1, plain)
    });
    let row_map = t.row_map.is_some();
    let takes = t.passes > 0
        && t.ctx()
            .is_ok_and(|ctx| whole_as_stored(t.method, &ctx, out_row, row_map, stored));
    if !takes {
        return bytes_per_element(t);
    }
    let noted = (8 + 2 * t.inputs.len() as u64).div_ceil(NOTED_SHARE as u64);
    let held = t.inputs.iter().filter(|s| !is_local_file(&s.uri));
    4 + noted + held.map(|s| s.dtype.size() as u64).sum::<u64>()
}

/// [`bytes_per_element`] of the general path, every input raw and as f32. A derived input's
/// stage is computed that way too, whatever its method (exec/derive.rs), so its working set
/// is this, not the blocked rows' figure.
fn as_f32(t: &TensorPlan) -> u64 {
    let inputs: u64 = t
        .inputs
        .iter()
        .map(|s| 4 + s.dtype.size() as u64 + s.derived.as_ref().map_or(0, |d| as_f32(&d.0)))
        .sum();
    t.out_dtype.size() as u64 + 4 + inputs
}

/// Whether an input's URI names a file of the worker's filesystem (a path, or `file://`),
/// which local storage reads a block at a time ([`Storage::positioned`]); an object store's
/// (`s3://`) or the Hub's rows are held whole for the task.
///
/// [`Storage::positioned`]: shardmerge_worker::storage::Storage::positioned
fn is_local_file(uri: &str) -> bool {
    uri.starts_with("file://") || !uri.contains("://")
}

/// Refuses a plan one of whose tensors cannot have a task within `slot_memory`: a task holds
/// its segment's working set in half the slot, and an input's LoRA factors that a task needs
/// whole whatever its rows (a Linear weight's `lora_A`, an embedding's `lora_embedding_B`)
/// come out of that half; cutting the tensor finer cannot make them smaller.
pub fn check_fits(plan: &Plan, slot_memory: u64) -> Result<()> {
    let half = (slot_memory / 2).max(1);
    for t in &plan.tensors {
        let (fixed, per_row) = t.lora_memory();
        if fixed == 0 {
            continue;
        }
        let (_, row_bytes) = t.rows();
        let row_elems = row_bytes / t.out_dtype.size() as u64;
        let need = fixed + bytes_per_element(t) * row_elems.max(1) + per_row;
        if need > half {
            let adapters: Vec<&str> = t
                .inputs
                .iter()
                .filter_map(|s| s.lora.as_ref().map(|l| &*l.adapter))
                .collect();
            return Err(Error::Exhausted {
                limit: "--memory-limit",
                reason: format!(
                    "tensor {}: the LoRA factors of {} that every task of it needs whole take \
                     about {} as read and as f32, and one row's working set {} more, past the \
                     half of a worker slot ({} of {}) a task's rows may use; give each slot at \
                     least {} (a larger --memory-limit, or fewer --workers)",
                    t.name,
                    adapters.join(", "),
                    human(fixed),
                    human(need - fixed),
                    human(half),
                    human(slot_memory),
                    human(2 * need),
                ),
            });
        }
    }
    Ok(())
}

/// The stage (its name) of a tensor that must be computed whole in the task that uses it (a
/// statistics method of a streamed stage) but does not fit a slot whole, with what it needs.
pub fn unfit_stage(plan: &Plan, o: &CutOptions) -> Option<(String, String)> {
    let (half, target) = half_and_target(o);
    plan.tensors.iter().filter(|t| t.derived_whole()).find_map(|t| {
        let (whole, _) = fits_whole(t, seg_cap_rows(t, half), target, o);
        let (rows, row_bytes) = t.rows();
        let need = rows * (row_bytes / t.out_dtype.size() as u64) * bytes_per_element(t);
        let stage = t.inputs.iter().find(|s| s.derived.as_ref().is_some_and(|d| d.0.needs_whole()))?;
        (!whole).then(|| {
            (
                stage.model.to_string(),
                format!(
                    "tensor {} reads tensor {} of stage `{}`, whose method needs all of its rows at once, and computing both in one task takes about {} bytes, more than a worker slot's {} (--memory-limit / --workers)",
                    t.name, stage.tensor, stage.model, need.saturating_add(rows * row_bytes), o.slot_memory
                ),
            )
        })
    })
}

/// Refuses a plan with a streamed stage's tensor that cannot be computed whole in a slot
/// (see [`unfit_stage`]): such a stage is written as an intermediate instead.
pub fn check_whole(plan: &Plan, o: &CutOptions) -> Result<()> {
    match unfit_stage(plan, o) {
        None => Ok(()),
        Some((stage, why)) => Err(Error::Exhausted {
            limit: "--memory-limit",
            reason: format!("stage `{stage}` cannot be streamed: {why}; write it as an intermediate (shardmerge run and submit do that themselves)"),
        }),
    }
}

/// Half the slot (a task's output buffer, or one segment's working set) and the target task
/// size.
fn half_and_target(o: &CutOptions) -> (u64, u64) {
    let half = (o.slot_memory / 2).max(1);
    (
        half,
        o.task_size.max(o.min_part).min(half.max(o.min_part)).max(1),
    )
}

/// The most rows of `t` one segment holds in `half` a slot.
fn seg_cap_rows(t: &TensorPlan, half: u64) -> u64 {
    let (_, row_bytes) = t.rows();
    let row_elems = row_bytes / t.out_dtype.size() as u64;
    // (an input's LoRA factors: a part whatever the rows, and a part per row)
    let (lora_fixed, lora_row) = t.lora_memory();
    (half.saturating_sub(lora_fixed) / (bytes_per_element(t) * row_elems.max(1) + lora_row)).max(1)
}

pub fn cut(plan: &Plan, o: &CutOptions) -> Cut {
    let mut out = Cut::default();
    // Half the slot for the task's output buffer, half for one segment's f32 working set.
    let (half, target) = half_and_target(o);
    let mut pieces: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); plan.tensors.len()];
    for (fi, f) in plan.files.iter().enumerate() {
        let mut cur = TaskDef {
            file: fi,
            part_index: 0,
            offset: 0,
            length: f.layout.header.len() as u64,
            segments: vec![SegDef::Literal(f.layout.header.clone())],
            deps: Vec::new(),
        };
        let mut file_tasks: Vec<TaskDef> = Vec::new();
        let mut meta = 0;
        // the last tensor was kept whole in a task of its own: the next rows start a new one
        let mut after_alone = false;
        for &ti in &f.tensors {
            let t = &plan.tensors[ti];
            let (rows, row_bytes) = t.rows();
            let seg_cap_rows = seg_cap_rows(t, half);
            // the tensors a task describes: bounded too, not only its bytes
            let t_meta = 1 + t.inputs.len();
            if meta > 0 && meta + t_meta > MAX_TASK_META && cur.length >= o.min_part {
                next_task(&mut cur, &mut file_tasks);
                meta = 0;
            }
            meta += t_meta;
            // A tensor with statistics passes whose rows all fit the slot stays whole, in one
            // task however large: its passes then run on the rows read once. One whose working
            // set fits half the slot may share its task; a larger one whose working set and
            // output fit the slot (with a task's worth to spare) has a task of its own.
            let (whole, alone) = keep_whole(t, seg_cap_rows, target, o);
            // (after what the task holds already, if both together would not fit the slot)
            let mut flush =
                after_alone || alone || (whole && cur.length + rows * row_bytes > half.max(target));
            after_alone = alone;
            let mut r = 0;
            while r < rows {
                if cur.length >= target || (flush && cur.length >= o.min_part.max(1)) {
                    flush = false;
                    next_task(&mut cur, &mut file_tasks);
                    meta = t_meta;
                }
                let space = target - cur.length;
                let fit = space.div_ceil(row_bytes.max(1)).max(1);
                let take = if whole {
                    rows
                } else {
                    fit.min(seg_cap_rows).min(rows - r)
                };
                cur.segments.push(SegDef::Rows {
                    tensor: ti,
                    start: r,
                    end: r + take,
                    range_index: 0,
                });
                pieces[ti].push((r, r + take, 0));
                cur.length += take * row_bytes;
                r += take;
            }
        }
        file_tasks.push(cur);
        for (k, t) in file_tasks.iter_mut().enumerate() {
            t.part_index = k as u32;
        }
        out.tasks.extend(file_tasks);
    }
    number_pieces(plan, &pieces, &mut out);
    out
}

/// The cut of `plan` laid out as `like`'s: the same tasks (files, byte ranges, segments' rows),
/// its own headers, and statistics units of its own for the tensors its method needs them for.
/// `like` is another point of a grid (another method over the same inputs and output layout)
/// whose cut is at least as fine: computing `plan` over `like`'s rows needs no more memory per
/// element than `like` itself, wherever `like` keeps a tensor whole and wherever it cuts one.
/// The points then read the same rows (`job/group.rs`) and read them once. `None` where the
/// layouts differ or `plan` needs more than `like` is cut for: it keeps its own cut.
pub fn cut_like(plan: &Plan, like: &Plan, o: &CutOptions) -> Option<Cut> {
    if !fits_like(plan, like) {
        return None;
    }
    let mut out = Cut::default();
    let mut pieces: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); plan.tensors.len()];
    for t in cut(like, o).tasks {
        let header = &plan.files[t.file].layout.header;
        let segments = t.segments.into_iter().map(|s| match s {
            SegDef::Literal(_) => SegDef::Literal(header.clone()),
            SegDef::Rows {
                tensor, start, end, ..
            } => {
                pieces[tensor].push((start, end, 0));
                SegDef::Rows {
                    tensor,
                    start,
                    end,
                    range_index: 0,
                }
            }
        });
        out.tasks.push(TaskDef {
            segments: segments.collect(),
            deps: Vec::new(),
            ..t
        });
    }
    number_pieces(plan, &pieces, &mut out);
    Some(out)
}

/// Whether `plan` can be computed over `like`'s cut ([`cut_like`]): the same files (headers of
/// the same length, the same tensors), each tensor of the same shape, output type and inputs
/// (no streamed stage), needing statistics only where `like` does, and no more memory per
/// element, cut or whole.
pub fn fits_like(plan: &Plan, like: &Plan) -> bool {
    let files =
        plan.files.len() == like.files.len()
            && plan.files.iter().zip(&like.files).all(|(a, b)| {
                a.layout.header.len() == b.layout.header.len() && a.tensors == b.tensors
            });
    let tensors = plan.tensors.len() == like.tensors.len()
        && plan.tensors.iter().zip(&like.tensors).all(|(a, b)| {
            a.reads_as(b)
                && a.inputs.iter().all(|s| s.derived.is_none())
                && (a.passes == 0 || b.passes > 0)
                && bytes_per_element(a) <= bytes_per_element(b)
                && whole_bytes_per_element(a) <= whole_bytes_per_element(b)
        });
    files && tensors
}

/// Whether tensor `t` stays whole in one task, and whether that task is its own: a tensor
/// with statistics passes whose rows fit a segment (`seg_cap_rows`), or whose working set and
/// output fit the slot.
fn keep_whole(t: &TensorPlan, seg_cap_rows: u64, target: u64, o: &CutOptions) -> (bool, bool) {
    let (whole, alone) = fits_whole(t, seg_cap_rows, target, o);
    // one that reads a streamed stage's statistics tensor is never cut (`check_whole` refuses
    // a plan where it does not fit)
    if t.derived_whole() && !whole {
        return (true, true);
    }
    (whole, alone)
}

/// [`keep_whole`] within the slot: whether `t` fits whole in a segment, or alone in a task.
fn fits_whole(t: &TensorPlan, seg_cap_rows: u64, target: u64, o: &CutOptions) -> (bool, bool) {
    let (rows, row_bytes) = t.rows();
    let row_elems = row_bytes / t.out_dtype.size() as u64;
    let bpe = whole_bytes_per_element(t);
    let work = rows * row_elems * bpe;
    // (seg_cap_rows is the general path's: one computed from its inputs as stored takes less)
    let shares = rows <= seg_cap_rows || (bpe < bytes_per_element(t) && work <= o.slot_memory / 2);
    let alone = t.needs_whole() && !shares && whole_fits(work, rows * row_bytes, target, o);
    (t.needs_whole() && (shares || alone), alone)
}

/// Whether a tensor kept whole in a task of its own fits the slot: its working set `work`, its
/// output `out`, and what may share the task when the store's smallest part keeps it from
/// being closed (less than a task's output before it, and up to one after it).
fn whole_fits(work: u64, out: u64, target: u64, o: &CutOptions) -> bool {
    work.saturating_add(out).saturating_add(2 * target) <= o.slot_memory
}

/// How much a task may describe: the tensors it writes count one each plus one per input. A
/// worker holds a task's description while it runs, so 200,000 tiny tensors in one task took
/// hundreds of megabytes whatever `--memory-limit` said; at about 500 bytes a unit, this bounds a
/// task's description to a few megabytes. (An S3 task still reaches the smallest part size.)
pub const MAX_TASK_META: usize = 4096;

/// Ends task `cur` and starts the next one where it ends.
fn next_task(cur: &mut TaskDef, file_tasks: &mut Vec<TaskDef>) {
    let next = TaskDef {
        file: cur.file,
        part_index: 0,
        offset: cur.offset + cur.length,
        length: 0,
        segments: Vec::new(),
        deps: Vec::new(),
    };
    file_tasks.push(std::mem::replace(cur, next));
}

/// Numbers the pieces of each tensor, makes statistics units of cut tensors that need them,
/// and makes each task depend on the units of the tensors it writes.
fn number_pieces(plan: &Plan, pieces: &[Vec<(u64, u64, usize)>], out: &mut Cut) {
    let mut unit_of = vec![None; plan.tensors.len()];
    for (ti, ps) in pieces.iter().enumerate() {
        if ps.len() <= 1 {
            continue;
        }
        let passes = plan.tensors[ti].passes;
        if passes > 0 {
            unit_of[ti] = Some(out.units.len());
            out.units.push(StatsUnit {
                tensor: ti,
                ranges: ps.iter().map(|&(a, b, _)| (a, b)).collect(),
                passes,
            });
        }
    }
    let mut next_index = vec![0u32; plan.tensors.len()];
    for task in &mut out.tasks {
        for s in &mut task.segments {
            if let SegDef::Rows {
                tensor,
                range_index,
                ..
            } = s
            {
                *range_index = next_index[*tensor];
                next_index[*tensor] += 1;
                if let Some(u) = unit_of[*tensor] {
                    if !task.deps.contains(&u) {
                        task.deps.push(u);
                    }
                }
            }
        }
    }
}
