//! A write segment of a method without statistics passes, computed a cache-sized block of rows
//! at a time: for each block every input's rows are read as stored (a local file's a block at
//! a time, from the page cache into the cache of the core; other stores' in one range read per
//! input before the first block), decoded, the kernel applied and the result encoded into the
//! task's output bytes while they are still in the core's cache.
//!
//! The general path decodes every input's rows of the task to f32 first, applies the kernel
//! to all of them, then encodes: for a 4 MiB task of three bf16 inputs that streams about
//! 60 MB through memory, where this path moves the 16 MB read and written. The bits are the
//! same: a method without statistics computes each row from that row of its inputs alone
//! (the same property that lets the planner cut its tensors at any row), so rows computed a
//! block at a time equal rows computed at once (`blocks_equal_the_whole_range` below checks
//! every such method).

use std::ops::Range;
use std::sync::Arc;

use shardmerge_proto as pb;

use super::kernel::INLINE_KERNEL;
use super::scratch::sized;
use super::{
    fatal, input_dtype, method_of, tensor_ctx, view2d, Executor, Io, ReportTap, Scratch, TaskError,
};
use crate::format::dtype::{self, DType};
use crate::kernels::{Method, RowRange, Stats, TensorCtx};
use crate::storage::{Location, PositionedRead};

/// Values decoded and computed at a time, all inputs' and outputs' blocks together: small
/// enough that they and the kernel's chunk buffers stay in a core's L2 cache. (A block is
/// whole rows: at least one.)
const BLOCK_VALUES: usize = 64 << 10;

/// The most values one row of every input and the output may hold for a tensor to take this
/// path: its blocks' f32 buffers (at least a row each) are then a fixed few MiB a slot, which
/// the planner does not charge per row.
const ROW_VALUES_MAX: u64 = 1 << 20;

/// Whether a tensor's rows are computed a block at a time (and its inputs held as stored,
/// not as f32): a float output of a method without statistics passes, without a vocabulary
/// re-map, over inputs each `(dtype bytes, row length, plain)` read as stored (`plain`: no
/// LoRA adapter, no streamed stage) with the output's row length (none cropped) in dtypes no
/// wider than f32. The planner charges such a tensor's memory by it too.
pub fn reads_as_stored(
    passes: u32,
    out_float: bool,
    out_row: u64,
    row_map: bool,
    inputs: impl Iterator<Item = (usize, u64, bool)>,
) -> bool {
    let mut n = 0u64;
    let mut plain = true;
    for (size, row, p) in inputs {
        n += 1;
        plain &= p && row == out_row && size <= 4;
    }
    out_float
        && passes == 0
        && !row_map
        && plain
        && (n + 1).saturating_mul(out_row) <= ROW_VALUES_MAX
}

/// [`reads_as_stored`] for a task's tensor job.
pub(super) fn applies(job: &pb::TensorJob, odt: DType) -> bool {
    let (Ok(ctx), Ok(m)) = (tensor_ctx(job), method_of(job)) else {
        return false;
    };
    let (_, out_row) = view2d(&job.shape);
    let inputs = job.inputs.iter().map(|s| {
        let size = input_dtype(s, job).map_or(usize::MAX, |d| d.size());
        let plain = s.lora.is_none() && s.derived.is_none();
        (size, view2d(&s.shape).1, plain)
    });
    reads_as_stored(
        m.passes(&ctx),
        odt.is_float(),
        out_row,
        job.row_map.is_some(),
        inputs,
    )
}

/// One point's rows: its tensor job and its segment (a single task is one point; the points
/// of a sweep read the same rows, exec/group.rs).
pub(super) type Point<'a> = (&'a pb::TensorJob, &'a pb::TensorRows);

