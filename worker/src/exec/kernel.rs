//! Running a tensor's kernel over input rows already read, off the async runtime: the rows of
//! a write segment (apply, or the whole tensor) and a statistics pass's partial statistics.

use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;

use shardmerge_proto as pb;

use super::read::StoredIn;
use super::scratch::sized;
use super::{fatal, method_of, tensor_ctx, ReportTap, TaskError};
use crate::format::dtype::DType;
use crate::kernels::{self, RowRange, Stats};

/// Runs `job`'s kernel over rows `r` of its `inputs` (read already) into `out` (resized);
/// gives the inputs back with the result. With `overwrite` a kernel may use the inputs as
/// working memory (they are not read again): the result then says whether they were all
/// finite (else None). The inputs are handed to `tap` first, if any.
pub(super) async fn kernel_rows(
    job: &pb::TensorJob,
    r: &pb::TensorRows,
    inputs: Vec<Vec<f32>>,
    out: Vec<f32>,
    (overwrite, tap): (bool, Option<Arc<ReportTap>>),
) -> (Result<(Vec<f32>, Option<bool>), TaskError>, Vec<Vec<f32>>) {
    let rows = RowRange {
        start: r.row_start,
        end: r.row_end,
        index: r.range_index,
    };
    let values: usize = inputs.iter().map(Vec::len).sum();
    if values <= INLINE_KERNEL {
        let mut inputs = inputs;
        // (a panic is an error of the task, as from the blocking pool)
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tap_decoded(tap.as_deref(), job, rows, &inputs);
            compute(job, r.stats.as_ref(), rows, &mut inputs, out, overwrite)
        }))
        .unwrap_or_else(|_| Err(fatal("kernel panicked")));
        return (res, inputs);
    }
    let (job, stats) = (job.clone(), r.stats.clone());
    let done = tokio::task::spawn_blocking(move || {
        let mut inputs = inputs;
        tap_decoded(tap.as_deref(), &job, rows, &inputs);
        let res = compute(&job, stats.as_ref(), rows, &mut inputs, out, overwrite);
        (res, inputs)
    })
    .await;
    match done {
        Ok(r) => r,
        Err(e) => (Err(fatal(format!("kernel panicked: {e}"))), Vec::new()),
    }
}

/// Runs `job`'s kernel over the whole tensor from its `inputs` as stored (in dtypes `dts`,
/// [`super::read::stored_dtypes`]) into `out` (resized); gives the inputs back with the result.
/// The inputs are handed to `tap` first, if any.
pub(super) async fn kernel_stored(
    job: &pb::TensorJob,
    dts: &[DType],
    inputs: Vec<StoredIn>,
    (out, tap): (Vec<f32>, Option<Arc<ReportTap>>),
) -> (Result<Vec<f32>, TaskError>, Vec<StoredIn>) {
    let run = move |job: &pb::TensorJob, dts: &[DType], inputs: &[StoredIn], out: Vec<f32>| {
        let ctx = tensor_ctx(job)?;
        if let Some(t) = &tap {
            let raw: Vec<&[u8]> = inputs.iter().map(|b| &b[..]).collect();
            t.stored(job, (0, ctx.rows), &raw, &release_behind(inputs));
        }
        let m = method_of(job)?;
        let views = dts
            .iter()
            .zip(inputs)
            .map(|(&dt, b)| super::stored_view(dt, b))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| fatal(format!("tensor {}: an input is not 16-bit", job.name)))?;
        let mut out = sized(out, (ctx.rows as usize) * ctx.row_len);
        m.whole_stored(&ctx, &views, &mut out, &release_behind(inputs))
            .map_err(|e| fatal(format!("tensor {}: {}: {e}", job.name, job.method)))?;
        Ok(out)
    };
    let bytes: usize = inputs.iter().map(|b| b.len()).sum();
    if bytes / 2 <= INLINE_KERNEL {
        let res =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(job, dts, &inputs, out)))
                .unwrap_or_else(|_| Err(fatal("kernel panicked")));
        return (res, inputs);
    }
    let (job, dts) = (job.clone(), dts.to_vec());
    let done = tokio::task::spawn_blocking(move || {
        let res = run(&job, &dts, &inputs, out);
        (res, inputs)
    })
    .await;
    match done {
        Ok(r) => r,
        Err(e) => (Err(fatal(format!("kernel panicked: {e}"))), Vec::new()),
    }
}

/// The fewest elements whose mapped pages are let go at once (the kernel tells a chunk at a
/// time).
const RELEASE_AT_LEAST: usize = 256 << 10;

