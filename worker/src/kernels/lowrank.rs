//! Low-rank factors of a task vector: the per-module step of `extract-lora`
//! (mergekit-extract-lora's decomposition). Pure: slices in, factors out; no I/O.
//!
//! For a module's delta `D` (`rows x cols`, row-major; an embedding's is factored transposed,
//! `D^T`, as PEFT's `lora_embedding_A/B` expect), a thin SVD in f32 `D = U S V^T` (singular
//! values nonincreasing) keeps rank `r = min(max_rank, k)`, and, when `sv_epsilon > 0`, at most
//! the number of singular values above it; then `A = sqrt(S_r) V_r^T` (`r x in`) and
//! `B = U_r sqrt(S_r)` (`out x r`), or with `distribute_scale` off `A = S_r V_r^T`, `B = U_r`.
//! The SVD is faer's, sequential: a task uses one thread, tasks run side by side.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::{Mat, MatRef, Par};

use super::round::Work;

/// What the decomposition keeps (mergekit's options of the same names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowRank {
    pub max_rank: usize,
    /// Singular values at or below it are dropped (0: none is, whatever its size).
    pub sv_epsilon: f64,
    /// Split the singular values as `sqrt(S)` between A and B (else all of S goes to A).
    pub distribute_scale: bool,
}

/// A module's factors, row-major: `a` is `rank x in`, `b` is `out x rank` (for a transposed
/// (embedding) delta, `in` is the vocabulary and `out` the hidden size).
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    /// Every singular value of the delta, nonincreasing (`min(rows, cols)` of them).
    pub singular: Vec<f32>,
}

/// `ft - base` elementwise as torch computes it in `work` (each operand and the difference
/// rounded to it), into `d`.
pub fn task_vector(ft: &[f32], base: &[f32], work: Work, d: &mut [f32]) {
    work.sub_into(ft, base, d);
}

/// Bytes of faer's workspace for the thin SVD of a `rows x cols` f32 matrix.
fn scratch_bytes(rows: usize, cols: usize) -> usize {
    svd::svd_scratch::<f32>(
        cols,
        rows,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        Par::Seq,
        Default::default(),
    )
    .size_bytes()
}

/// Memory [`factors`] uses for a `rows x cols` delta, past the delta itself: U and V (thin),
/// the workspace and the two f32 factors at most `max_rank` wide.
pub fn memory(rows: u64, cols: u64, max_rank: u64) -> u64 {
    let k = rows.min(cols);
    let r = max_rank.min(k);
    let ws = scratch_bytes(rows as usize, cols as usize) as u64;
    4 * k * (rows + cols) + ws + 4 * r * (rows + cols) + 4 * k
}

/// The factors of `delta` (`rows x cols`, row-major), of `delta^T` with `transpose`.
/// An error says why the SVD failed (it does not converge on non-finite input).
pub fn factors(
    delta: &[f32],
    rows: usize,
    cols: usize,
    transpose: bool,
    o: &LowRank,
) -> Result<Factors, String> {
    if delta.len() != rows * cols {
        return Err(format!(
            "{} values for a {rows} x {cols} delta",
            delta.len()
        ));
    }
    if let Some(x) = delta.iter().find(|x| !x.is_finite()) {
        return Err(format!("the delta holds a non-finite value ({x}): no SVD"));
    }
    // the row-major delta read column-major is D^T: factor that (contiguous for faer), and
    // swap the roles of its singular vectors: D^T = P S Q^T, so D = Q S P^T
    let dt = MatRef::from_column_major_slice(delta, cols, rows);
    let k = rows.min(cols);
    let (mut p, mut q) = (Mat::<f32>::zeros(cols, k), Mat::<f32>::zeros(rows, k));
    let mut s = faer::diag::Diag::<f32>::zeros(k);
    if k > 0 {
        let mut ws = MemBuffer::new(svd::svd_scratch::<f32>(
            cols,
            rows,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            Par::Seq,
            Default::default(),
        ));
        svd::svd(
            dt,
            s.as_mut(),
            Some(p.as_mut()),
            Some(q.as_mut()),
            Par::Seq,
            MemStack::new(&mut ws),
            Default::default(),
        )
        .map_err(|e| format!("the SVD did not converge ({e:?})"))?;
    }
    let singular: Vec<f32> = (0..k).map(|i| s[i]).collect();
    // the factored matrix M is D (U = Q, V = P), or D^T for an embedding (U = P, V = Q)
    let (u, v) = if transpose { (p, q) } else { (q, p) };
    let rank = kept_rank(&singular, o);
    let (sa, sb): (Vec<f32>, Vec<f32>) = singular[..rank]
        .iter()
        .map(|&x| {
            if o.distribute_scale {
                (x.sqrt(), x.sqrt())
            } else {
                (x, 1.0)
            }
        })
        .unzip();
    let (out, inn) = (u.nrows(), v.nrows());
    let mut a = Vec::with_capacity(rank * inn);
    for (i, &si) in sa.iter().enumerate() {
        a.extend((0..inn).map(|j| si * v[(j, i)]));
    }
    let mut b = Vec::with_capacity(out * rank);
    for i in 0..out {
        b.extend(sb.iter().enumerate().map(|(j, &sj)| u[(i, j)] * sj));
    }
    Ok(Factors {
        rank,
        a,
        b,
        singular,
    })
}

