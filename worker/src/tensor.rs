//! The kernel's view of a tensor: code both the coordinator's planner and the executor need,
//! below both (it knows nothing of storage or of tasks).

use shardmerge_proto as pb;

use crate::kernels::{rng, TensorCtx};

/// The 2-D view of a shape: (rows, row length). A 1-D tensor is one row.
pub fn view2d(shape: &[u64]) -> (u64, u64) {
    match shape.len() {
        0 => (1, 1),
        1 => (1, shape[0]),
        _ => (shape[0], shape[1..].iter().product()),
    }
}

/// Builds the kernel's view of a tensor job.
pub fn tensor_ctx(job: &pb::TensorJob) -> Result<TensorCtx<'_>, String> {
    static EMPTY: std::sync::OnceLock<std::collections::HashMap<String, f64>> =
        std::sync::OnceLock::new();
    let empty = EMPTY.get_or_init(Default::default);
    let (rows, row_len) = view2d(&job.shape);
    let row_len =
        usize::try_from(row_len).map_err(|_| format!("tensor {}: row too large", job.name))?;
    let params = job.params.as_ref().map(|p| &p.values).unwrap_or(empty);
    let model_params = (0..job.inputs.len())
        .map(|i| job.model_params.get(i).map(|p| &p.values).unwrap_or(empty))
        .collect();
    Ok(TensorCtx {
        name: &job.name,
        shape: &job.shape,
        rows,
        row_len,
        params,
        model_params,
        base: job.base_index.map(|b| b as usize),
        model_keys: job.inputs.iter().map(|s| s.model_key).collect(),
        tensor_key: rng::key_of(&job.name),
        seed: job.seed,
        rng: match pb::Rng::try_from(job.rng) {
            Ok(pb::Rng::Mergekit) => rng::Mode::Mergekit,
            Ok(pb::Rng::Counter) => rng::Mode::Counter,
            Err(_) => {
                return Err(format!(
                    "tensor {}: unknown rng kind {} (coordinator/worker version mismatch?)",
                    job.name, job.rng
                ))
            }
        },
        rng_offsets: job.inputs.iter().map(|s| s.rng_offset).collect(),
        work_bf16: job.work_dtype == pb::Dtype::Bf16 as i32,
        work: match pb::Dtype::try_from(job.compute_dtype) {
            Ok(pb::Dtype::Bf16) => crate::kernels::round::Work::BF16,
            Ok(pb::Dtype::F16) => crate::kernels::round::Work::F16,
            _ => crate::kernels::round::Work::F32,
        },
    })
}
