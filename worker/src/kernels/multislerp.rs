//! `multislerp`: barycentric interpolation of any number of models on a hypersphere.
//!
//! The (task) vectors xᵢ (minus the base when given) are scaled to unit length,
//! uᵢ = xᵢ / (‖xᵢ‖ + eps); their weighted mean m = Σ wᵢuᵢ is normalised, mapped through the
//! tangent space at m and back, and rescaled to the weighted mean norm Σ wᵢ‖xᵢ‖. The whole
//! tensor is one vector.
//!
//! Everything needed is the Gram matrix xᵢ·xⱼ of the inputs over the whole tensor: one
//! statistics pass of exact sums. The weighted sum of the tangent projections
//! Σ wᵢ(uᵢ - (uᵢ·m̂)m̂) equals m - (m·m̂)m̂ = 0 identically, so the exponential map returns m̂
//! (mergekit computes it numerically and gets rounding noise of relative size ~1e-7).
//! With two inputs whose weighted unit mean vanishes the result is their weighted sum; with
//! more it is an error.

use super::stats::gram_upper;
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx,
};

pub struct MultiSlerp;

static SPEC: MethodSpec = MethodSpec {
    name: "multislerp",
    params: &[
        ParamDef::flag("normalize_weights", true),
        ParamDef::with_default("eps", 1e-8).at_least(0.0),
    ],
    tensor_params: &[ParamDef::required("weight")],
    base: BaseRule::Optional,
    min_models: 1,
    max_models: None,
};

struct Inputs<'a> {
    xs: Vec<&'a [f32]>,
    base: Option<&'a [f32]>,
    weights: Vec<f32>,
}

