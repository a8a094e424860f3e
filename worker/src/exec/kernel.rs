//! Running a tensor's kernel over input rows already read, off the async runtime: the rows of
//! a write segment (apply, or the whole tensor) and a statistics pass's partial statistics.

use shardmerge_proto as pb;

use super::scratch::sized;
use super::{fatal, method_of, tensor_ctx, TaskError};
use crate::kernels::{self, RowRange, Stats};

/// Runs `job`'s kernel over rows `r` of its `inputs` (read already) into `out` (resized);
/// gives the inputs back with the result.
pub(super) async fn kernel_rows(
    job: &pb::TensorJob,
    r: &pb::TensorRows,
    inputs: Vec<Vec<f32>>,
    out: Vec<f32>,
) -> (Result<Vec<f32>, TaskError>, Vec<Vec<f32>>) {
    let job = job.clone();
    let stats = r.stats.clone();
    let (rs, re, ri) = (r.row_start, r.row_end, r.range_index);
    let done = tokio::task::spawn_blocking(move || {
        let run = || -> Result<Vec<f32>, TaskError> {
            let ctx = tensor_ctx(&job)?;
            let m = method_of(&job)?;
            let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let n = ((re - rs) as usize) * ctx.row_len;
            // kernels write every output element (their tests run on NaN-filled buffers)
            let mut out = sized(out, n);
            let whole = rs == 0 && re == ctx.rows;
            let res = if whole {
                kernels::run_whole(m, &ctx, &refs, &mut out)
            } else {
                let state = stats.as_ref().map(Stats::from_proto).unwrap_or_default();
                let rows = RowRange {
                    start: rs,
                    end: re,
                    index: ri,
                };
                m.apply(&ctx, &state, rows, &refs, &mut out)
            };
            res.map_err(|e| fatal(format!("tensor {}: {}: {e}", job.name, job.method)))?;
            Ok(out)
        };
        (run(), inputs)
    })
    .await;
    match done {
        Ok(r) => r,
        Err(e) => (Err(fatal(format!("kernel panicked: {e}"))), Vec::new()),
    }
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
