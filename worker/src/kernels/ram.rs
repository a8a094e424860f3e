//! `ram` and `ramplus_tl`: Reinforced Agent Merging.
//!
//! Task vectors τᵢ = xᵢ - base count as *contributing* at an element where |τᵢ| > `epsilon`.
//! An element changed by exactly one model takes that model's delta whole; one changed by
//! several takes the mean of the contributing deltas; one changed by none stays at the base.
//!
//! `ramplus_tl` additionally scales each model's unique deltas by λᵢ = 1 + r·clamp(ρᵢ, 0, α),
//! where ρᵢ = (elements model i shares with others) / (elements only model i changes), counted
//! over the whole tensor: one statistics pass of exact integer counts.

use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, Reduced, RowRange, Stats,
    TensorCtx,
};

pub struct Ram;
pub struct RamPlusTl;

static RAM_SPEC: MethodSpec = MethodSpec {
    name: "ram",
    params: &[ParamDef::with_default("epsilon", 1e-5).at_least(0.0)],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 2,
    max_models: None,
};

static RAMPLUS_SPEC: MethodSpec = MethodSpec {
    name: "ramplus_tl",
    params: &[
        ParamDef::with_default("r", 0.1),
        ParamDef::with_default("alpha", 0.2),
        ParamDef::with_default("epsilon", 1e-5).at_least(0.0),
    ],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 2,
    max_models: None,
};

fn check_common(method: &str, ctx: &TensorCtx) -> KResult<()> {
    let eps = ctx.param("epsilon")?;
    if !eps.is_finite() || eps < 0.0 {
        return Err(KernelError::param(format!(
            "{method}: parameter epsilon must be a finite number >= 0, got {eps}"
        )));
    }
    ctx.base_index(method)?;
    Ok(())
}

/// Per element: the delta of every non-base model, and which of them contribute.
struct Prepared<'a> {
    base: &'a [f32],
    others: Vec<&'a [f32]>,
    eps: f32,
}

impl<'a> Prepared<'a> {
    fn new(method: &str, ctx: &TensorCtx, inputs: &[&'a [f32]]) -> KResult<Self> {
        let b = ctx.base_index(method)?;
        let base = *inputs
            .get(b)
            .ok_or_else(|| KernelError::missing(format!("{method}: base input is missing")))?;
        let others = ctx.others().into_iter().map(|i| inputs[i]).collect();
        Ok(Prepared {
            base,
            others,
            eps: ctx.param("epsilon")? as f32,
        })
    }

    #[inline]
    fn delta(&self, i: usize, e: usize) -> f32 {
        self.others[i][e] - self.base[e]
    }

    /// How many models contribute at element `e`.
    #[inline]
    fn count(&self, e: usize) -> u32 {
        (0..self.others.len())
            .filter(|&i| self.delta(i, e).abs() > self.eps)
            .count() as u32
    }

    /// base + merged delta at element `e`; `lambda[i]` scales model i's unique deltas.
    #[inline]
    fn merged(&self, e: usize, lambda: Option<&[f32]>) -> f32 {
        let c = self.count(e);
        let mut acc = 0f32;
        for i in 0..self.others.len() {
            let d = self.delta(i, e);
            let dz = if d.abs() > self.eps { d } else { 0.0 };
            let unique = if c == 1 {
                dz * lambda.map_or(1.0, |l| l[i])
            } else {
                0.0
            };
            let shared = if c > 1 { dz / c as f32 } else { 0.0 };
            acc += unique + shared;
        }
        self.base[e] + acc
    }
}

impl Method for Ram {
    fn spec(&self) -> &MethodSpec {
        &RAM_SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        check_common("ram", ctx)
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        _state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let p = Prepared::new("ram", ctx, inputs)?;
        for (e, o) in out.iter_mut().enumerate() {
            *o = p.merged(e, None);
        }
        Ok(())
    }
}

impl Method for RamPlusTl {
    fn spec(&self) -> &MethodSpec {
        &RAMPLUS_SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        check_common("ramplus_tl", ctx)?;
        for name in ["r", "alpha"] {
            let v = ctx.param(name)?;
            if !v.is_finite() {
                return Err(KernelError::param(format!(
                    "ramplus_tl: parameter {name} must be a finite number, got {v}"
                )));
            }
        }
        Ok(())
    }

    fn passes(&self, _ctx: &TensorCtx) -> u32 {
        1
    }

    fn partial(
        &self,
        ctx: &TensorCtx,
        _pass: u32,
        _state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
    ) -> KResult<Stats> {
        let p = Prepared::new("ramplus_tl", ctx, inputs)?;
        let m = p.others.len();
        // counts[2i]: elements model i shares with others, counts[2i+1]: elements only it changes
        let mut counts = vec![0u64; 2 * m];
        for e in 0..p.base.len() {
            let c = p.count(e);
            if c == 0 {
                continue;
            }
            for i in 0..m {
                if p.delta(i, e).abs() > p.eps {
                    counts[2 * i + usize::from(c == 1)] += 1;
                }
            }
        }
        Ok(Stats {
            counts,
            ..Default::default()
        })
    }

