//! PEFT's LoRA merge of one module into rows of the tensor it targets, as
//! `peft`'s `merge_and_unload` computes it on CPU (which is what mergekit's `model+lora` runs
//! before merging): the adapter's weights are upcast to f32 on load, so the delta
//! `transpose?(B @ A) * scaling` is an f32 tensor (the product summed over the rank, then
//! multiplied by the scaling as an f32), and `W += delta` adds in f32 and rounds once to the
//! dtype the model holds `W` in.
//!
//! Not a merge method: the executor applies it to an input's rows as they are read, before the
//! method sees them. Each element's dot product over the rank is a chain of fused
//! multiply-adds in f32, in rank order, as torch's CPU matmul (MKL) sums it: on the fixtures,
//! bit for bit the product torch computes (a plain f32 sum differed in 48% of the elements, a
//! correctly rounded one in 51%). The fused step is an f64 product-and-add rounded to f32
//! (the product of two f32 is exact in f64), which vectorises where a call to `fmaf` would not.

use super::round::Work;
use super::{KResult, KernelError};

/// One module's LoRA factors for a row range `[start, end)` of the tensor they target.
pub struct LoraRows<'a> {
    /// Not transposed: all of lora_A, `rank` rows of `a_cols`. Transposed: the range's columns
    /// of lora_A (an embedding's `lora_embedding_A` [r, rows], or fan_in_fan_out's A), `rank`
    /// rows of `end - start`.
    pub a: &'a [f32],
    /// Not transposed: the range's rows of lora_B, `end - start` rows of `rank`. Transposed:
    /// all of lora_B, rows of `rank`, one per column of the target (at least its row length).
    pub b: &'a [f32],
    pub rank: usize,
    /// Row length of lora_A (not transposed): the target's input width.
    pub a_cols: usize,
    pub scaling: f32,
    pub transpose: bool,
    /// The dtype the merged model holds the tensor in: each sum rounds to it.
    pub merged: Work,
    /// Round the delta to `merged` before adding it (PEFT's Embedding merge casts the delta
    /// to the weight's dtype; its Linear merge adds the f32 delta).
    pub round_delta: bool,
}

/// `w` (rows of `row_len` values, the first `row_len` columns of the target's rows) plus the
/// module's delta, rounded to `l.merged`.
pub fn apply(w: &mut [f32], row_len: usize, l: &LoraRows<'_>) -> KResult<()> {
    if row_len == 0 || l.rank == 0 {
        return Err(KernelError::shape("LoRA: empty rows or rank 0"));
    }
    let rows = w.len() / row_len;
    let r = l.rank;
    let mut acc = vec![0f32; row_len];
    if !l.transpose {
        if l.a_cols < row_len || l.a.len() != r * l.a_cols || l.b.len() != rows * r {
            return Err(KernelError::shape(format!(
                "LoRA: A has {} values (rank {r}, {} columns) and B {} for {rows} rows of {row_len}",
                l.a.len(),
                l.a_cols,
                l.b.len()
            )));
        }
        for (i, wrow) in w.chunks_exact_mut(row_len).enumerate() {
            acc.iter_mut().for_each(|x| *x = 0.0);
            for k in 0..r {
                let bk = l.b[i * r + k] as f64;
                let arow = &l.a[k * l.a_cols..k * l.a_cols + row_len];
                for (s, &a) in acc.iter_mut().zip(arow) {
                    *s = (*s as f64 + bk * a as f64) as f32;
                }
            }
            add_row(wrow, &acc, l);
        }
    } else {
        if l.a.len() != r * rows || l.b.len() < row_len * r {
            return Err(KernelError::shape(format!(
                "LoRA: A has {} values and B {} for {rows} rows of {row_len} at rank {r}",
                l.a.len(),
                l.b.len()
            )));
        }
        // B's columns as rows, so that the inner loop runs along memory
        let mut bt = vec![0f32; r * row_len];
        for j in 0..row_len {
            for k in 0..r {
                bt[k * row_len + j] = l.b[j * r + k];
            }
        }
        for (i, wrow) in w.chunks_exact_mut(row_len).enumerate() {
            acc.iter_mut().for_each(|x| *x = 0.0);
            for k in 0..r {
                let ak = l.a[k * rows + i] as f64;
                for (s, &b) in acc.iter_mut().zip(&bt[k * row_len..(k + 1) * row_len]) {
                    *s = (*s as f64 + b as f64 * ak) as f32;
                }
            }
            add_row(wrow, &acc, l);
        }
    }
    Ok(())
}

