//! `sce`: Select, Calculate, Erase (Wan et al. 2024).
//!
//! With task vectors τᵢ = xᵢ - base:
//! 1. Select (when `select_topk` < 1): keep, in every τᵢ, only the elements where the variance
//!    of τ across models is among the k = ⌊nonzero·select_topk⌋ largest of the tensor
//!    (nonzero: elements of nonzero variance). Exact radix selection, ties broken by index.
//! 2. Calculate: model weights wᵢ = mean(τᵢ²) over the tensor, normalised to sum 1 (uniform
//!    when that sum is below 1e-6): an exact sum-of-squares pass.
//! 3. Erase: per element, models whose τ sign differs from the sign of Σᵢτᵢ are dropped, and
//!    out = base + Σ wᵢτᵢ / max(Σ wᵢ, 1e-6) over the models kept.
//!
//! Passes: selection (2, only when 0 < select_topk < 1) then the weights (1).

use super::exact::ExactSum;
use super::select::{self, Boundary, Cursor};
use super::stats::merge_sums;
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, Reduced, RowRange, Stats,
    TensorCtx,
};

pub struct Sce;

static SPEC: MethodSpec = MethodSpec {
    name: "sce",
    params: &[
        ParamDef::flag("int8_mask", false),
        ParamDef::with_default("select_topk", 1.0).within(0.0, 1.0),
    ],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 2,
    max_models: None,
};

/// What the selection step does for this tensor.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    KeepAll,
    KeepNone,
    Select,
}

fn mode(ctx: &TensorCtx) -> KResult<Mode> {
    let k = ctx.param("select_topk")?;
    Ok(if k >= 1.0 {
        Mode::KeepAll
    } else if k <= 0.0 {
        Mode::KeepNone
    } else {
        Mode::Select
    })
}

struct Tvs<'a> {
    base: &'a [f32],
    xs: Vec<&'a [f32]>,
}

impl<'a> Tvs<'a> {
    fn new(ctx: &TensorCtx, inputs: &[&'a [f32]]) -> KResult<Self> {
        let b = ctx.base_index("sce")?;
        let base = *inputs
            .get(b)
            .ok_or_else(|| KernelError::missing("sce: base input is missing"))?;
        Ok(Tvs {
            base,
            xs: ctx.others().into_iter().map(|i| inputs[i]).collect(),
        })
    }

    #[inline]
    fn tv(&self, i: usize, e: usize) -> f32 {
        self.xs[i][e] - self.base[e]
    }

    /// The variance of the task vectors across models at element `e` (population variance).
    #[inline]
    fn var(&self, e: usize) -> f32 {
        let n = self.xs.len() as f64;
        let mean = (0..self.xs.len())
            .map(|i| self.tv(i, e) as f64)
            .sum::<f64>()
            / n;
        let ss: f64 = (0..self.xs.len())
            .map(|i| {
                let d = self.tv(i, e) as f64 - mean;
                d * d
            })
            .sum();
        (ss / n) as f32
    }

    fn keys(&self) -> Vec<u32> {
        (0..self.base.len())
            .map(|e| select::key(self.var(e)))
            .collect()
    }
}

/// Yields, element by element, whether it is kept by the selection.
struct Keep<'b> {
    mode: Mode,
    cursor: Option<Cursor<'b>>,
}

impl Keep<'_> {
    #[inline]
    fn next(&mut self, key: impl FnOnce() -> u32) -> bool {
        match self.mode {
            Mode::KeepAll => true,
            Mode::KeepNone => false,
            // kept: ranks at or above the boundary n - k in ascending order
            Mode::Select => self.cursor.as_mut().is_some_and(|c| !c.below(key())),
        }
    }
}

fn boundary(state: &Stats) -> Option<Boundary> {
    select::boundaries(state.child(0), 0).into_iter().next()
}