    fn reduce(
        &self,
        _ctx: &TensorCtx,
        _pass: u32,
        _state: Stats,
        partials: Vec<Stats>,
    ) -> KResult<Reduced> {
        let mut counts: Vec<u64> = Vec::new();
        for p in &partials {
            if counts.len() < p.counts.len() {
                counts.resize(p.counts.len(), 0);
            }
            for (c, &x) in counts.iter_mut().zip(&p.counts) {
                *c += x;
            }
        }
        Ok(Reduced::Done(Stats {
            counts,
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
        let p = Prepared::new("ramplus_tl", ctx, inputs)?;
        let (r, alpha, eps) = (ctx.param("r")?, ctx.param("alpha")?, ctx.param("epsilon")?);
        let lambda: Vec<f32> = (0..p.others.len())
            .map(|i| {
                let shared = state.counts.get(2 * i).copied().unwrap_or(0) as f64;
                let unique = state.counts.get(2 * i + 1).copied().unwrap_or(0) as f64;
                // no shared and no unique elements: 0, as 0/max(0, eps) is for any eps > 0
                // (mergekit's 0/0 with `epsilon: 0` is NaN)
                let rho = if shared == 0.0 {
                    0.0
                } else {
                    shared / unique.max(eps)
                };
                // clamp(min=0, max=alpha) as torch does it: max first, then min
                let rho = if rho.is_nan() {
                    rho
                } else {
                    rho.max(0.0).min(alpha)
                };
                (1.0 + r * rho) as f32
            })
            .collect();
        for (e, o) in out.iter_mut().enumerate() {
            *o = p.merged(e, Some(&lambda));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn case(m: &dyn Method, shape: &[u64], n: usize) -> Case {
        let mut c = Case::new(shape, n).with_defaults(m);
        c.base = Some(n - 1);
        c
    }

    #[test]
    fn hand_checked_ram() {
        let mut c = case(&Ram, &[4], 3);
        c.params.insert("epsilon".into(), 0.1);
        let base = vec![1.0, 1.0, 1.0, 1.0];
        let a = vec![2.0, 1.05, 3.0, 1.0];
        let b = vec![1.0, 1.5, 5.0, 1.0];
        // e0: only a (delta 1), e1: only b (a's 0.05 is below epsilon), e2: both, mean 3
        let out = run(&Ram, &c, &[a, b, base]);
        assert_eq!(out, vec![2.0, 1.5, 4.0, 1.0]);
    }

    #[test]
    fn hand_checked_ramplus() {
        let mut c = case(&RamPlusTl, &[4], 3);
        c.params.insert("epsilon".into(), 0.1);
        c.params.insert("r".into(), 0.5);
        c.params.insert("alpha".into(), 0.2);
        let base = vec![0.0; 4];
        let a = vec![1.0, 0.0, 2.0, 2.0];
        let b = vec![0.0, 1.0, 4.0, 0.0];
        // a: shared 1, unique 2 -> rho 0.5 -> clamp 0.2 -> lambda 1.1
        // b: shared 1, unique 1 -> rho 1 -> lambda 1.1
        let out = run(&RamPlusTl, &c, &[a, b, base]);
        assert_eq!(out, vec![1.1, 1.1, 3.0, 2.2]);
    }

    #[test]
    fn whole_equals_cut() {
        for m in [&Ram as &dyn Method, &RamPlusTl] {
            for shape in [vec![37u64, 19], vec![101]] {
                let n = shape.iter().product::<u64>() as usize;
                let mut c = case(m, &shape, 4);
                c.params.insert("epsilon".into(), 0.3);
                let ins = vec![
                    data(n, 1, 1.0),
                    data(n, 2, 1.0),
                    data(n, 3, 0.5),
                    data(n, 4, 0.2),
                ];
                let whole = run(m, &c, &ins);
                for k in [1, 2, 5, 7, 36, 100] {
                    let cut = run_cut(m, &c, &ins, k);
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
        let mut c = case(&Ram, &[3], 2);
        c.params.insert("epsilon".into(), -1.0);
        let e = Ram.check(&c.ctx()).unwrap_err();
        assert!(
            e.message().contains("ram") && e.message().contains("epsilon"),
            "{e}"
        );
        let mut c = case(&RamPlusTl, &[3], 2);
        c.base = None;
        assert!(RamPlusTl
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("ramplus_tl needs a base_model"));
        let mut c = case(&RamPlusTl, &[3], 2);
        c.params.insert("r".into(), f64::NAN);
        assert!(RamPlusTl
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("parameter r"));
    }
}
