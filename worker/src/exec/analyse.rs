//! Statistics of a whole tensor without writing anything (the merge report): every pass of the
//! job's method over the tensor's row ranges, reduced, and the final state returned.

use shardmerge_proto as pb;

use super::scratch::give_back;
use super::{fatal, method_of, tensor_ctx, Executor, Io, Scratch, TaskError};
use crate::kernels::{self, Reduced, RowRange, Stats};

impl Executor {
    /// Runs every statistics pass of `job`'s method over the row ranges `ranges` (in order,
    /// covering the tensor) and returns the final state with the input bytes read. A single
    /// range is read once and every pass runs on that read; more ranges are read again for
    /// each pass, one range in memory at a time.
    pub async fn tensor_stats(
        &self,
        job: &pb::TensorJob,
        ranges: &[(u64, u64)],
        scratch: &mut Scratch,
    ) -> Result<(Stats, u64), TaskError> {
        let mut io = Io::default();
        if let [(start, end)] = ranges {
            let inputs = self
                .read_inputs(job, (*start, *end), false, &mut io, scratch)
                .await?;
            let job = job.clone();
            let (rs, re) = (*start, *end);
            let (res, inputs) = tokio::task::spawn_blocking(move || {
                let run = || -> Result<Stats, TaskError> {
                    let ctx = tensor_ctx(&job)?;
                    let m = method_of(&job)?;
                    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
                    let rows = RowRange {
                        start: rs,
                        end: re,
                        index: 0,
                    };
                    kernels::run_passes(m, &ctx, |pass, st| {
                        Ok(vec![m.partial(&ctx, pass, st, rows, &refs)?])
                    })
                    .map_err(|e| fatal(format!("tensor {}: {e}", job.name)))
                };
                (run(), inputs)
            })
            .await
            .map_err(|e| fatal(format!("kernel panicked: {e}")))?;
            give_back(&mut scratch.inputs, inputs);
            return Ok((res?, io.bytes_read));
        }
        let passes = {
            let ctx = tensor_ctx(job)?;
            method_of(job)?.passes(&ctx)
        };
        let mut state = Stats::default();
        for pass in 0..passes {
            let mut partials = Vec::with_capacity(ranges.len());
            for (k, &(start, end)) in ranges.iter().enumerate() {
                partials.push(
                    self.range_partial(job, pass, &state, (start, end, k as u32), &mut io, scratch)
                        .await?,
                );
            }
            let ctx = tensor_ctx(job)?;
            let m = method_of(job)?;
            match m
                .reduce(&ctx, pass, state, partials)
                .map_err(|e| fatal(format!("tensor {}: {e}", job.name)))?
            {
                Reduced::More(s) => state = s,
                Reduced::Done(s) => return Ok((s, io.bytes_read)),
            }
        }
        Ok((state, io.bytes_read))
    }

    /// One range's partial of `pass`: reads the range and runs the method's `partial`.
    async fn range_partial(
        &self,
        job: &pb::TensorJob,
        pass: u32,
        state: &Stats,
        (start, end, index): (u64, u64, u32),
        io: &mut Io,
        scratch: &mut Scratch,
    ) -> Result<Stats, TaskError> {
        let inputs = self
            .read_inputs(job, (start, end), false, io, scratch)
            .await?;
        let (job, state) = (job.clone(), state.clone());
        let (res, inputs) = tokio::task::spawn_blocking(move || {
            let run = || -> Result<Stats, TaskError> {
                let ctx = tensor_ctx(&job)?;
                let m = method_of(&job)?;
                let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
                let rows = RowRange { start, end, index };
                m.partial(&ctx, pass, &state, rows, &refs)
                    .map_err(|e| fatal(format!("tensor {}: {e}", job.name)))
            };
            (run(), inputs)
        })
        .await
        .map_err(|e| fatal(format!("kernel panicked: {e}")))?;
        give_back(&mut scratch.inputs, inputs);
        res
    }
}
