//! `karcher`: the Riemannian (Karcher) mean of the models on the unit sphere, rescaled.
//!
//! Every input (a base model included, as one more input) gets weight 1/N. Inputs are
//! normalised to unit vectors uᵢ = xᵢ/‖xᵢ‖ (the whole tensor is one vector; inputs with norm
//! <= `tol` are left out of the mean); starting from the normalised weighted mean, the
//! iteration u ← exp_u(Σ aᵢ·θᵢ/sin θᵢ·(uᵢ - cos θᵢ·u)) runs at most `max_iter` times, stopping
//! when the step is shorter than `tol`; the result is u · Σ (1/N)‖xᵢ‖.
//!
//! Every iterate is a linear combination of the inputs, and every quantity the iteration reads
//! (norms, dot products) is a quadratic form in the Gram matrix xᵢ·xⱼ. So one statistics pass
//! of exact sums gives the Gram matrix, the iteration runs on N coefficients in `reduce`, and
//! `apply` forms Σ cᵢ·xᵢ.

use super::stats::{gram_upper, sum_values};
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, Reduced, RowRange, Stats,
    TensorCtx,
};

pub struct Karcher;

static SPEC: MethodSpec = MethodSpec {
    name: "karcher",
    params: &[
        ParamDef::int("max_iter", 10.0, 0.0, 1e9),
        ParamDef::with_default("tol", 1e-5).at_least(0.0),
    ],
    tensor_params: &[],
    base: BaseRule::Optional,
    min_models: 1,
    max_models: None,
};

fn tri(n: usize, i: usize, j: usize) -> usize {
    let (i, j) = if i <= j { (i, j) } else { (j, i) };
    i * n - i * (i + 1) / 2 + j
}

/// Below this sin θ the direction from u towards an input is rounding noise (see `iterate`).
const SIN_FLOOR: f64 = 1e-7;

/// The Karcher iteration on coefficients over the valid unit vectors; `m` is their Gram matrix.
fn iterate(m: &[Vec<f64>], a: &[f64], max_iter: u64, tol: f64) -> Vec<f64> {
    let k = a.len();
    let quad = |v: &[f64]| -> f64 {
        let mut s = 0.0;
        for i in 0..k {
            for j in 0..k {
                s += v[i] * v[j] * m[i][j];
            }
        }
        s.max(0.0).sqrt()
    };
    let mut beta = a.to_vec();
    // mergekit compares with `tol` only; with `tol: 0` an exact zero would divide by zero
    // (NaN in mergekit too), so an exact zero counts as below any tolerance
    let nu = quad(&beta);
    if nu < tol || nu == 0.0 {
        beta = vec![0.0; k];
        beta[0] = 1.0;
    } else {
        beta.iter_mut().for_each(|b| *b /= nu);
    }
    for _ in 0..max_iter {
        let mut tau = vec![0.0; k];
        for i in 0..k {
            let dot: f64 = (0..k)
                .map(|j| m[i][j] * beta[j])
                .sum::<f64>()
                .clamp(-1.0, 1.0);
            let theta = dot.acos();
            // The step towards uᵢ is θ/sin θ · (uᵢ - cos θ·u), a vector of length θ whose
            // direction is (uᵢ - cos θ·u)/sin θ. When sin θ is at rounding level that direction
            // is noise: at θ ≈ 0 the step is ~0 anyway (mergekit skips it under any `tol` above
            // 1e-7), at θ ≈ π (an antipodal input) mergekit's uᵢ - cos θ·u is exactly zero, and
            // with `tol: 0` its θ/sin θ is 0/0 = NaN at θ = 0. Either way the input adds nothing.
            let sin = theta.sin();
            if theta < tol || sin < SIN_FLOOR {
                continue;
            }
            let f = a[i] * theta / sin;
            for j in 0..k {
                tau[j] -= f * dot * beta[j];
            }
            tau[i] += f;
        }
        let nt = quad(&tau);
        if nt < tol || nt == 0.0 {
            break;
        }
        let (c, s) = (nt.cos(), nt.sin());
        for j in 0..k {
            beta[j] = c * beta[j] + s * tau[j] / nt;
        }
        let un = quad(&beta);
        if un > tol {
            beta.iter_mut().for_each(|b| *b /= un);
        }
    }
    beta
}

