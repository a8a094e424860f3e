//! An input with a LoRA adapter (`model+adapter`): its rows as read, plus the adapter's
//! delta for those rows ([`crate::kernels::lora`]). Only the factors the rows need are read:
//! all of lora_A and the rows' part of lora_B, or (an embedding, fan_in_fan_out) the rows'
//! columns of lora_A and all of lora_B.

use std::path::Path;

use shardmerge_proto as pb;

use super::{fatal, view2d, Executor, TaskError};
use crate::format::dtype::{self, DType};
use crate::kernels::lora::{apply, LoraRows};
use crate::kernels::round::Work;
use crate::storage::retry;

impl Executor {
    /// Applies `lora` to `values`, rows `[start, end)` of input `src` of `job` (each cropped to
    /// `row_len` values); returns the adapter bytes it read.
    pub(super) async fn apply_lora(
        &self,
        job: &pb::TensorJob,
        src: &pb::TensorSource,
        lora: &pb::LoraDelta,
        (start, end): (u64, u64),
        values: &mut [f32],
        row_len: usize,
    ) -> Result<u64, TaskError> {
        let what = || {
            format!(
                "tensor {} of {} with adapter {}",
                src.tensor, src.model, lora.adapter
            )
        };
        let merged = match DType::from_proto(lora.merged_dtype) {
            Some(DType::BF16) => Work::BF16,
            Some(DType::F16) => Work::F16,
            Some(DType::F32) => Work::F32,
            _ => return Err(fatal(format!("{}: no merged dtype (plan error)", what()))),
        };
        let (Some(a), Some(b)) = (&lora.a, &lora.b) else {
            // the adapter's own copy of the tensor, in the model's dtype
            values.iter_mut().for_each(|x| *x = merged.r(*x));
            return Ok(0);
        };
        let (a_rows, a_cols) = view2d(&a.shape);
        let (_, rank) = view2d(&b.shape);
        if a_rows != rank || rank == 0 {
            return Err(fatal(format!(
                "{}: lora_A {:?} and lora_B {:?} differ in rank",
                what(),
                a.shape,
                b.shape
            )));
        }
        let (mut read, mut av, mut bv) = (0u64, Vec::new(), Vec::new());
        if lora.transpose {
            for k in 0..rank {
                let row = k * a_cols;
                read += self.read_f32(a, (row + start, row + end), &mut av).await?;
            }
            read += self
                .read_f32(b, (0, b.shape.iter().product()), &mut bv)
                .await?;
        } else {
            read += self.read_f32(a, (0, rank * a_cols), &mut av).await?;
            read += self
                .read_f32(b, (start * rank, end * rank), &mut bv)
                .await?;
        }
        let l = LoraRows {
            a: &av,
            b: &bv,
            rank: rank as usize,
            a_cols: a_cols as usize,
            scaling: lora.scaling as f32,
            transpose: lora.transpose,
            merged,
            round_delta: lora.round_delta,
        };
        apply(values, row_len, &l).map_err(|e| fatal(format!("{} ({}): {e}", what(), job.name)))?;
        Ok(read)
    }

    /// Elements `[from, to)` of tensor `t` (in its row-major order), decoded onto `out`;
    /// returns the bytes read.
    async fn read_f32(
        &self,
        t: &pb::TensorSource,
        (from, to): (u64, u64),
        out: &mut Vec<f32>,
    ) -> Result<u64, TaskError> {
        let dt = DType::from_proto(t.dtype)
            .filter(|d| d.is_float())
            .ok_or_else(|| {
                fatal(format!(
                    "{}: tensor {} is not a float tensor",
                    t.uri, t.tensor
                ))
            })?;
        let es = dt.size() as u64;
        if to > t.shape.iter().product::<u64>() {
            return Err(fatal(format!(
                "{}: elements {from}..{to} of tensor {} {:?} (plan error)",
                t.uri, t.tensor, t.shape
            )));
        }
        let loc = self.resolver.resolve(&t.uri, Path::new("/"))?;
        let range = t.data_offset + from * es..t.data_offset + to * es;
        let bytes = retry(|| loc.store.read_range(&loc.path, range.clone())).await?;
        if bytes.len() as u64 != (to - from) * es {
            return Err(fatal(format!(
                "{}: read {} bytes of tensor {}, expected {}",
                t.uri,
                bytes.len(),
                t.tensor,
                (to - from) * es
            )));
        }
        dtype::decode_extend(dt, &bytes, out);
        Ok(bytes.len() as u64)
    }
}
