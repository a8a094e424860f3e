//! `linear`: a weighted average of the models (a "model soup").
//!
//! out = Σ wᵢ·xᵢ, divided by Σ wᵢ when `normalize` (default true).
//!
//! In a 16-bit working dtype ([`Work`]), as mergekit's torch code: the weights and inputs in
//! that dtype, each product rounded, the sum over the models accumulated in f32 and rounded,
//! the weights' sum rounded, the quotient rounded.

use super::round::{rk, Work};
use super::{BaseRule, KResult, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx};

/// The weighted sum in working dtype `K` (see [`rk`]), then the division by `total`.
fn rounded<const K: u8>(inputs: &[&[f32]], weights: &[f32], total: Option<f32>, out: &mut [f32]) {
    out.iter_mut().for_each(|o| *o = 0.0);
    for (x, &w) in inputs.iter().zip(weights) {
        for (o, &v) in out.iter_mut().zip(x.iter()) {
            *o += rk::<K>(w * rk::<K>(v));
        }
    }
    match total {
        Some(t) => out.iter_mut().for_each(|o| *o = rk::<K>(rk::<K>(*o) / t)),
        None => out.iter_mut().for_each(|o| *o = rk::<K>(*o)),
    }
}

pub struct Linear;

static SPEC: MethodSpec = MethodSpec {
    name: "linear",
    params: &[ParamDef::with_default("normalize", 1.0)],
    tensor_params: &[ParamDef::required("weight")],
    base: BaseRule::Ignored,
    min_models: 1,
    max_models: None,
};

impl Method for Linear {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        if ctx.flag("normalize")? {
            let total: f32 = (0..ctx.n_models())
                .map(|i| ctx.model_param(i, "weight").map(|w| w as f32))
                .sum::<KResult<f32>>()?;
            if total == 0.0 {
                return Err("linear: the weights sum to 0, and `normalize` divides by their sum; change the weights or set `normalize: false`".into());
            }
        }
        Ok(())
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        _state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let weights: Vec<f32> = (0..inputs.len())
            .map(|i| ctx.model_param(i, "weight").map(|w| w as f32))
            .collect::<KResult<_>>()?;
        if ctx.work.rounds() {
            let w: Vec<f32> = weights.iter().map(|&x| ctx.work.r(x)).collect();
            let total = ctx.work.r(w.iter().sum());
            let total = ctx.flag("normalize")?.then_some(total);
            match ctx.work {
                Work::BF16 => rounded::<1>(inputs, &w, total, out),
                _ => rounded::<2>(inputs, &w, total, out),
            }
            return Ok(());
        }
        let total: f32 = weights.iter().sum();
        let scale = if ctx.flag("normalize")? {
            1.0 / total
        } else {
            1.0
        };
        out.iter_mut().for_each(|o| *o = 0.0);
        for (x, &w) in inputs.iter().zip(&weights) {
            for (o, &v) in out.iter_mut().zip(x.iter()) {
                *o += w * v;
            }
        }
        if scale != 1.0 {
            if ctx.flag("normalize")? {
                out.iter_mut().for_each(|o| *o /= total);
            } else {
                out.iter_mut().for_each(|o| *o *= scale);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn weighted_average() {
        let mut c = Case::new(&[2, 3], 2).with_defaults(&Linear);
        c.model_params[0].insert("weight".into(), 3.0);
        c.model_params[1].insert("weight".into(), 1.0);
        let out = run(&Linear, &c, &[vec![1.0; 6], vec![5.0; 6]]);
        assert_eq!(out, vec![2.0; 6]);
        c.params.insert("normalize".into(), 0.0);
        let out = run(&Linear, &c, &[vec![1.0; 6], vec![5.0; 6]]);
        assert_eq!(out, vec![8.0; 6]);
    }

    /// bf16 op by op, as torch: weights 0.3 and 0.7 become 0.30078125 and 0.69921875; each
    /// product rounds to bf16, the sum of products accumulates in f32 and rounds, the weights'
    /// sum (1.0) rounds, the quotient rounds.
    #[test]
    fn bf16_op_by_op() {
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        let a = [1.0f32, 0.0078125, 3.140625, -2.5, 100.5];
        let b = [1.0078125f32, -0.33203125, 2.71875, 7.0, -99.0];
        let mut c = Case::new(&[5], 2).with_defaults(&Linear);
        c.model_params[0].insert("weight".into(), 0.3);
        c.model_params[1].insert("weight".into(), 0.7);
        c.work = Work::BF16;
        let out = run(&Linear, &c, &[a.to_vec(), b.to_vec()]);
        let (wa, wb) = (bf(0.3), bf(0.7));
        assert_eq!((wa, wb), (0.30078125, 0.69921875));
        let want: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| bf(bf(bf(wa * x) + bf(wb * y)) / bf(wa + wb)))
            .collect();
        assert_eq!(out, want);
        // rounding once from f32 differs on some of these
        c.work = Work::F32;
        let once: Vec<f32> = run(&Linear, &c, &[a.to_vec(), b.to_vec()])
            .iter()
            .map(|&x| bf(x))
            .collect();
        assert_ne!(once, want);
        // f32 inputs are first rounded to bf16, as mergekit loads them in the recipe's dtype
        c.work = Work::BF16;
        let wide: Vec<f32> = a.iter().map(|x| x * (1.0 + 2f32.powi(-12))).collect();
        let out2 = run(&Linear, &c, &[wide, b.to_vec()]);
        assert_eq!(out2, want);
    }
}