/// `w = merged(w + dot * scaling)` elementwise, each operation in f32 (the delta rounded to
/// `merged` first with `round_delta`).
fn add_row(w: &mut [f32], dots: &[f32], l: &LoraRows<'_>) {
    let m = l.merged;
    for (x, &d) in w.iter_mut().zip(dots) {
        let delta = d * l.scaling;
        let delta = if l.round_delta { m.r(delta) } else { delta };
        *x = m.r(*x + delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The delta by definition, in f64: W + s * (B A) (or its transpose).
    fn naive(
        w: &[f32],
        a: &[f32],
        b: &[f32],
        shape: (usize, usize, usize),
        s: f32,
        t: bool,
    ) -> Vec<f32> {
        let (rows, cols, r) = shape;
        let mut out = w.to_vec();
        for i in 0..rows {
            for j in 0..cols {
                let mut d = 0f32;
                for k in 0..r {
                    d = if t {
                        b[j * r + k].mul_add(a[k * rows + i], d)
                    } else {
                        b[i * r + k].mul_add(a[k * cols + j], d)
                    };
                }
                out[i * cols + j] += d * s;
            }
        }
        out
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn linear_and_transposed_deltas_match_the_definition() {
        let (rows, cols, r) = (5, 7, 3);
        let w = vals(rows * cols, 1);
        let a = vals(r * cols, 2);
        let b = vals(rows * r, 3);
        let mut got = w.clone();
        let l = LoraRows {
            a: &a,
            b: &b,
            rank: r,
            a_cols: cols,
            scaling: 0.5,
            transpose: false,
            merged: Work::F32,
            round_delta: false,
        };
        apply(&mut got, cols, &l).unwrap();
        assert_eq!(got, naive(&w, &a, &b, (rows, cols, r), 0.5, false));
        // transposed: A [r, rows], B [cols, r]
        let a = vals(r * rows, 4);
        let b = vals(cols * r, 5);
        let mut got = w.clone();
        let l = LoraRows {
            a: &a,
            b: &b,
            rank: r,
            a_cols: rows,
            scaling: 2.0,
            transpose: true,
            merged: Work::F32,
            round_delta: false,
        };
        apply(&mut got, cols, &l).unwrap();
        assert_eq!(got, naive(&w, &a, &b, (rows, cols, r), 2.0, true));
    }

    #[test]
    fn rows_of_a_range_give_the_rows_of_the_whole() {
        let (rows, cols, r) = (6, 4, 2);
        let w = vals(rows * cols, 7);
        let a = vals(r * cols, 8);
        let b = vals(rows * r, 9);
        let mut whole = w.clone();
        let l = LoraRows {
            a: &a,
            b: &b,
            rank: r,
            a_cols: cols,
            scaling: 1.5,
            transpose: false,
            merged: Work::BF16,
            round_delta: false,
        };
        apply(&mut whole, cols, &l).unwrap();
        let mut part = w[2 * cols..5 * cols].to_vec();
        let l = LoraRows {
            b: &b[2 * r..5 * r],
            ..l
        };
        apply(&mut part, cols, &l).unwrap();
        assert_eq!(part, whole[2 * cols..5 * cols]);
        // bfloat16: every sum is rounded once
        assert!(whole.iter().all(|x| Work::BF16.r(*x) == *x));
    }

    #[test]
    fn a_cropped_row_takes_the_first_columns() {
        // an input wider than the output (a truncated embedding): the first columns
        let (rows, cols, r) = (2, 5, 2);
        let w = vals(rows * cols, 1);
        let a = vals(r * cols, 2);
        let b = vals(rows * r, 3);
        let mut full = w.clone();
        let l = LoraRows {
            a: &a,
            b: &b,
            rank: r,
            a_cols: cols,
            scaling: 1.0,
            transpose: false,
            merged: Work::F32,
            round_delta: false,
        };
        apply(&mut full, cols, &l).unwrap();
        let mut crop: Vec<f32> = w.chunks(cols).flat_map(|c| c[..3].to_vec()).collect();
        apply(&mut crop, 3, &l).unwrap();
        let want: Vec<f32> = full.chunks(cols).flat_map(|c| c[..3].to_vec()).collect();
        assert_eq!(crop, want);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let mut w = vec![0f32; 6];
        let l = LoraRows {
            a: &[0.0; 5],
            b: &[0.0; 4],
            rank: 2,
            a_cols: 3,
            scaling: 1.0,
            transpose: false,
            merged: Work::F32,
            round_delta: false,
        };
        assert!(matches!(apply(&mut w, 3, &l), Err(KernelError::Shape(_))));
    }
}