/// [`kernels::Method::whole_stored`]'s `let_go` for `inputs` (16-bit values): the pages of the
/// mapped ones are let go behind each walk, so that a tensor's inputs are not all counted in
/// the worker's resident set at once (they are page cache either way).
fn release_behind(inputs: &[StoredIn]) -> impl Fn(Range<usize>) + '_ {
    // elements told but not let go yet: one run of contiguous ranges
    let pending = Cell::new(0..0);
    move |r: Range<usize>| {
        let p = pending.take();
        let run = if p.end == r.start && !p.is_empty() {
            p.start..r.end
        } else {
            r
        };
        if run.len() < RELEASE_AT_LEAST {
            pending.set(run);
            return;
        }
        for x in inputs {
            if let StoredIn::Mapped(m, _) = x {
                m.release(2 * run.start..2 * run.end);
            }
        }
    }
}

/// Runs the kernels of several points of a sweep over the same rows of the same inputs (read
/// already): point `k` is `points[k]` (its tensor and rows: its own parameters and
/// statistics), computed into `outs[k]` (resized). What the points compute alike is computed
/// once where the method can ([`kernels::Method::apply_points`]), else each point runs alone.
/// Gives the inputs back with the results.
pub(super) async fn kernel_points(
    points: &[(&pb::TensorJob, &pb::TensorRows)],
    inputs: Vec<Vec<f32>>,
    (outs, tap): (Vec<Vec<f32>>, Option<Arc<ReportTap>>),
) -> (Result<Vec<Vec<f32>>, TaskError>, Vec<Vec<f32>>) {
    let values: usize = inputs.iter().map(Vec::len).sum();
    if values <= INLINE_KERNEL {
        let mut inputs = inputs;
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            compute_points(points, &mut inputs, (outs, tap.as_deref()))
        }))
        .unwrap_or_else(|_| Err(fatal("kernel panicked")));
        return (res, inputs);
    }
    let owned: Vec<(pb::TensorJob, pb::TensorRows)> = points
        .iter()
        .map(|(j, r)| ((*j).clone(), (*r).clone()))
        .collect();
    let done = tokio::task::spawn_blocking(move || {
        let mut inputs = inputs;
        let points: Vec<_> = owned.iter().map(|(j, r)| (j, r)).collect();
        let res = compute_points(&points, &mut inputs, (outs, tap.as_deref()));
        (res, inputs)
    })
    .await;
    match done {
        Ok(r) => r,
        Err(e) => (Err(fatal(format!("kernel panicked: {e}"))), Vec::new()),
    }
}

/// [`kernel_points`] on this thread (the inputs handed to `tap` first, if any).
fn compute_points(
    points: &[(&pb::TensorJob, &pb::TensorRows)],
    inputs: &mut [Vec<f32>],
    (outs, tap): (Vec<Vec<f32>>, Option<&ReportTap>),
) -> Result<Vec<Vec<f32>>, TaskError> {
    let mut outs = outs;
    outs.resize_with(points.len(), Vec::new);
    let Some(((job0, r0), rest)) = points.split_first() else {
        return Ok(outs);
    };
    tap_decoded(tap, job0, row_range(r0), inputs);
    // together only when every point runs the same method over the same range
    let alike = rest.iter().all(|(j, r)| {
        (&j.method, r.row_start, r.row_end, r.range_index)
            == (&job0.method, r0.row_start, r0.row_end, r0.range_index)
    });
    if alike && together(points, inputs, &mut outs)? {
        return Ok(outs);
    }
    for ((job, r), out) in points.iter().zip(outs.iter_mut()) {
        let rows = row_range(r);
        let o = std::mem::take(out);
        *out = compute(job, r.stats.as_ref(), rows, inputs, o, false)?.0;
    }
    Ok(outs)
}

/// The points (one method, the same rows) through [`kernels::Method::apply_points`]; false
/// when the method has no such path for them.
fn together(
    points: &[(&pb::TensorJob, &pb::TensorRows)],
    inputs: &[Vec<f32>],
    outs: &mut [Vec<f32>],
) -> Result<bool, TaskError> {
    let (job0, r0) = points[0];
    let named =
        |e: kernels::KernelError| fatal(format!("tensor {}: {}: {e}", job0.name, job0.method));
    {
        let m = method_of(job0)?;
        let ctxs = points
            .iter()
            .map(|(j, _)| tensor_ctx(j))
            .collect::<Result<Vec<_>, _>>()?;
        let rows = row_range(r0);
        let n = ((rows.end - rows.start) as usize) * ctxs[0].row_len;
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        // a whole tensor's statistics come from its own passes, as in `compute`
        let whole = rows.start == 0 && rows.end == ctxs[0].rows;
        let mut states = Vec::with_capacity(points.len());
        for (ctx, (_, r)) in ctxs.iter().zip(points) {
            states.push(if whole {
                kernels::run_passes(m, ctx, |pass, st| {
                    Ok(vec![m.partial(ctx, pass, st, rows, &refs)?])
                })
                .map_err(named)?
            } else {
                r.stats.as_ref().map(Stats::from_proto).unwrap_or_default()
            });
        }
        for o in outs.iter_mut() {
            // kernels write every output element (their tests run on NaN-filled buffers)
            *o = sized(std::mem::take(o), n);
        }
        let mut muts: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
        match m.apply_points(&ctxs, &states, rows, &refs, &mut muts) {
            None => Ok(false),
            Some(r) => r.map(|()| true).map_err(named),
        }
    }
}

