//! A derived input (`TensorSource::derived`, an earlier stage of a multi-stage recipe streamed
//! into a later one): its rows are computed in the task from the earlier stage's tensor job,
//! through the same reads and kernels as any tensor, and rounded to that stage's output dtype
//! exactly as writing its checkpoint and reading it back would (encoded, then decoded).

use shardmerge_proto as pb;

use super::kernel::kernel_rows;
use super::scratch::{emptied, sized};
use super::segment::non_finite;
use super::{fatal, method_of, tensor_ctx, view2d, Executor, Io, Scratch, TaskError};
use crate::format::dtype::{self, DType};

/// What computing a derived input's rows did: its values (cropped to the output's row
/// length), the read buffer given back, and the input bytes read from storage for it.
pub(super) struct Derived {
    pub values: Vec<f32>,
    pub piece: Vec<u8>,
    pub bytes_read: u64,
}

impl Executor {
    /// Rows `[start, end)` of the derived input `src` of `job`, computed from `inner` (the
    /// earlier stage's job for that tensor) into the slot's buffers `buf` and `piece`.
    pub(super) async fn derive_input(
        &self,
        job: &pb::TensorJob,
        src: &pb::TensorSource,
        inner: &pb::TensorJob,
        (start, end): (u64, u64),
        (buf, piece): (Vec<f32>, Vec<u8>),
        job_id: &str,
    ) -> Result<Derived, TaskError> {
        let odt = check(job, src, inner, (start, end))?;
        let mut io = Io {
            job: job_id.to_string(),
            ..Default::default()
        };
        // the earlier stage's inputs, in buffers of their own (the slot's hold this task's)
        let mut sub = Scratch::default();
        let inputs =
            Box::pin(self.read_inputs(inner, (start, end), false, &mut io, &mut sub)).await?;
        let rows = pb::TensorRows {
            row_start: start,
            row_end: end,
            ..Default::default()
        };
        let (res, inputs) = kernel_rows(inner, &rows, inputs, buf, (true, None)).await;
        let (values, held) = res?;
        // the bytes its checkpoint would hold
        let mut bytes = sized(piece, values.len() * odt.size());
        if !dtype::encode_finite(odt, &values, &mut bytes) {
            let finite = held.unwrap_or_else(|| inputs.iter().flatten().all(|x| x.is_finite()));
            non_finite(inner, &rows, &values, odt, finite)?;
        }
        drop(inputs);
        let (_, out_row) = view2d(&job.shape);
        let (_, in_row) = view2d(&inner.shape);
        let mut values = emptied(values, ((end - start) * out_row) as usize);
        let row_bytes = (in_row as usize) * odt.size();
        let keep = (out_row as usize) * odt.size();
        for one in bytes.chunks_exact(row_bytes.max(1)) {
            dtype::decode_extend(odt, &one[..keep], &mut values);
        }
        Ok(Derived {
            values,
            piece: bytes,
            bytes_read: io.bytes_read,
        })
    }
}

/// The derived input's dtype (the earlier stage's output dtype), or why the task is wrong: a
/// source that does not describe the tensor computed, rows outside it, or a tensor whose
/// method needs statistics over all of its rows sent for only some of them.
fn check(
    job: &pb::TensorJob,
    src: &pb::TensorSource,
    inner: &pb::TensorJob,
    (start, end): (u64, u64),
) -> Result<DType, TaskError> {
    let plan_error = |why: &str| {
        fatal(format!(
            "tensor {}: its input {} of {} is computed from stage tensor {}, but {why} (plan error)",
            job.name, src.tensor, src.model, inner.name
        ))
    };
    let odt = DType::from_proto(inner.out_dtype)
        .filter(|d| d.is_float())
        .ok_or_else(|| plan_error("that tensor is not floating point"))?;
    if src.dtype != inner.out_dtype || src.shape != inner.shape {
        return Err(plan_error(
            "the input's dtype or shape is not that tensor's",
        ));
    }
    let (rows, in_row) = view2d(&inner.shape);
    let (_, out_row) = view2d(&job.shape);
    if end > rows || start > end || in_row < out_row {
        return Err(plan_error("the rows asked for are not in it"));
    }
    let whole = start == 0 && end == rows;
    if !whole && method_of(inner)?.passes(&tensor_ctx(inner)?) > 0 {
        return Err(plan_error(
            "its method needs statistics over all of its rows and the task has only some",
        ));
    }
    Ok(odt)
}
