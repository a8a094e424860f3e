//! Running a tensor's kernel over input rows already read, off the async runtime: the rows of
//! a write segment (apply, or the whole tensor) and a statistics pass's partial statistics.

use shardmerge_proto as pb;

use super::scratch::sized;
use super::{fatal, method_of, tensor_ctx, TaskError};
use crate::kernels::{self, RowRange, Stats};

/// Runs `job`'s kernel over rows `r` of its `inputs` (read already) into `out` (resized);
/// gives the inputs back with the result. With `overwrite` a kernel may use the inputs as
/// working memory (they are not read again): the result then says whether they were all
/// finite (else None).
pub(super) async fn kernel_rows(
    job: &pb::TensorJob,
    r: &pb::TensorRows,
    inputs: Vec<Vec<f32>>,
    out: Vec<f32>,
    overwrite: bool,
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
            compute(job, r.stats.as_ref(), rows, &mut inputs, out, overwrite)
        }))
        .unwrap_or_else(|_| Err(fatal("kernel panicked")));
        return (res, inputs);
    }
    let (job, stats) = (job.clone(), r.stats.clone());
    let done = tokio::task::spawn_blocking(move || {
        let mut inputs = inputs;
        let res = compute(&job, stats.as_ref(), rows, &mut inputs, out, overwrite);
        (res, inputs)
    })
    .await;
    match done {
        Ok(r) => r,
        Err(e) => (Err(fatal(format!("kernel panicked: {e}"))), Vec::new()),
    }
}

/// Input values up to which a segment's kernel runs on the task's own thread: handing it to
/// the blocking pool (a wake-up there and one back) costs more than computing that little.
const INLINE_KERNEL: usize = 1 << 16;

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
/// the inputs back with the partial statistics.
pub(super) async fn partial_rows(
    job: &pb::TensorJob,
    r: &pb::TensorRows,
    pass: u32,
    inputs: Vec<Vec<f32>>,
) -> (Result<Stats, TaskError>, Vec<Vec<f32>>) {
    let state = r.stats.as_ref().map(Stats::from_proto).unwrap_or_default();
    let job = job.clone();
    let (rs, re, ri) = (r.row_start, r.row_end, r.range_index);
    let done = tokio::task::spawn_blocking(move || {
        let run = || -> Result<Stats, TaskError> {
            let ctx = tensor_ctx(&job)?;
            let m = method_of(&job)?;
            let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let rows = RowRange {
                start: rs,
                end: re,
                index: ri,
            };
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