impl Method for Karcher {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        let mi = ctx.param("max_iter")?;
        if !(0.0..=1e9).contains(&mi) || mi.fract() != 0.0 {
            return Err(KernelError::param(format!(
                "karcher: parameter max_iter must be an integer in [0, 1e9], got {mi}"
            )));
        }
        let tol = ctx.param("tol")?;
        if !tol.is_finite() || tol < 0.0 {
            return Err(KernelError::param(format!(
                "karcher: parameter tol must be a finite number >= 0, got {tol}"
            )));
        }
        if ctx.n_models() == 0 {
            return Err(KernelError::shape("karcher needs at least one model"));
        }
        Ok(())
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        u32::from(ctx.n_models() > 1)
    }

    fn partial(
        &self,
        _ctx: &TensorCtx,
        _pass: u32,
        _state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
    ) -> KResult<Stats> {
        let len = inputs.first().map_or(0, |x| x.len());
        Ok(gram_upper(inputs.len(), len, |i, e| inputs[i][e]))
    }

    fn reduce(
        &self,
        ctx: &TensorCtx,
        _pass: u32,
        _state: Stats,
        partials: Vec<Stats>,
    ) -> KResult<Reduced> {
        let g = sum_values(&partials).values;
        let n = ctx.n_models();
        if g.len() != n * (n + 1) / 2 {
            return Err(KernelError::missing("karcher: statistics are missing"));
        }
        let tol = ctx.param("tol")?;
        let max_iter = ctx.param("max_iter")?.max(0.0) as u64;
        let norms: Vec<f64> = (0..n)
            .map(|i| g[tri(n, i, i)].sqrt() as f32 as f64)
            .collect();
        let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
        let mut coefs = vec![0f64; n];
        if !valid.is_empty() {
            let a = vec![1.0 / valid.len() as f64; valid.len()];
            let m: Vec<Vec<f64>> = valid
                .iter()
                .map(|&i| {
                    valid
                        .iter()
                        .map(|&j| g[tri(n, i, j)] / (norms[i] * norms[j]))
                        .collect()
                })
                .collect();
            let beta = iterate(&m, &a, max_iter, tol);
            let scale: f64 = norms.iter().map(|x| x / n as f64).sum();
            for (&i, b) in valid.iter().zip(&beta) {
                coefs[i] = scale * b / norms[i];
                // only with `tol` near zero: an input of tiny norm next to large ones needs a
                // coefficient past f32, and the output would be ±inf or NaN
                if !(coefs[i] as f32).is_finite() {
                    return Err(KernelError::numerical(format!(
                        "karcher: input {i} has norm {:e}, too small next to the others to rescale in 32-bit floats; raise `tol` above it to leave it out of the mean",
                        norms[i]
                    )
                    ));
                }
            }
        }
        Ok(Reduced::Done(Stats {
            values: coefs,
            ..Default::default()
        }))
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        if inputs.len() == 1 {
            out.copy_from_slice(inputs[0]);
            return Ok(());
        }
        if state.values.len() != ctx.n_models() {
            return Err(KernelError::missing("karcher: statistics are missing"));
        }
        let c: Vec<f32> = state.values.iter().map(|&v| v as f32).collect();
        for (e, o) in out.iter_mut().enumerate() {
            let mut s = 0f32;
            for (x, &ci) in inputs.iter().zip(&c) {
                if ci != 0.0 {
                    s += ci * x[e];
                }
            }
            *o = s;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn case(shape: &[u64], n: usize) -> Case {
        Case::new(shape, n).with_defaults(&Karcher)
    }

    #[test]
    fn hand_checked() {
        // orthogonal, norms 1 and 3: the mean direction bisects them, scale = (1+3)/2
        let out = run(&Karcher, &case(&[2], 2), &[vec![1.0, 0.0], vec![0.0, 3.0]]);
        let w = 2.0 / 2f32.sqrt();
        assert!(
            (out[0] - w).abs() < 1e-5 && (out[1] - w).abs() < 1e-5,
            "{out:?}"
        );
        // three unit vectors at 0, 90 and 180 degrees in a plane: mean at 90 degrees
        let out = run(
            &Karcher,
            &case(&[2], 3),
            &[vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, 0.0]],
        );
        assert!(
            out[0].abs() < 1e-5 && (out[1] - 1.0).abs() < 1e-5,
            "{out:?}"
        );
        // a zero input is left out of the direction but counts (as 0) in the scale
        let out = run(&Karcher, &case(&[2], 2), &[vec![0.0, 4.0], vec![0.0, 0.0]]);
        assert!(
            out[0].abs() < 1e-6 && (out[1] - 2.0).abs() < 1e-6,
            "{out:?}"
        );
    }

    #[test]
    fn whole_equals_cut() {
        for shape in [vec![37u64, 19], vec![101]] {
            let n = shape.iter().product::<u64>() as usize;
            let mut c = case(&shape, 3);
            c.params.insert("tol".into(), 1e-7);
            c.params.insert("max_iter".into(), 30.0);
            let ins: Vec<Vec<f32>> = (0..3).map(|i| data(n, i + 1, 1.0)).collect();
            let whole = run(&Karcher, &c, &ins);
            for k in [1, 2, 5, 7, 36, 100] {
                let cut = run_cut(&Karcher, &c, &ins, k);
                assert!(whole
                    .iter()
                    .zip(&cut)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn rejects_bad_params() {
        let mut c = case(&[2], 2);
        c.params.insert("max_iter".into(), 2.5);
        assert!(Karcher
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("karcher: parameter max_iter"));
        let mut c = case(&[2], 2);
        c.params.insert("tol".into(), -1.0);
        assert!(Karcher
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("karcher: parameter tol"));
    }

    /// `tol: 0` (and the default) on degenerate inputs: equal, parallel, antipodal, zero,
    /// all zero. The output is finite and the expected mean.
    #[test]
    fn degenerate_inputs_stay_finite() {
        for tol in [0.0, 1e-5] {
            let mut c = case(&[4], 2);
            c.params.insert("tol".into(), tol);
            let x = vec![1.0f32, -2.0, 3.0, 0.5];
            let x2: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
            let neg: Vec<f32> = x.iter().map(|v| -v).collect();
            let zero = vec![0f32; 4];
            // equal: the mean is the input
            let out = run(&Karcher, &c, &[x.clone(), x.clone()]);
            assert!(
                out.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5),
                "tol {tol}: {out:?}"
            );
            // parallel: direction of x, scale (1 + 2)/2
            let out = run(&Karcher, &c, &[x.clone(), x2]);
            assert!(
                out.iter().zip(&x).all(|(a, b)| (a - 1.5 * b).abs() < 1e-5),
                "tol {tol}: {out:?}"
            );
            // antipodal, a zero input, all zero: finite
            for ins in [
                vec![x.clone(), neg],
                vec![x.clone(), zero.clone()],
                vec![zero.clone(), zero.clone()],
            ] {
                let out = run(&Karcher, &c, &ins);
                assert!(
                    out.iter().all(|v| v.is_finite()),
                    "tol {tol}: {ins:?} -> {out:?}"
                );
            }
            let mut c3 = case(&[4], 3);
            c3.params.insert("tol".into(), tol);
            let out = run(&Karcher, &c3, &[x.clone(), x.clone(), x.clone()]);
            assert!(
                out.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5),
                "tol {tol}: {out:?}"
            );
        }
    }

    #[test]
    fn tiny_norm_next_to_large_is_refused_with_tol_zero() {
        let mut c = case(&[2], 2);
        c.params.insert("tol".into(), 0.0);
        let ctx = c.ctx();
        let refs: [&[f32]; 2] = [&[1e30, 0.0], &[0.0, 1e-44]];
        let mut out = vec![0f32; 2];
        let e = crate::kernels::run_whole(&Karcher, &ctx, &refs, &mut out).unwrap_err();
        assert!(
            e.message().contains("karcher: input 1") && e.message().contains("raise `tol`"),
            "{e}"
        );
    }
}
