//! `nearswap`: moves the base towards the other model only where the two are already close.
//!
//! For each element, w = clamp(t / max(|base - other|, 1e-6), 0, 1) and
//! out = w·other + (1 - w)·base: elements that differ by less than `t` are taken from the other
//! model outright, larger differences are interpolated less and less. As torch evaluates it
//! (bit for bit with mergekit): `t / d` is `d.reciprocal() * t`, each product and the sum
//! rounded.

use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx,
};

pub struct NearSwap;

static SPEC: MethodSpec = MethodSpec {
    name: "nearswap",
    params: &[ParamDef::required("t").at_least(0.0)],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 2,
    max_models: Some(2),
};

impl Method for NearSwap {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        let t = ctx.param("t")?;
        if !t.is_finite() || t < 0.0 {
            return Err(KernelError::param(format!(
                "nearswap: parameter t must be a finite number >= 0, got {t}"
            )));
        }
        ctx.base_index("nearswap")?;
        if ctx.n_models() != 2 {
            return Err(KernelError::shape(format!(
                "nearswap expects exactly two models (the base_model and one other), got {}",
                ctx.n_models()
            )));
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
        let base = ctx.base_index("nearswap")?;
        let others = ctx.others();
        let a = inputs
            .get(base)
            .ok_or_else(|| KernelError::missing("nearswap: base input is missing"))?;
        let b = match others.as_slice() {
            [] => {
                out.copy_from_slice(a);
                return Ok(());
            }
            [o] => inputs[*o],
            _ => {
                return Err(KernelError::shape(
                    "nearswap expects exactly two models, one base and one other",
                ));
            }
        };
        let t = ctx.param("t")? as f32;
        for ((o, &x), &y) in out.iter_mut().zip(a.iter()).zip(b.iter()) {
            let d = (x - y).abs().max(1e-6);
            // torch evaluates `t / tensor` as `tensor.reciprocal() * t`: two roundings
            let w = (d.recip() * t).clamp(0.0, 1.0);
            *o = w * y + (1.0 - w) * x;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn case(shape: &[u64], t: f64) -> Case {
        let mut c = Case::new(shape, 2).with_defaults(&NearSwap);
        c.base = Some(1);
        c.params.insert("t".into(), t);
        c
    }

    #[test]
    fn hand_checked() {
        let c = case(&[4], 0.5);
        // diffs: 0.25 (w=1), 1 (w=0.5), 2 (w=0.25), 0 (w=1)
        let other = vec![1.25, 2.0, 3.0, 7.0];
        let base = vec![1.0, 1.0, 1.0, 7.0];
        let out = run(&NearSwap, &c, &[other, base]);
        assert_eq!(out, vec![1.25, 1.5, 1.5, 7.0]);
    }

    #[test]
    fn whole_equals_cut() {
        for shape in [vec![37u64, 19], vec![101]] {
            let n = shape.iter().product::<u64>() as usize;
            let c = case(&shape, 0.3);
            let ins = vec![data(n, 1, 1.0), data(n, 2, 1.0)];
            let whole = run(&NearSwap, &c, &ins);
            for k in [1, 2, 5, 7, 36, 100] {
                let cut = run_cut(&NearSwap, &c, &ins, k);
                assert!(whole
                    .iter()
                    .zip(&cut)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn rejects_bad_params() {
        let c = case(&[3], -1.0);
        let e = NearSwap.check(&c.ctx()).unwrap_err();
        assert!(
            e.message().contains("nearswap") && e.message().contains(" t "),
            "{e}"
        );
        let mut c = case(&[3], 0.1);
        c.base = None;
        assert!(NearSwap
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("base_model"));
        let mut c = Case::new(&[3], 3).with_defaults(&NearSwap);
        c.base = Some(0);
        c.params.insert("t".into(), 0.1);
        assert!(NearSwap.check(&c.ctx()).is_err());
    }
}