impl Sce {
    fn weights_partial(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        rows: RowRange,
        t: &Tvs,
    ) -> KResult<Stats> {
        let b = boundary(state);
        let mut keep = Keep {
            mode: mode(ctx)?,
            cursor: b.as_ref().map(|b| Cursor::new(b, rows.index)),
        };
        let mut sums = vec![ExactSum::new(); t.xs.len()];
        for e in 0..t.base.len() {
            if keep.next(|| select::key(t.var(e))) {
                for (i, s) in sums.iter_mut().enumerate() {
                    let d = t.tv(i, e) as f64;
                    s.add(d * d);
                }
            }
        }
        Ok(Stats {
            sums,
            ..Default::default()
        })
    }
}

impl Method for Sce {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        let k = ctx.param("select_topk")?;
        if !(0.0..=1.0).contains(&k) {
            return Err(KernelError::param(format!(
                "sce: parameter select_topk must be in [0, 1], got {k}"
            )));
        }
        let m = ctx.param("int8_mask")?;
        if m != 0.0 && m != 1.0 {
            return Err(KernelError::param(format!(
                "sce: parameter int8_mask must be a boolean, got {m}"
            )));
        }
        ctx.base_index("sce")?;
        Ok(())
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        if ctx.others().is_empty() {
            return 0;
        }
        match mode(ctx) {
            Ok(Mode::Select) => select::PASSES + 1,
            _ => 1,
        }
    }

    fn partial(
        &self,
        ctx: &TensorCtx,
        pass: u32,
        state: &Stats,
        rows: RowRange,
        inputs: &[&[f32]],
    ) -> KResult<Stats> {
        let t = Tvs::new(ctx, inputs)?;
        let sel = mode(ctx)? == Mode::Select;
        match pass {
            0 if sel => {
                let keys = t.keys();
                let mut st = select::partial0(&[&keys]);
                st.counts
                    .push(keys.iter().filter(|&&k| k != 0).count() as u64);
                Ok(st)
            }
            1 if sel => {
                let keys = t.keys();
                let ranks = vec![state.counts.get(..1).unwrap_or_default().to_vec()];
                Ok(select::partial1(state.child(0), &[&keys], &ranks))
            }
            _ => self.weights_partial(ctx, state, rows, &t),
        }
    }

    fn reduce(
        &self,
        ctx: &TensorCtx,
        pass: u32,
        state: Stats,
        partials: Vec<Stats>,
    ) -> KResult<Reduced> {
        let sel = mode(ctx)? == Mode::Select;
        match pass {
            0 if sel => {
                let n = ctx.numel();
                let nonzero: u64 = partials.iter().filter_map(|p| p.counts.first()).sum();
                // k = int(nonzero * density), the product taken in float32 as torch does
                let density = ctx.param("select_topk")? as f32;
                let k = ((nonzero as f32 * density) as u64).min(n);
                let ranks = vec![vec![n - k]];
                let s0 = select::reduce0(&partials, &ranks, &[n])?;
                Ok(Reduced::More(Stats {
                    counts: vec![n - k],
                    children: vec![s0],
                    ..Default::default()
                }))
            }
            1 if sel => {
                let ranks = vec![state.counts.get(..1).unwrap_or_default().to_vec()];
                let s1 = select::reduce1(state.child(0), &partials, &ranks)?;
                Ok(Reduced::More(Stats {
                    children: vec![s1],
                    ..Default::default()
                }))
            }
            _ => {
                let n = ctx.numel().max(1) as f32;
                let means: Vec<f32> = merge_sums(&partials)
                    .iter()
                    .map(|s| s.value() as f32 / n)
                    .collect();
                let total: f32 = means.iter().sum();
                let m = ctx.others().len();
                let values = if total.abs() < 1e-6 {
                    vec![1.0 / m as f64; m]
                } else {
                    means.iter().map(|&w| (w / total) as f64).collect()
                };
                Ok(Reduced::Done(Stats {
                    values,
                    children: state.children,
                    ..Default::default()
                }))
            }
        }
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let t = Tvs::new(ctx, inputs)?;
        let m = t.xs.len();
        if m == 0 {
            out.copy_from_slice(t.base);
            return Ok(());
        }
        if state.values.len() != m {
            return Err(KernelError::missing("sce: statistics are missing"));
        }
        let w: Vec<f32> = state.values.iter().map(|&v| v as f32).collect();
        let b = boundary(state);
        let mut keep = Keep {
            mode: mode(ctx)?,
            cursor: b.as_ref().map(|b| Cursor::new(b, rows.index)),
        };
        let mut tv = vec![0f32; m];
        for (e, o) in out.iter_mut().enumerate() {
            let kept = keep.next(|| select::key(t.var(e)));
            let mut sum = 0f32;
            for (i, d) in tv.iter_mut().enumerate() {
                *d = if kept { t.tv(i, e) } else { 0.0 };
                sum += *d;
            }
            let majority = if sum >= 0.0 { 1.0 } else { -1.0 };
            let (mut num, mut den) = (0f32, 0f32);
            for (&d, &wi) in tv.iter().zip(&w) {
                let sign = if d > 0.0 {
                    1.0
                } else if d < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                let ew = if sign == majority { wi } else { 0.0 };
                num += d * ew;
                den += ew;
            }
            *o = t.base[e] + num / den.max(1e-6);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn case(shape: &[u64], n: usize, topk: f64) -> Case {
        let mut c = Case::new(shape, n).with_defaults(&Sce);
        c.base = Some(n - 1);
        c.params.insert("select_topk".into(), topk);
        c
    }

    #[test]
    fn hand_checked() {
        // task vectors a = (2, 1, -1, 0), b = (2, -3, 1, 0)
        // weights: mean squares 6/4 and 14/4 -> 0.3, 0.7
        let base = vec![0.0; 4];
        let a = vec![2.0, 1.0, -1.0, 0.0];
        let b = vec![2.0, -3.0, 1.0, 0.0];
        let out = run(
            &Sce,
            &case(&[4], 3, 1.0),
            &[a.clone(), b.clone(), base.clone()],
        );
        // e0: both agree -> (0.3*2 + 0.7*2)/1 = 2; e1: sum -2 -> only b: -3;
        // e2: sum 0 -> majority +, only b: 1; e3: 0
        let want = [2.0, -3.0, 1.0, 0.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
        // select_topk 0.5: variances (0, 4, 1, 0), nonzero 2 -> k = 1: only e1 kept.
        // Then weights: a: 1/4, b: 9/4 -> 0.1, 0.9; e1 -> only b: -3
        let out = run(&Sce, &case(&[4], 3, 0.5), &[a, b, base]);
        let want = [0.0, -3.0, 0.0, 0.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn whole_equals_cut() {
        for topk in [1.0, 0.5, 0.1, 0.0] {
            for shape in [vec![37u64, 19], vec![101]] {
                let n = shape.iter().product::<u64>() as usize;
                let c = case(&shape, 4, topk);
                let mut ins: Vec<Vec<f32>> = (0..4).map(|i| data(n, i + 1, 1.0)).collect();
                // ties in the variance
                for e in (0..n).step_by(3) {
                    ins[0][e] = 0.5;
                    ins[1][e] = 0.25;
                    ins[2][e] = 0.0;
                    ins[3][e] = 0.0;
                }
                let whole = run(&Sce, &c, &ins);
                for k in [1, 2, 5, 7, 36, 100] {
                    let cut = run_cut(&Sce, &c, &ins, k);
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
        let c = case(&[3], 3, 1.5);
        let e = Sce.check(&c.ctx()).unwrap_err();
        assert!(e.message().contains("sce: parameter select_topk"), "{e}");
        let mut c = case(&[3], 3, 0.5);
        c.base = None;
        assert!(Sce
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("sce needs a base_model"));
    }
}
