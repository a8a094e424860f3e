//! `arcee_fusion`: keeps the other model's changes only where they matter most.
//!
//! importance = |x - base| · KL(softmax(x) ‖ softmax(base)), the KL divergence taken per vector
//! along the last dimension (softmax + 1e-8 on both sides). The threshold is
//! median + 1.5·(q₃ - q₁) of the importances over the whole tensor, each quantile the order
//! statistic at index ⌊q·(n-1)⌋ (no interpolation); out = base + (x - base)·[importance >= threshold].
//!
//! The three order statistics are found exactly by radix selection (two passes). mergekit
//! instead sorts a random sample of one million elements when a tensor has more than that; on
//! such tensors this takes the exact quantiles of all elements.

use super::select;
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, Reduced, RowRange, Stats, TensorCtx,
};

pub struct ArceeFusion;

static SPEC: MethodSpec = MethodSpec {
    name: "arcee_fusion",
    params: &[],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 2,
    max_models: Some(2),
};

const QUANTILES: [f32; 3] = [0.5, 0.25, 0.75];

/// A u32 whose unsigned order is the order of the f32 (any sign).
#[inline]
fn skey(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline]
fn unkey(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|&v| v / s + 1e-8).collect()
}

fn pair<'a>(ctx: &TensorCtx, inputs: &[&'a [f32]]) -> KResult<(&'a [f32], Option<&'a [f32]>)> {
    let b = ctx.base_index("arcee_fusion")?;
    let base = *inputs
        .get(b)
        .ok_or_else(|| KernelError::missing("arcee_fusion: base input is missing"))?;
    match ctx.others().as_slice() {
        [] => Ok((base, None)),
        [o] => Ok((base, Some(inputs[*o]))),
        _ => Err(KernelError::shape(
            "arcee_fusion expects exactly two models (the base_model and one other)",
        )),
    }
}

/// Importance of every element of a range (vectors along the last dimension lie in a row).
fn importance(ctx: &TensorCtx, base: &[f32], x: &[f32]) -> Vec<f32> {
    let len = match ctx.shape.last() {
        Some(&l) if ctx.shape.len() >= 2 => l as usize,
        _ => ctx.row_len,
    }
    .max(1);
    let mut out = Vec::with_capacity(x.len());
    for (xv, bv) in x.chunks(len).zip(base.chunks(len)) {
        let p = softmax(xv);
        let q = softmax(bv);
        let kl: f32 = p.iter().zip(&q).map(|(&a, &b)| a * (a / b).ln()).sum();
        out.extend(xv.iter().zip(bv).map(|(&a, &b)| (a - b).abs() * kl));
    }
    out
}

fn ranks(ctx: &TensorCtx) -> Vec<Vec<u64>> {
    let n = ctx.numel().max(1);
    // the index q·(n-1) is computed in float32 and truncated, as mergekit does
    let r = QUANTILES
        .iter()
        .map(|&q| ((q * (n - 1) as f32) as u64).min(n - 1))
        .collect();
    vec![r]
}