impl Executor {
    /// Computes every point's rows into bytes `[at, end)` of its buffer in `bufs` (in the
    /// output dtype `odt`), a block at a time, from one read of the first point's inputs
    /// (every point reads the same rows). `Ok(false)` when an output value is not finite: the
    /// buffers are then partly written, and the caller computes the rows again the general
    /// way, which says what went wrong.
    pub(super) async fn blocked_rows(
        &self,
        points: &[Point<'_>],
        odt: DType,
        (bufs, jobs): (&mut [Vec<u8>], &[&str]),
        (at, end): (usize, usize),
        io: &mut Io,
        scratch: &mut Scratch,
    ) -> Result<bool, TaskError> {
        let Some(&(job0, r0)) = points.first() else {
            return Ok(true);
        };
        let mut raw = self.open_inputs(job0, r0, io, scratch).await?;
        // the general path's f32 buffers hold a whole task's rows: a block's are small
        let small = |v: &mut Vec<f32>| {
            if v.capacity() > BLOCK_VALUES {
                *v = Vec::new();
            }
        };
        scratch.inputs.iter_mut().for_each(small);
        scratch.points.iter_mut().for_each(small);
        let (mut values, mut outs) = (
            std::mem::take(&mut scratch.inputs),
            std::mem::take(&mut scratch.points),
        );
        let rows = r0.row_end.saturating_sub(r0.row_start) as usize;
        let width = view2d(&job0.shape).1 as usize;
        let n_values = rows.saturating_mul(width) * (raw.len() + points.len());
        if n_values <= INLINE_KERNEL {
            // a small segment on the task's own thread (as exec/kernel.rs does): a hand-off
            // to the blocking pool and back costs more than computing it
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut dsts = segment_dsts(bufs, at, end)?;
                let tap = (raw.as_mut_slice(), self.tap.as_deref(), jobs);
                compute_blocks(points, odt, tap, &mut values, &mut outs, &mut dsts)
            }))
            .unwrap_or_else(|_| Err(fatal("kernel panicked")));
            (scratch.inputs, scratch.points) = (values, outs);
            let pieces = raw.into_iter().map(|i| i.bytes).collect();
            super::give_back(&mut scratch.pieces, pieces);
            return res;
        }
        let owned: Vec<(pb::TensorJob, pb::TensorRows)> = points
            .iter()
            .map(|(j, r)| ((*j).clone(), (*r).clone()))
            .collect();
        // the buffers go to the blocking pool and come back (moved, not copied)
        let mut taken: Vec<Vec<u8>> = bufs.iter_mut().map(std::mem::take).collect();
        let tap = self.tap.clone();
        let jobs: Vec<String> = jobs.iter().map(|j| j.to_string()).collect();
        let done = tokio::task::spawn_blocking(move || {
            let points: Vec<Point> = owned.iter().map(|(j, r)| (j, r)).collect();
            let mut dsts = segment_dsts(&mut taken, at, end)?;
            let jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
            let raw_tap = (raw.as_mut_slice(), tap.as_deref(), jobs.as_slice());
            let res = compute_blocks(&points, odt, raw_tap, &mut values, &mut outs, &mut dsts);
            drop(dsts);
            Ok::<_, TaskError>((res, raw, values, outs, taken))
        })
        .await;
        let (res, raw, values, outs, taken) =
            done.map_err(|e| fatal(format!("kernel panicked: {e}")))??;
        for (b, t) in bufs.iter_mut().zip(taken) {
            *b = t;
        }
        scratch.inputs = values;
        scratch.points = outs;
        let pieces = raw.into_iter().map(|i| i.bytes).collect();
        super::give_back(&mut scratch.pieces, pieces);
        res
    }

    /// Each input's rows of `r0`: a local file's to be read a block at a time as the blocks are
    /// computed, any other store's read whole now (with retries).
    async fn open_inputs(
        &self,
        job0: &pb::TensorJob,
        r0: &pb::TensorRows,
        io: &mut Io,
        scratch: &mut Scratch,
    ) -> Result<Vec<Input>, TaskError> {
        let mut raw = Vec::with_capacity(job0.inputs.len());
        for (i, src) in job0.inputs.iter().enumerate() {
            let piece = scratch.piece(i);
            let (loc, range) = self.stored_range(job0, src, (r0.row_start, r0.row_end))?;
            io.read_from(&src.model, range.end - range.start);
            // a local file is read a block at a time as the blocks are computed
            if let Some(at) = loc.store.positioned(&loc.path) {
                at.will_need(range.clone());
                raw.push(Input {
                    bytes: piece,
                    at: Some((at, range.start)),
                });
                continue;
            }
            let bytes = super::read::read_whole(&loc, range, piece).await?;
            raw.push(Input { bytes, at: None });
        }
        Ok(raw)
    }

    /// Where rows `[start, end)` of input `src` lie as stored: its store and byte range.
    pub(super) fn stored_range(
        &self,
        job: &pb::TensorJob,
        src: &pb::TensorSource,
        (start, end): (u64, u64),
    ) -> Result<(Location, Range<u64>), TaskError> {
        let (loc, row_bytes) = self.stored_rows(job, src, end)?;
        let range = src.data_offset + start * row_bytes..src.data_offset + end * row_bytes;
        Ok((loc, range))
    }
}

