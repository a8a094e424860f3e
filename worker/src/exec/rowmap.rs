//! Inputs of an embedding re-mapped into the output vocabulary (a tensor job's `row_map`):
//! each input's rows gathered by token, rows an input lacks filled from a default (another
//! input's row, a mean of several, zeros), padding rows set to the input's mean row. The
//! reads are range reads of contiguous source rows; the arithmetic is [`assemble`] and
//! [`mean_rows`], pure functions over slices.

use std::path::Path;

use shardmerge_proto as pb;

use crate::exec::{fatal, input_dtype, TaskError};
use crate::format::dtype;
use crate::kernels::round::Work;
use crate::storage::{retry, Resolver};
use crate::tensor::view2d;

/// Rows of the padding mean gathered at a time.
const MEAN_CHUNK_BYTES: u64 = 4 << 20;

/// Source rows read from one input: `(first row, values)`, each block whole rows of the
/// output's row length, sorted by first row and not overlapping.
#[derive(Debug, Default)]
pub struct Fetched {
    blocks: Vec<(u64, Vec<f32>)>,
    row_len: usize,
}

impl Fetched {
    pub fn new(row_len: usize, blocks: Vec<(u64, Vec<f32>)>) -> Self {
        Fetched { blocks, row_len }
    }

    fn row(&self, r: u64) -> Option<&[f32]> {
        let k = self
            .blocks
            .partition_point(|(s, _)| *s <= r)
            .checked_sub(1)?;
        let (s, v) = &self.blocks[k];
        let off = ((r - s) as usize).checked_mul(self.row_len)?;
        v.get(off..off + self.row_len)
    }
}

/// The dtype a default row's mean is computed in: the tensor's work dtype, as mergekit's
/// torch code sums and divides rows loaded in it.
fn work_of(job: &pb::TensorJob) -> Work {
    match pb::Dtype::try_from(job.work_dtype) {
        Ok(pb::Dtype::Bf16) => Work::BF16,
        Ok(pb::Dtype::F16) => Work::F16,
        _ => Work::F32,
    }
}

/// Every input's output rows `[a, b)` (all below `pad_from`) from the rows `fetched` holds:
/// its own row where its runs give one, else the default row, else zeros.
pub fn assemble(
    map: &pb::RowMap,
    fetched: &[Fetched],
    row_len: usize,
    a: u64,
    b: u64,
    work: Work,
) -> Result<Vec<Vec<f32>>, String> {
    let n = (b - a) as usize;
    let mut out = Vec::with_capacity(map.inputs.len());
    let mut own = Vec::with_capacity(map.inputs.len());
    for (i, ir) in map.inputs.iter().enumerate() {
        let mut v = vec![0f32; n * row_len];
        let mut filled = vec![false; n];
        for run in &ir.runs {
            let lo = run.out_start.max(a);
            let hi = run.out_start.saturating_add(run.count).min(b);
            for r in lo..hi {
                let src = run.src_start.saturating_add(r - run.out_start);
                let row = fetched[i]
                    .row(src)
                    .ok_or_else(|| format!("input {i}: source row {src} was not read"))?;
                let k = (r - a) as usize;
                v[k * row_len..(k + 1) * row_len].copy_from_slice(row);
                filled[k] = true;
            }
        }
        out.push(v);
        own.push(filled);
    }
    let mut value = vec![0f32; row_len];
    for d in &map.defaults {
        if d.out_row < a || d.out_row >= b {
            continue;
        }
        value.fill(0.0);
        match d.from.as_slice() {
            [] => {}
            [one] => value.copy_from_slice(source_row(fetched, one)?),
            many => {
                // as torch: zeros, `+=` each row, `/=` the count; each op rounds to the dtype
                for s in many {
                    let row = source_row(fetched, s)?;
                    for (x, &y) in value.iter_mut().zip(row) {
                        *x = work.r(*x + work.r(y));
                    }
                }
                let c = many.len() as f32;
                for x in value.iter_mut() {
                    *x = work.r(*x / c);
                }
            }
        }
        let k = (d.out_row - a) as usize;
        for (v, filled) in out.iter_mut().zip(&own) {
            if !filled[k] {
                v[k * row_len..(k + 1) * row_len].copy_from_slice(&value);
            }
        }
    }
    Ok(out)
}

fn source_row<'a>(fetched: &'a [Fetched], s: &pb::RowRef) -> Result<&'a [f32], String> {
    fetched
        .get(s.input as usize)
        .and_then(|f| f.row(s.row))
        .ok_or_else(|| format!("input {}: source row {} was not read", s.input, s.row))
}