impl Method for ArceeFusion {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        ctx.base_index("arcee_fusion")?;
        if ctx.n_models() != 2 {
            return Err(KernelError::shape(format!(
                "arcee_fusion expects exactly two models (the base_model and one other), got {}",
                ctx.n_models()
            )));
        }
        Ok(())
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        if ctx.n_models() == 2 && ctx.numel() > 0 {
            select::PASSES
        } else {
            0
        }
    }

    fn partial(
        &self,
        ctx: &TensorCtx,
        pass: u32,
        state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
    ) -> KResult<Stats> {
        let (base, Some(x)) = pair(ctx, inputs)? else {
            return Ok(Stats::default());
        };
        let keys: Vec<u32> = importance(ctx, base, x).into_iter().map(skey).collect();
        Ok(if pass == 0 {
            select::partial0(&[&keys])
        } else {
            select::partial1(state, &[&keys], &ranks(ctx))
        })
    }

    fn reduce(
        &self,
        ctx: &TensorCtx,
        pass: u32,
        state: Stats,
        partials: Vec<Stats>,
    ) -> KResult<Reduced> {
        if pass == 0 {
            Ok(Reduced::More(select::reduce0(
                &partials,
                &ranks(ctx),
                &[ctx.numel()],
            )?))
        } else {
            let s1 = select::reduce1(&state, &partials, &ranks(ctx))?;
            let qs: Vec<f32> = select::boundaries(&s1, 0)
                .iter()
                .map(|b| unkey(b.key))
                .collect();
            let [median, q1, q3] = qs[..] else {
                return Err(KernelError::missing("arcee_fusion: quantiles are missing"));
            };
            let threshold = median + 1.5 * (q3 - q1);
            Ok(Reduced::Done(Stats {
                values: vec![threshold as f64],
                ..Default::default()
            }))
        }
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let (base, Some(x)) = pair(ctx, inputs)? else {
            let (base, _) = pair(ctx, inputs)?;
            out.copy_from_slice(base);
            return Ok(());
        };
        let threshold = *state
            .values
            .first()
            .ok_or_else(|| KernelError::missing("arcee_fusion: threshold is missing"))?
            as f32;
        let imp = importance(ctx, base, x);
        for (((o, &b), &v), &i) in out.iter_mut().zip(base).zip(x).zip(&imp) {
            let keep = if i >= threshold { 1.0 } else { 0.0 };
            *o = b + (v - b) * keep;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn case(shape: &[u64]) -> Case {
        let mut c = Case::new(shape, 2).with_defaults(&ArceeFusion);
        c.base = Some(1);
        c
    }

    #[test]
    fn keys_order_floats() {
        let xs = [-3.0f32, -0.5, -0.0, 0.0, 1e-30, 2.0, 7.5];
        for w in xs.windows(2) {
            assert!(skey(w[0]) <= skey(w[1]));
        }
        for x in xs {
            assert_eq!(unkey(skey(x)).to_bits(), x.to_bits());
        }
    }

    #[test]
    fn hand_checked() {
        // one row of 4; the other model differs from the base in element 3 only, so the
        // importances are (0, 0, 0, d·KL): median = q1 = q3 = 0 -> threshold 0 -> all kept
        let c = case(&[4]);
        let base = vec![0.0, 0.0, 0.0, 0.0];
        let x = vec![0.0, 0.0, 0.0, 2.0];
        assert_eq!(
            run(&ArceeFusion, &c, &[x, base.clone()]),
            vec![0.0, 0.0, 0.0, 2.0]
        );
        // two rows; row 1 changes strongly, row 0 slightly: importance of row 0 is below the
        // threshold, so row 0 stays at the base
        let c = case(&[4, 2]);
        let base = vec![0.0; 8];
        let x = vec![0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 3.0, 0.0];
        let out = run(&ArceeFusion, &c, &[x, base]);
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0]);
    }

    #[test]
    fn whole_equals_cut() {
        for shape in [vec![37u64, 19], vec![101]] {
            let n = shape.iter().product::<u64>() as usize;
            let c = case(&shape);
            let ins = vec![data(n, 1, 1.0), data(n, 2, 1.0)];
            let whole = run(&ArceeFusion, &c, &ins);
            assert!(whole.iter().zip(&ins[1]).any(|(a, b)| a != b));
            for k in [1, 2, 5, 7, 36, 100] {
                let cut = run_cut(&ArceeFusion, &c, &ins, k);
                assert!(whole
                    .iter()
                    .zip(&cut)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn rejects_bad_models() {
        let mut c = case(&[3]);
        c.base = None;
        assert!(ArceeFusion
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("arcee_fusion needs a base_model"));
        let mut c = Case::new(&[3], 3).with_defaults(&ArceeFusion);
        c.base = Some(2);
        assert!(ArceeFusion
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("arcee_fusion expects exactly two"));
    }
}