/// Bytes `[at, end)` of every point's output buffer.
fn segment_dsts(bufs: &mut [Vec<u8>], at: usize, end: usize) -> Result<Vec<&mut [u8]>, TaskError> {
    bufs.iter_mut()
        .map(|b| {
            b.get_mut(at..end)
                .ok_or_else(|| fatal("segment overruns the task's output range"))
        })
        .collect()
}

/// One input's rows as stored: all of them (`at` None), or read a block at a time into
/// `bytes` from the file's positioned reads, the rows starting at byte `at.1`.
struct Input {
    bytes: Vec<u8>,
    at: Option<(Arc<dyn PositionedRead>, u64)>,
}

impl Input {
    /// The bytes of values `[first, first + n)` of the rows (`es` bytes each).
    fn values(&mut self, first: usize, n: usize, es: usize) -> Result<&[u8], TaskError> {
        let (from, len) = (first * es, n * es);
        match &self.at {
            None => self
                .bytes
                .get(from..from + len)
                .ok_or_else(|| fatal("input rows short (plan error)")),
            Some((file, start)) => {
                self.bytes.resize(len, 0);
                file.read_exact_at(&mut self.bytes, start + from as u64)?;
                Ok(&self.bytes)
            }
        }
    }
}

/// The blocks of the points' rows: each input's block decoded from `raw` into `values`
/// (reused), every point's kernel applied into its `outs` buffer (reused) and encoded into
/// its `dsts`. False at the first block whose output is not finite. Each block's inputs, and
/// the values written of the merge jobs `jobs` (the points'), are handed to `tap`, if any.
fn compute_blocks(
    points: &[Point],
    odt: DType,
    (raw, tap, jobs): (&mut [Input], Option<&ReportTap>, &[&str]),
    values: &mut Vec<Vec<f32>>,
    outs: &mut Vec<Vec<f32>>,
    dsts: &mut [&mut [u8]],
) -> Result<bool, TaskError> {
    let (job0, r0) = points[0];
    let ctxs = points
        .iter()
        .map(|(j, _)| tensor_ctx(j))
        .collect::<Result<Vec<_>, _>>()?;
    let methods = points
        .iter()
        .map(|(j, _)| method_of(j))
        .collect::<Result<Vec<_>, _>>()?;
    let dts = job0
        .inputs
        .iter()
        .map(|s| input_dtype(s, job0))
        .collect::<Result<Vec<_>, _>>()?;
    let row_len = ctxs[0].row_len.max(1);
    let step = (BLOCK_VALUES / (row_len * (raw.len() + points.len()))).max(1) as u64;
    values.resize_with(raw.len(), Vec::new);
    outs.resize_with(points.len(), Vec::new);
    let states = vec![Stats::default(); points.len()];
    let mut row = r0.row_start;
    let mut at = 0usize;
    let range = (r0.row_start, r0.row_end);
    let mut tapped = tap.and_then(|t| t.blocks(job0, range));
    let mut written = tap.and_then(|t| t.outputs(jobs, job0, range));
    while row < r0.row_end {
        let end = (row + step).min(r0.row_end);
        let n = (end - row) as usize * row_len;
        let first = (row - r0.row_start) as usize * row_len;
        for ((v, input), dt) in values.iter_mut().zip(raw.iter_mut()).zip(&dts) {
            let src = input.values(first, n, dt.size())?;
            *v = sized(std::mem::take(v), n);
            dtype::decode(*dt, src, v);
        }
        for o in outs.iter_mut() {
            *o = sized(std::mem::take(o), n);
        }
        let refs: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        if let Some(b) = &mut tapped {
            b.add((row, end), &refs);
        }
        let rows = RowRange {
            start: row,
            end,
            index: r0.range_index,
        };
        apply_block(points, &methods, &ctxs, &states, rows, &refs, outs)?;
        let ob = n * odt.size();
        for (out, dst) in outs.iter().zip(dsts.iter_mut()) {
            let to = dst
                .get_mut(at..at + ob)
                .ok_or_else(|| fatal("segment overruns the task's output range"))?;
            if !dtype::encode_finite(odt, out, to) {
                return Ok(false);
            }
        }
        if let Some(w) = &mut written {
            let blocks: Vec<&[u8]> = dsts.iter().map(|d| &d[at..at + ob]).collect();
            w.add(&refs, &blocks, odt);
        }
        at += ob;
        row = end;
    }
    if let Some(b) = tapped {
        b.finish();
    }
    if let Some(w) = written {
        w.finish();
    }
    Ok(true)
}