/// Adds each column of `rows` (whole rows of `row_len`, as loaded in the work dtype) into
/// `sums`.
pub fn add_columns(rows: &[f32], row_len: usize, sums: &mut [f64], work: Work) {
    for row in rows.chunks_exact(row_len) {
        for (s, &x) in sums.iter_mut().zip(row) {
            *s += work.r(x) as f64;
        }
    }
}

/// The mean row from column sums over `n` rows, rounded to the work dtype once (torch's mean
/// of 16-bit rows accumulates in higher precision and rounds the result).
pub fn mean_rows(sums: &[f64], n: u64, work: Work) -> Vec<f32> {
    sums.iter()
        .map(|s| work.r((s / n.max(1) as f64) as f32))
        .collect()
}

/// Source row intervals `[start, end)` of input `i` that output rows `[a, b)` need, sorted
/// and joined where they touch (one range read each).
fn needed(map: &pb::RowMap, i: usize, a: u64, b: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for run in &map.inputs[i].runs {
        let lo = run.out_start.max(a);
        let hi = run.out_start.saturating_add(run.count).min(b);
        if lo < hi {
            let s = run.src_start.saturating_add(lo - run.out_start);
            spans.push((s, s.saturating_add(hi - lo)));
        }
    }
    for d in &map.defaults {
        if d.out_row >= a && d.out_row < b {
            for s in d.from.iter().filter(|s| s.input as usize == i) {
                spans.push((s.row, s.row.saturating_add(1)));
            }
        }
    }
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in spans {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Reads what output rows `[a, b)` need of every input. Returns the rows and the bytes read from each input.
async fn fetch(
    resolver: &Resolver,
    job: &pb::TensorJob,
    map: &pb::RowMap,
    a: u64,
    b: u64,
) -> Result<(Vec<Fetched>, Vec<u64>), TaskError> {
    let (_, out_row) = view2d(&job.shape);
    let mut all = Vec::with_capacity(job.inputs.len());
    let mut read = vec![0u64; job.inputs.len()];
    for (i, src) in job.inputs.iter().enumerate() {
        let dt = input_dtype(src, job)?;
        let (in_rows, in_row) = view2d(&src.shape);
        if in_row < out_row {
            return Err(fatal(format!(
                "{}: tensor {} of {} has rows of {in_row} values, fewer than the output's {out_row}",
                src.uri, src.tensor, src.model
            )));
        }
        let loc = resolver.resolve(&src.uri, Path::new("/"))?;
        let es = dt.size() as u64;
        let row_bytes = in_row * es;
        let mut blocks = Vec::new();
        for (s, e) in needed(map, i, a, b) {
            if e > in_rows {
                return Err(fatal(format!(
                    "{}: the row map of tensor {} reads row {} of {}'s {in_rows} rows (plan error)",
                    src.uri,
                    job.name,
                    e - 1,
                    src.model
                )));
            }
            let from = src.data_offset + s * row_bytes;
            let to = src.data_offset + e * row_bytes;
            let data = retry(|| loc.store.read_range(&loc.path, from..to)).await?;
            read[i] += to - from;
            let mut v = Vec::with_capacity(((e - s) * out_row) as usize);
            if in_row == out_row {
                dtype::decode_extend(dt, &data, &mut v);
            } else {
                let ob = (out_row * es) as usize;
                for row in data.chunks_exact(row_bytes as usize) {
                    dtype::decode_extend(dt, &row[..ob], &mut v);
                }
            }
            blocks.push((s, v));
        }
        all.push(Fetched::new(out_row as usize, blocks));
    }
    Ok((all, read))
}

/// Rows `[start, end)` of every input of `job`, gathered into the output vocabulary by its row
/// map, as f32. Returns them and the bytes read from each input.
pub async fn read_inputs(
    resolver: &Resolver,
    job: &pb::TensorJob,
    map: &pb::RowMap,
    start: u64,
    end: u64,
) -> Result<(Vec<Vec<f32>>, Vec<u64>), TaskError> {
    if map.inputs.len() != job.inputs.len() {
        return Err(fatal(format!(
            "tensor {}: its row map has {} inputs, the job {} (plan error)",
            job.name,
            map.inputs.len(),
            job.inputs.len()
        )));
    }
    let (rows, out_row) = view2d(&job.shape);
    let row_len = out_row as usize;
    let work = work_of(job);
    let real = if map.pad_from > 0 {
        map.pad_from.min(rows)
    } else {
        rows
    };
    let (a, b) = (start.min(real), end.min(real));
    let (fetched, mut bytes) = fetch(resolver, job, map, a, b).await?;
    let mut out = assemble(map, &fetched, row_len, a, b, work)
        .map_err(|e| fatal(format!("tensor {}: {e} (plan error)", job.name)))?;
    if end > real {
        // padding rows: each input's mean over its real rows, gathered a chunk at a time
        let chunk = (MEAN_CHUNK_BYTES / (out_row * 4).max(1)).max(1);
        let mut sums = vec![vec![0f64; row_len]; job.inputs.len()];
        let mut r = 0;
        while r < real {
            let re = (r + chunk).min(real);
            let (f, n) = fetch(resolver, job, map, r, re).await?;
            bytes.iter_mut().zip(n).for_each(|(b, n)| *b += n);
            let part = assemble(map, &f, row_len, r, re, work)
                .map_err(|e| fatal(format!("tensor {}: {e} (plan error)", job.name)))?;
            for (s, p) in sums.iter_mut().zip(&part) {
                add_columns(p, row_len, s, work);
            }
            r = re;
        }
        let pads = end - start.max(real);
        for (v, s) in out.iter_mut().zip(&sums) {
            let mean = mean_rows(s, real, work);
            for _ in 0..pads {
                v.extend_from_slice(&mean);
            }
        }
    }
    Ok((out, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &[(u32, u64)]) -> Vec<pb::RowRef> {
        v.iter()
            .map(|&(input, row)| pb::RowRef { input, row })
            .collect()
    }

    #[test]
    fn rows_are_gathered_and_defaults_fill_the_gaps() {
        // two inputs, rows of 2; output rows 0..4
        // input 0 has out 0 <- 1, out 1 <- 0; input 1 has out 0 <- 0, out 2 <- 1
        let map = pb::RowMap {
            inputs: vec![
                pb::InputRows {
                    runs: vec![
                        pb::RowRun {
                            out_start: 0,
                            count: 1,
                            src_start: 1,
                        },
                        pb::RowRun {
                            out_start: 1,
                            count: 1,
                            src_start: 0,
                        },
                    ],
                },
                pb::InputRows {
                    runs: vec![
                        pb::RowRun {
                            out_start: 0,
                            count: 1,
                            src_start: 0,
                        },
                        pb::RowRun {
                            out_start: 2,
                            count: 1,
                            src_start: 1,
                        },
                    ],
                },
            ],
            defaults: vec![
                pb::DefaultRow {
                    out_row: 1,
                    from: refs(&[(0, 0)]),
                },
                pb::DefaultRow {
                    out_row: 2,
                    from: refs(&[(1, 1)]),
                },
                pb::DefaultRow {
                    out_row: 3,
                    from: refs(&[(0, 0), (1, 1)]),
                },
            ],
            pad_from: 0,
        };
        assert_eq!(needed(&map, 0, 0, 4), [(0, 2)]);
        assert_eq!(needed(&map, 1, 0, 4), [(0, 2)]);
        let f = [
            Fetched::new(2, vec![(0, vec![1.0, 2.0, 3.0, 4.0])]),
            Fetched::new(2, vec![(0, vec![10.0, 20.0, 30.0, 40.0])]),
        ];
        let out = assemble(&map, &f, 2, 0, 4, Work::F32).unwrap();
        assert_eq!(out[0], [3.0, 4.0, 1.0, 2.0, 30.0, 40.0, 15.5, 21.0]);
        assert_eq!(out[1], [10.0, 20.0, 1.0, 2.0, 30.0, 40.0, 15.5, 21.0]);
        // a range in the middle sees the same rows
        let mid = assemble(&map, &f, 2, 1, 3, Work::F32).unwrap();
        assert_eq!(mid[0], out[0][2..6]);
    }

    #[test]
    fn a_mean_rounds_each_operation_in_bf16() {
        // 1 + 2^-8 is no bf16: torch rounds the sum to 1 before dividing
        let map = pb::RowMap {
            inputs: vec![pb::InputRows::default(), pb::InputRows::default()],
            defaults: vec![pb::DefaultRow {
                out_row: 0,
                from: refs(&[(0, 0), (1, 0)]),
            }],
            pad_from: 0,
        };
        let f = [
            Fetched::new(1, vec![(0, vec![1.0])]),
            Fetched::new(1, vec![(0, vec![1.0f32 / 256.0])]),
        ];
        let bf = assemble(&map, &f, 1, 0, 1, Work::BF16).unwrap();
        assert_eq!(bf[0], [0.5]);
        let f32 = assemble(&map, &f, 1, 0, 1, Work::F32).unwrap();
        assert_eq!(f32[0], [(1.0 + 1.0 / 256.0) / 2.0]);
        assert_eq!(mean_rows(&[3.0], 2, Work::F32), [1.5]);
    }
}