/// `min(max_rank, k)`, and with `sv_epsilon > 0` at most the count of singular values above
/// it (compared in f32, as torch compares an f32 tensor with a Python float).
fn kept_rank(s: &[f32], o: &LowRank) -> usize {
    let r = o.max_rank.min(s.len());
    if o.sv_epsilon > 0.0 {
        let eps = o.sv_epsilon as f32;
        r.min(s.iter().filter(|&&x| x > eps).count())
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(f: &Factors, out: usize, inn: usize) -> Vec<f32> {
        let mut p = vec![0f32; out * inn];
        for i in 0..out {
            for j in 0..inn {
                p[i * inn + j] = (0..f.rank)
                    .map(|t| f.b[i * f.rank + t] * f.a[t * inn + j])
                    .sum();
            }
        }
        p
    }

    /// A rank-2 matrix: `x y^T + 0.5 z w^T`.
    fn rank2(rows: usize, cols: usize) -> Vec<f32> {
        let f = |i: usize, s: f32| ((i as f32 + 1.0) * s).sin();
        let mut d = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                d[i * cols + j] = f(i, 0.7) * f(j, 1.3) + 0.5 * f(i, 2.1) * f(j, 0.4);
            }
        }
        d
    }

    const FULL: LowRank = LowRank {
        max_rank: 8,
        sv_epsilon: 0.0,
        distribute_scale: true,
    };

    #[test]
    fn a_rank_two_delta_is_rebuilt_from_its_factors() {
        for (rows, cols) in [(12, 7), (7, 12), (9, 9)] {
            let d = rank2(rows, cols);
            let f = factors(&d, rows, cols, false, &FULL).unwrap();
            assert_eq!(f.rank, rows.min(cols).min(8));
            assert_eq!((f.a.len(), f.b.len()), (f.rank * cols, rows * f.rank));
            assert!(f.singular.windows(2).all(|w| w[0] >= w[1]));
            assert!(f.singular[2] < 1e-5 * f.singular[0], "{:?}", f.singular);
            let p = product(&f, rows, cols);
            for (x, y) in p.iter().zip(&d) {
                assert!((x - y).abs() < 1e-5, "{x} {y}");
            }
        }
    }

    #[test]
    fn sv_epsilon_drops_the_small_singular_values_and_max_rank_caps() {
        let (rows, cols) = (10, 6);
        let d = rank2(rows, cols);
        let eps = LowRank {
            sv_epsilon: 1e-3,
            ..FULL
        };
        let f = factors(&d, rows, cols, false, &eps).unwrap();
        assert_eq!(f.rank, 2);
        let p = product(&f, rows, cols);
        assert!(p.iter().zip(&d).all(|(x, y)| (x - y).abs() < 1e-5));
        let one = LowRank {
            max_rank: 1,
            ..FULL
        };
        assert_eq!(factors(&d, rows, cols, false, &one).unwrap().rank, 1);
    }

    #[test]
    fn an_embedding_is_factored_transposed() {
        let (rows, cols) = (11, 5);
        let d = rank2(rows, cols);
        let f = factors(&d, rows, cols, true, &FULL).unwrap();
        // B A rebuilds D^T: B is cols x r, A is r x rows
        assert_eq!((f.a.len(), f.b.len()), (f.rank * rows, cols * f.rank));
        let p = product(&f, cols, rows);
        for i in 0..cols {
            for j in 0..rows {
                assert!((p[i * rows + j] - d[j * cols + i]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn without_distributed_scale_a_takes_the_singular_values() {
        let (rows, cols) = (8, 6);
        let d = rank2(rows, cols);
        let o = LowRank {
            distribute_scale: false,
            max_rank: 2,
            ..FULL
        };
        let f = factors(&d, rows, cols, false, &o).unwrap();
        // B = U: unit columns
        for j in 0..2 {
            let n: f32 = (0..rows).map(|i| f.b[i * 2 + j].powi(2)).sum();
            assert!((n - 1.0).abs() < 1e-5, "{n}");
        }
        let p = product(&f, rows, cols);
        assert!(p.iter().zip(&d).all(|(x, y)| (x - y).abs() < 1e-5));
    }

    #[test]
    fn a_non_finite_delta_is_refused() {
        let mut d = rank2(4, 4);
        d[5] = f32::NAN;
        let e = factors(&d, 4, 4, false, &FULL).unwrap_err();
        assert!(e.contains("non-finite"), "{e}");
        assert!(factors(&d[..3], 4, 4, false, &FULL).is_err());
    }

    #[test]
    fn memory_counts_the_factors_and_the_workspace() {
        let m = memory(64, 160, 8);
        assert!(m > 4 * 64 * (64 + 160), "{m}");
        assert!(m < 4 * 64 * 160 * 8, "{m}");
    }
}