fn row_range(r: &pb::TensorRows) -> RowRange {
    RowRange {
        start: r.row_start,
        end: r.row_end,
        index: r.range_index,
    }
}

/// Input values up to which a segment's kernel runs on the task's own thread: handing it to
/// the blocking pool (a wake-up there and one back) costs more than computing that little.
pub(super) const INLINE_KERNEL: usize = 1 << 16;

/// The output rows `rows` of `job` in f32 from its inputs' rows, in `out` (reused), and
/// whether every input was finite when the kernel used the inputs as working memory (only
/// with `overwrite`; see [`kernel_rows`]).
fn compute(
    job: &pb::TensorJob,
    stats: Option<&pb::StatsBlob>,
    rows: RowRange,
    inputs: &mut [Vec<f32>],
    out: Vec<f32>,
    overwrite: bool,
) -> Result<(Vec<f32>, Option<bool>), TaskError> {
    let ctx = tensor_ctx(job)?;
    let m = method_of(job)?;
    let n = ((rows.end - rows.start) as usize) * ctx.row_len;
    // kernels write every output element (their tests run on NaN-filled buffers)
    let mut out = sized(out, n);
    let whole = rows.start == 0 && rows.end == ctx.rows;
    let mut held = None;
    let res = if whole {
        // the inputs are this task's to overwrite: the slot refills them next time
        let mut muts: Vec<&mut [f32]> = inputs.iter_mut().map(Vec::as_mut_slice).collect();
        match overwrite
            .then(|| m.whole_in_place(&ctx, &mut muts, &mut out))
            .flatten()
        {
            Some(r) => r.map(|finite| held = Some(finite)),
            None => {
                let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
                kernels::run_whole(m, &ctx, &refs, &mut out)
            }
        }
    } else {
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let state = stats.map(Stats::from_proto).unwrap_or_default();
        m.apply(&ctx, &state, rows, &refs, &mut out)
    };
    res.map_err(|e| fatal(format!("tensor {}: {}: {e}", job.name, job.method)))?;
    Ok((out, held))
}

/// Runs pass `pass` of `job`'s statistics over rows `r` of its `inputs` (read already); gives
/// the inputs back with the partial statistics. The inputs are handed to `tap` first, if any.
pub(super) async fn partial_rows(
    job: &pb::TensorJob,
    r: &pb::TensorRows,
    pass: u32,
    (inputs, tap): (Vec<Vec<f32>>, Option<Arc<ReportTap>>),
) -> (Result<Stats, TaskError>, Vec<Vec<f32>>) {
    let state = r.stats.as_ref().map(Stats::from_proto).unwrap_or_default();
    let job = job.clone();
    let (rs, re, ri) = (r.row_start, r.row_end, r.range_index);
    let done = tokio::task::spawn_blocking(move || {
        let run = || -> Result<Stats, TaskError> {
            let ctx = tensor_ctx(&job)?;
            let m = method_of(&job)?;
            let rows = RowRange {
                start: rs,
                end: re,
                index: ri,
            };
            tap_decoded(tap.as_deref(), &job, rows, &inputs);
            let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            m.partial(&ctx, pass, &state, rows, &refs)
                .map_err(|e| fatal(format!("tensor {}: {e}", job.name)))
        };
        (run(), inputs)
    })
    .await;
    match done {
        Ok(r) => r,
        Err(e) => (Err(fatal(format!("kernel panicked: {e}"))), Vec::new()),
    }
}

/// Hands rows `rows` of `job`'s decoded inputs to `tap`, if any.
fn tap_decoded(tap: Option<&ReportTap>, job: &pb::TensorJob, rows: RowRange, inputs: &[Vec<f32>]) {
    if let Some(t) = tap {
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        t.decoded(job, (rows.start, rows.end), &refs);
    }
}
