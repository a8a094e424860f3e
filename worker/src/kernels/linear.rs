//! `linear`: a weighted average of the models (a "model soup").
//!
//! out = Σ wᵢ·xᵢ, divided by Σ wᵢ when `normalize` (default true).
//!
//! As mergekit 0.1.5 computes it, whatever the recipe's dtype: inputs in the recipe's dtype
//! (f32 inputs of a bfloat16 recipe are rounded to bfloat16 first), then in f32 an accumulator
//! starting at 0 takes each model in order as one fused multiply-add (torch's `addcmul_`:
//! `acc = fma(xᵢ, wᵢ, acc)`, one rounding per model), is divided by the f32 sum of the weights,
//! and is rounded once to the recipe's dtype. A 16-bit working dtype ([`Work`]) therefore
//! rounds only the inputs and the result, not each product.

use super::round::Work;
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx,
};

/// `out = Σ fma(xᵢ, wᵢ, ·)` in model order, divided by `total`, with inputs and result rounded
/// to `work`.
fn weighted_sum(
    work: Work,
    inputs: &[&[f32]],
    weights: &[f32],
    total: Option<f32>,
    out: &mut [f32],
) {
    out.iter_mut().for_each(|o| *o = 0.0);
    // inputs already in the working dtype (read from a checkpoint in it) are only checked
    let mut rounded = Vec::new();
    for (x, &w) in inputs.iter().zip(weights) {
        if work.rounds() && rounded.len() < x.len() {
            rounded.resize(x.len(), 0.0);
        }
        fma_into(out, work.rounded(x, &mut rounded), w);
    }
    if let Some(t) = total {
        out.iter_mut().for_each(|o| *o /= t);
    }
    work.round_in_place(out);
}

/// `acc[i] = fma(x[i], w, acc[i])`, one rounding each. `f32::mul_add` is exact everywhere, but
/// without the CPU's FMA instructions enabled at compile time it is a libm call per element;
/// on x86_64 a copy of the loop compiled with them runs when this CPU has them (same results:
/// a fused multiply-add has one correct answer).
fn fma_into(acc: &mut [f32], x: &[f32], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `fma_into_with_fma` requires only the `fma` target feature, and the check
        // just above found it on the CPU running this code.
        unsafe { fma_into_with_fma(acc, x, w) };
        return;
    }
    fma_loop(acc, x, w);
}

#[inline(always)]
fn fma_loop(acc: &mut [f32], x: &[f32], w: f32) {
    for (o, &v) in acc.iter_mut().zip(x) {
        *o = v.mul_add(w, *o);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn fma_into_with_fma(acc: &mut [f32], x: &[f32], w: f32) {
    fma_loop(acc, x, w);
}

pub struct Linear;

static SPEC: MethodSpec = MethodSpec {
    name: "linear",
    params: &[ParamDef::flag("normalize", true)],
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
                return Err(KernelError::numerical("linear: the weights sum to 0, and `normalize` divides by their sum; change the weights or set `normalize: false`"));
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
        let total = ctx.flag("normalize")?.then(|| weights.iter().sum::<f32>());
        weighted_sum(ctx.work, inputs, &weights, total, out);
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

    /// The loop compiled with the CPU's FMA instructions gives libm's exact `fmaf`, bit for bit.
    #[test]
    fn fma_loop_is_exact() {
        let mut r = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            f32::from_bits((r as u32 & 0x3fff_ffff) | ((r >> 32) as u32 & 0x8000_0000))
        };
        let x: Vec<f32> = (0..4099).map(|_| next()).collect();
        let a: Vec<f32> = (0..4099).map(|_| next()).collect();
        let w = next();
        let mut fast = a.clone();
        fma_into(&mut fast, &x, w);
        let exact: Vec<u32> = x
            .iter()
            .zip(&a)
            .map(|(&v, &o)| v.mul_add(w, o).to_bits())
            .collect();
        assert_eq!(fast.iter().map(|f| f.to_bits()).collect::<Vec<_>>(), exact);
    }

    /// mergekit 0.1.5: f32 fused multiply-adds in model order, one division, one rounding to
    /// bf16 at the end; f32 inputs are rounded to bf16 first. The second fma is where plain
    /// multiply-then-add differs: 0.6·-0.2080078125 + 0.4·-0.1865234375 is -0.19941407 with
    /// two roundings and -0.19941406 with mergekit's fma.
    #[test]
    fn fused_multiply_add_then_one_rounding() {
        let mut c = Case::new(&[1], 2).with_defaults(&Linear);
        c.model_params[0].insert("weight".into(), 0.6);
        c.model_params[1].insert("weight".into(), 0.4);
        let out = run(&Linear, &c, &[vec![-0.208_007_81], vec![-0.186_523_44]]);
        assert_eq!(out, vec![-0.19941406]);
        assert_ne!(0.6f32 * -0.208_007_81 + 0.4f32 * -0.186_523_44, -0.19941406);

        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        let a = [1.0f32, 0.0078125, 3.140625, -2.5, 100.5];
        let b = [1.0078125f32, -0.33203125, 2.71875, 7.0, -99.0];
        let mut c = Case::new(&[5], 2).with_defaults(&Linear);
        c.model_params[0].insert("weight".into(), 0.3);
        c.model_params[1].insert("weight".into(), 0.7);
        c.work = Work::BF16;
        let want: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| bf(y.mul_add(0.7, x.mul_add(0.3, 0.0)) / (0.3f32 + 0.7)))
            .collect();
        assert_eq!(run(&Linear, &c, &[a.to_vec(), b.to_vec()]), want);
        // f32 inputs are first rounded to bf16, as mergekit loads them in the recipe's dtype
        let wide: Vec<f32> = a.iter().map(|x| x * (1.0 + 2f32.powi(-12))).collect();
        assert_eq!(run(&Linear, &c, &[wide, b.to_vec()]), want);
    }
}