impl<'a> Inputs<'a> {
    fn new(ctx: &TensorCtx, inputs: &[&'a [f32]]) -> KResult<Self> {
        let others = ctx.others();
        let base = match ctx.base {
            Some(b) => Some(
                *inputs
                    .get(b)
                    .ok_or_else(|| KernelError::missing("multislerp: base input is missing"))?,
            ),
            None => None,
        };
        let mut weights: Vec<f32> = others
            .iter()
            .map(|&i| ctx.model_param(i, "weight").map(|w| w as f32))
            .collect::<KResult<_>>()?;
        if ctx.flag("normalize_weights")? {
            let s: f32 = weights.iter().sum();
            weights.iter_mut().for_each(|w| *w /= s);
        }
        Ok(Inputs {
            xs: others.iter().map(|&i| inputs[i]).collect(),
            base,
            weights,
        })
    }

    #[inline]
    fn x(&self, i: usize, e: usize) -> f32 {
        match self.base {
            Some(b) => self.xs[i][e] - b[e],
            None => self.xs[i][e],
        }
    }

    #[inline]
    fn finish(&self, e: usize, r: f32) -> f32 {
        match self.base {
            Some(b) => r + b[e],
            None => r,
        }
    }
}

/// Index of xᵢ·xⱼ (i <= j) in the packed upper triangle of an n×n matrix.
fn tri(n: usize, i: usize, j: usize) -> usize {
    i * n - i * (i + 1) / 2 + j
}

/// What `apply` needs, from the Gram matrix.
enum Plan {
    /// out = Σ scaleᵢ·(xᵢ/(‖xᵢ‖+eps)) then · post, plus the base
    Sphere {
        norms_eps: Vec<f32>,
        mean_norm: f32,
        avg_norm: f32,
    },
    /// the two-model fallback: w₀x₀ + w₁x₁ (+ base)
    Linear,
}

fn plan(ctx: &TensorCtx, inp: &Inputs, gram: &[f64]) -> KResult<Plan> {
    let n = inp.xs.len();
    let eps = ctx.param("eps")? as f32;
    let g = |i: usize, j: usize| -> KResult<f64> {
        let (a, b) = if i <= j { (i, j) } else { (j, i) };
        gram.get(tri(n, a, b))
            .copied()
            .ok_or_else(|| KernelError::missing("multislerp: statistics are missing"))
    };
    let mut norms = Vec::with_capacity(n);
    for i in 0..n {
        norms.push(g(i, i)?.sqrt() as f32);
    }
    let norms_eps: Vec<f32> = norms.iter().map(|&x| x + eps).collect();
    // ‖Σ wᵢ xᵢ/(‖xᵢ‖+eps)‖²
    // a zero input is a zero unit vector: x/(0 + eps) for any eps > 0 (with `eps: 0`,
    // mergekit's 0/0 would make the whole output NaN)
    let c: Vec<f64> = (0..n)
        .map(|i| {
            if norms_eps[i] > 0.0 {
                inp.weights[i] as f64 / norms_eps[i] as f64
            } else {
                0.0
            }
        })
        .collect();
    let mut mm = 0f64;
    for i in 0..n {
        for j in 0..n {
            mm += c[i] * c[j] * g(i, j)?;
        }
    }
    let mean_norm = mm.max(0.0).sqrt() as f32;
    // an exact zero counts as below any eps (`eps: 0` would divide by it)
    if mean_norm < eps || mean_norm == 0.0 || !mean_norm.is_finite() {
        if n == 2 {
            return Ok(Plan::Linear);
        }
        return Err(KernelError::numerical(
            "multislerp: the weighted sum of the input tensors is zero (antipodal \
                    vectors with weights that balance out); try different weights",
        ));
    }
    let avg_norm: f32 = norms.iter().zip(&inp.weights).map(|(a, w)| a * w).sum();
    Ok(Plan::Sphere {
        norms_eps,
        mean_norm,
        avg_norm,
    })
}

impl Method for MultiSlerp {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        let nw = ctx.param("normalize_weights")?;
        if nw != 0.0 && nw != 1.0 {
            return Err(KernelError::param(format!(
                "multislerp: parameter normalize_weights must be a boolean, got {nw}"
            )));
        }
        let eps = ctx.param("eps")?;
        if !eps.is_finite() || eps < 0.0 {
            return Err(KernelError::param(format!(
                "multislerp: parameter eps must be a finite number >= 0, got {eps}"
            )));
        }
        let others = ctx.others();
        if others.is_empty() {
            return Err(KernelError::shape(
                "multislerp needs at least one model besides the base_model",
            ));
        }
        let mut sum = 0.0;
        for &i in &others {
            let w = ctx.model_param(i, "weight")?;
            if !w.is_finite() {
                return Err(KernelError::param(format!(
                    "multislerp: parameter weight must be a finite number, got {w}"
                )));
            }
            sum += w;
        }
        if nw == 1.0 && others.len() > 1 && sum == 0.0 {
            return Err(KernelError::numerical(
                "multislerp: parameter weight must not sum to 0 when normalize_weights is true",
            ));
        }
        Ok(())
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        if ctx.others().len() > 1 {
            1
        } else {
            0
        }
    }

