//! What a write segment needs besides its rows: the tensor it writes (its own, or its entry in
//! the task's table), and the verdict on an output that is not finite.

use shardmerge_proto as pb;

use super::{fatal, TaskError};
use crate::format::dtype::{self, DType};
use crate::tensor::view2d;

/// The tensor a segment writes: its own, or its entry in the write task's table.
pub(super) fn segment_tensor<'a>(
    r: &'a pb::TensorRows,
    table: &'a [pb::TensorJob],
) -> Result<&'a pb::TensorJob, TaskError> {
    match &r.tensor {
        Some(t) => Ok(t),
        None => table.get(r.tensor_index as usize).ok_or_else(|| {
            fatal(format!(
                "segment names tensor {} of the task's {} (coordinator/worker version mismatch?)",
                r.tensor_index,
                table.len()
            ))
        }),
    }
}

/// An output segment with a NaN or infinity: a job failure naming the tensor when every input
/// value was finite (the merge made it: a parameter or a degenerate input the method cannot
/// handle), else a warning (non-finite values in, as mergekit passes them through).
pub(super) fn non_finite(
    job: &pb::TensorJob,
    r: &pb::TensorRows,
    values: &[f32],
    odt: DType,
    inputs_finite: bool,
) -> Result<(), TaskError> {
    if !inputs_finite {
        tracing::warn!(
            "tensor {}: an input holds NaN or infinity; the output does too",
            job.name
        );
        return Ok(());
    }
    let (_, row_len) = view2d(&job.shape);
    // the first element that is not finite once in the output dtype
    let mut one = [0u8; 4];
    let k = values
        .iter()
        .position(|x| !dtype::encode_finite(odt, std::slice::from_ref(x), &mut one[..odt.size()]))
        .unwrap_or(0);
    let at = r.row_start * row_len + k as u64;
    let v = values.get(k).copied().unwrap_or(f32::NAN);
    Err(fatal(format!(
        "tensor {}: merge method {} turned finite inputs into a non-finite output ({v} as {}, element {at}); check the recipe's parameters for this tensor (weights that cancel, a zero tolerance, values too large for {})",
        job.name,
        job.method,
        odt.name(),
        odt.name()
    )))
}