/// Every point's kernel over one block of rows (`refs`: the inputs' values there) into its
/// `outs` buffer: together where the points share a method that can ([`Method::apply_points`]),
/// else one by one.
fn apply_block(
    points: &[Point],
    methods: &[&'static dyn Method],
    ctxs: &[TensorCtx],
    states: &[Stats],
    rows: RowRange,
    refs: &[&[f32]],
    outs: &mut [Vec<f32>],
) -> Result<(), TaskError> {
    let named = |k: usize| {
        let (j, _) = points[k];
        move |e| fatal(format!("tensor {}: {}: {e}", j.name, j.method))
    };
    let mut muts: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
    let same = methods
        .iter()
        .all(|m| m.spec().name == methods[0].spec().name);
    if same && points.len() > 1 {
        if let Some(r) = methods[0].apply_points(ctxs, states, rows, refs, &mut muts) {
            return r.map_err(named(0));
        }
    }
    for (k, ((m, ctx), out)) in methods.iter().zip(ctxs).zip(muts).enumerate() {
        m.apply(ctx, &states[k], rows, refs, out)
            .map_err(named(k))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::kernels::testutil::*;
    use crate::kernels::{self, Method, RowRange, Stats};

    const ROW: usize = 13;

    /// Every method without statistics passes gives the same bits over a range computed at
    /// once and a block of rows at a time, each block with the range's index (blocks of one
    /// row, of several with a ragged last, in f32 and bfloat16 working dtypes).
    #[test]
    fn blocks_equal_the_whole_range() {
        let mut tested = Vec::new();
        for &m in kernels::registry() {
            for work_bf16 in [false, true] {
                // the first model count the method takes (passthrough: one)
                if (1..=3).rev().any(|n| check_blocks(m, n, work_bf16)) {
                    tested.push(m.spec().name);
                }
            }
        }
        for want in [
            "linear",
            "task_arithmetic",
            "dare_linear",
            "passthrough",
            "nearswap",
        ] {
            assert!(tested.contains(&want), "{want} not tested: {tested:?}");
        }
    }

    /// False when the method has statistics passes or does not take `n` models.
    fn check_blocks(m: &dyn Method, n: usize, work_bf16: bool) -> bool {
        let mut c = Case::new(&[9, ROW as u64], n);
        c.base = Some(0);
        c.seed = 3;
        c.work_bf16 = work_bf16;
        c.params.insert("t".into(), 0.3);
        for (i, mp) in c.model_params.iter_mut().enumerate() {
            mp.insert("weight".into(), 0.2 + 0.3 * i as f64);
        }
        let c = c.with_defaults(m);
        let ctx = c.ctx();
        if m.check(&ctx).is_err() || m.passes(&ctx) != 0 {
            return false;
        }
        let inputs: Vec<Vec<f32>> = (0..n as u64).map(|i| data(9 * ROW, i + 1, 1.0)).collect();
        let slice = |a: u64, b: u64| -> Vec<&[f32]> {
            let (a, b) = (a as usize * ROW, b as usize * ROW);
            inputs.iter().map(|v| &v[a..b]).collect()
        };
        let range = |start, end| RowRange {
            start,
            end,
            index: 4,
        };
        let (start, end) = (2u64, 9u64);
        let state = Stats::default();
        let mut once = vec![f32::NAN; (end - start) as usize * ROW];
        let whole = range(start, end);
        if m.apply(&ctx, &state, whole, &slice(start, end), &mut once)
            .is_err()
        {
            return false;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for step in [1u64, 3] {
            let mut blocks = vec![f32::NAN; once.len()];
            let mut row = start;
            while row < end {
                let e = (row + step).min(end);
                let o = &mut blocks[(row - start) as usize * ROW..(e - start) as usize * ROW];
                m.apply(&ctx, &state, range(row, e), &slice(row, e), o)
                    .unwrap();
                row = e;
            }
            let name = m.spec().name;
            assert_eq!(
                bits(&blocks),
                bits(&once),
                "{name} bf16={work_bf16} step {step}"
            );
        }
        true
    }
}