    fn partial(
        &self,
        ctx: &TensorCtx,
        _pass: u32,
        _state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
    ) -> KResult<Stats> {
        let inp = Inputs::new(ctx, inputs)?;
        let len = inputs.first().map_or(0, |x| x.len());
        Ok(gram_upper(inp.xs.len(), len, |i, e| inp.x(i, e)))
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let others = ctx.others();
        if others.len() == 1 {
            // a single model is returned as it is (even with a base)
            out.copy_from_slice(inputs[others[0]]);
            return Ok(());
        }
        let inp = Inputs::new(ctx, inputs)?;
        match plan(ctx, &inp, &state.values)? {
            Plan::Linear => {
                let (w0, w1) = (inp.weights[0], inp.weights[1]);
                for (e, o) in out.iter_mut().enumerate() {
                    *o = inp.finish(e, inp.x(0, e) * w0 + inp.x(1, e) * w1);
                }
            }
            Plan::Sphere {
                norms_eps,
                mean_norm,
                avg_norm,
            } => {
                for (e, o) in out.iter_mut().enumerate() {
                    let mut m = 0f32;
                    for (i, (&ne, &w)) in norms_eps.iter().zip(&inp.weights).enumerate() {
                        if ne > 0.0 {
                            m += inp.x(i, e) / ne * w;
                        }
                    }
                    *o = inp.finish(e, m / mean_norm * avg_norm);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn case(shape: &[u64], n: usize, base: bool) -> Case {
        let mut c = Case::new(shape, n).with_defaults(&MultiSlerp);
        if base {
            c.base = Some(n - 1);
        }
        for (i, m) in c.model_params.iter_mut().enumerate() {
            m.insert("weight".into(), 1.0 + i as f64);
        }
        c
    }

    #[test]
    fn hand_checked() {
        // orthogonal, norms 2 and 4, equal weights: direction (1,1)/sqrt2, norm 3
        let mut c = case(&[2], 2, false);
        c.model_params[1].insert("weight".into(), 1.0);
        let out = run(&MultiSlerp, &c, &[vec![2.0, 0.0], vec![0.0, 4.0]]);
        let w = 3.0 / 2f32.sqrt();
        assert!(
            (out[0] - w).abs() < 1e-5 && (out[1] - w).abs() < 1e-5,
            "{out:?}"
        );
        // same around a base (1, 1)
        let mut c = case(&[2], 3, true);
        c.model_params[1].insert("weight".into(), 1.0);
        let out = run(
            &MultiSlerp,
            &c,
            &[vec![3.0, 1.0], vec![1.0, 5.0], vec![1.0, 1.0]],
        );
        assert!(
            (out[0] - 1.0 - w).abs() < 1e-5 && (out[1] - 1.0 - w).abs() < 1e-5,
            "{out:?}"
        );
        // antipodal with balancing weights: two models fall back to the weighted sum
        let out = run(
            &MultiSlerp,
            &case(&[2], 2, false),
            &[vec![1.0, 0.0], vec![-2.0, 0.0]],
        );
        // weights 1/3, 2/3: unit mean = 1/3 - 2/3 != 0, so this stays spherical
        assert!(out[0] < 0.0);
        let mut c = case(&[2], 2, false);
        c.model_params[1].insert("weight".into(), 1.0);
        let out = run(&MultiSlerp, &c, &[vec![1.0, 0.0], vec![-2.0, 0.0]]);
        assert_eq!(out, vec![-0.5, 0.0]);
    }

    #[test]
    fn whole_equals_cut() {
        for base in [false, true] {
            for shape in [vec![37u64, 19], vec![101]] {
                let n = shape.iter().product::<u64>() as usize;
                let c = case(&shape, 4, base);
                let ins: Vec<Vec<f32>> = (0..4).map(|i| data(n, i + 1, 1.0)).collect();
                let whole = run(&MultiSlerp, &c, &ins);
                for k in [1, 2, 5, 7, 36, 100] {
                    let cut = run_cut(&MultiSlerp, &c, &ins, k);
                    assert!(whole
                        .iter()
                        .zip(&cut)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }

    #[test]
    fn rejects_bad_params() {
        let mut c = case(&[2], 2, false);
        c.params.insert("eps".into(), -1.0);
        assert!(MultiSlerp
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("multislerp: parameter eps"));
        let mut c = case(&[2], 2, false);
        c.model_params[1].remove("weight");
        assert!(MultiSlerp
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("weight"));
        let mut c = case(&[2], 1, true);
        c.base = Some(0);
        assert!(MultiSlerp
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("multislerp needs"));
        let mut c = case(&[2], 3, false);
        c.params.insert("normalize_weights".into(), 3.0);
        assert!(MultiSlerp
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("normalize_weights"));
    }

    #[test]
    fn three_antipodal_is_an_error() {
        let mut c = case(&[2], 3, false);
        for m in &mut c.model_params {
            m.insert("weight".into(), 1.0);
        }
        c.model_params[2].insert("weight".into(), 2.0);
        let ctx = c.ctx();
        let ins = [vec![1.0f32, 0.0], vec![1.0, 0.0], vec![-1.0, 0.0]];
        let refs: Vec<&[f32]> = ins.iter().map(|v| v.as_slice()).collect();
        let mut out = vec![0f32; 2];
        let e = super::super::run_whole(&MultiSlerp, &ctx, &refs, &mut out).unwrap_err();
        assert!(e.message().contains("multislerp"));
    }
}
