//! `slerp`: spherical linear interpolation between the base model and one other model.
//!
//! Treating each whole tensor as one vector, out = sin((1−t)θ)/sin θ · base + sin(tθ)/sin θ · x,
//! where θ is the angle between the two tensors; when they are nearly colinear
//! (|cos θ| > 0.9995) it falls back to the plain lerp (1−t)·base + t·x. `t` = 0 gives the base.
//!
//! One statistics pass computes Σa², Σb², Σab exactly (products of f32 values are exact in
//! f64), so the angle, and thus every output bit, is the same however the tensor is cut. The
//! rest mirrors mergekit's numpy float32 arithmetic: norms rounded to f32 with the 1e-8 guard
//! (a tensor whose norm is at most 1e-8 is used unnormalised), the angle in f32.

use super::dot::DotSum;
use super::stats::sum_values;
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, Reduced, RowRange, Stats,
    TensorCtx,
};

pub struct Slerp;

static SPEC: MethodSpec = MethodSpec {
    name: "slerp",
    params: &[ParamDef::required("t").within(0.0, 1.0)],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 2,
    max_models: Some(2),
};

const DOT_THRESHOLD: f64 = 0.9995;
const EPS: f32 = 1e-8;

/// (base input, other input), or `None` when the tensor has a single input (copied through).
fn pair(ctx: &TensorCtx) -> KResult<Option<(usize, usize)>> {
    let base = ctx.base_index("slerp")?;
    match ctx.n_models() {
        1 if base == 0 => Ok(None),
        2 if base < 2 => Ok(Some((base, 1 - base))),
        n => Err(KernelError::shape(format!(
            "slerp takes exactly two models, base included; got {n}"
        ))),
    }
}

/// The two interpolation coefficients (for base and other), from the reduced sums.
fn coefficients(t: f64, state: &Stats) -> KResult<(f32, f32)> {
    let [aa, bb, ab] = state.values.as_slice() else {
        return Err(KernelError::missing("slerp statistics are missing"));
    };
    let norm = |ss: f64| {
        let n = (ss as f32).sqrt();
        if n > EPS {
            n as f64
        } else {
            1.0
        }
    };
    let dot = ((ab / (norm(*aa) * norm(*bb))) as f32).clamp(-1.0, 1.0);
    let t = t as f32;
    if (dot as f64).abs() > DOT_THRESHOLD {
        return Ok((1.0 - t, t));
    }
    let theta = dot.acos();
    let sin = theta.sin();
    Ok((((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin))
}

impl Method for Slerp {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        pair(ctx)?;
        let t = ctx.param("t")?;
        // mergekit documents t as "between 0.0 and 1.0" and does not check it; outside that
        // range the formula extrapolates past both models (t = 1e30 is noise or infinities)
        if !(0.0..=1.0).contains(&t) {
            return Err(KernelError::param(format!(
                "t must be in [0, 1] (0 gives the base model, 1 the other model), got {t}"
            )));
        }
        Ok(())
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        match pair(ctx) {
            Ok(Some(_)) => 1,
            _ => 0,
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
        let Some((ia, ib)) = pair(ctx)? else {
            return Ok(Stats::default());
        };
        let (a, b) = match (inputs.get(ia), inputs.get(ib)) {
            (Some(a), Some(b)) if a.len() == b.len() => (*a, *b),
            _ => return Err(KernelError::shape("slerp needs two inputs of equal length")),
        };
        let (mut aa, mut bb, mut ab) = (DotSum::new(), DotSum::new(), DotSum::new());
        aa.add_products(a, a);
        bb.add_products(b, b);
        ab.add_products(a, b);
        Ok(Stats {
            sums: vec![aa.finish(), bb.finish(), ab.finish()],
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
        let reduced = sum_values(&partials);
        if reduced.values.len() != 3 {
            return Err(KernelError::internal("slerp partials are malformed"));
        }
        Ok(Reduced::Done(reduced))
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let Some((ia, ib)) = pair(ctx)? else {
            let x = inputs
                .first()
                .ok_or_else(|| KernelError::missing("slerp got no input"))?;
            if x.len() != out.len() {
                return Err(KernelError::shape(
                    "slerp input and output differ in length",
                ));
            }
            out.copy_from_slice(x);
            return Ok(());
        };
        let (a, b) = match (inputs.get(ia), inputs.get(ib)) {
            (Some(a), Some(b)) if a.len() == out.len() && b.len() == out.len() => (*a, *b),
            _ => {
                return Err(KernelError::shape(
                    "slerp needs two inputs as long as the output",
                ))
            }
        };
        let (s0, s1) = coefficients(ctx.param("t")?, state)?;
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = s0 * x + s1 * y;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn case(shape: &[u64], t: f64, base: usize) -> Case {
        let mut c = Case::new(shape, 2);
        c.base = Some(base);
        c.params.insert("t".into(), t);
        c
    }

    #[test]
    fn by_hand() {
        let (a, b) = (vec![1.0f32, 0.0], vec![0.0f32, 1.0]);
        let out = run(&Slerp, &case(&[2], 0.5, 0), &[a.clone(), b.clone()]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6,
            "{out:?}"
        );
        // t = 1/3 of the way from the base (input 1 here)
        let out = run(&Slerp, &case(&[2], 1.0 / 3.0, 1), &[a.clone(), b.clone()]);
        let (s, co) = (
            std::f32::consts::FRAC_PI_6.sin(),
            std::f32::consts::FRAC_PI_6.cos(),
        );
        assert!(
            (out[0] - s).abs() < 1e-6 && (out[1] - co).abs() < 1e-6,
            "{out:?}"
        );
        // t = 0 is the base
        assert_eq!(run(&Slerp, &case(&[2], 0.0, 0), &[a.clone(), b.clone()]), a);
        // colinear: lerp (norms differ, direction the same)
        let out = run(
            &Slerp,
            &case(&[3], 0.25, 0),
            &[vec![1.0, 2.0, 3.0], vec![2.0, 4.0, 6.0]],
        );
        assert_eq!(out, vec![1.25, 2.5, 3.75]);
        // a zero tensor is not normalised: dot 0, plain slerp coefficients
        let out = run(&Slerp, &case(&[2], 0.5, 0), &[vec![0.0, 0.0], b.clone()]);
        assert!((out[1] - h).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn refusals_say_what_was_wrong() {
        let kind = |c: &Case| match Slerp.check(&c.ctx()).unwrap_err() {
            KernelError::Param(_) => "param",
            KernelError::Shape(_) => "shape",
            KernelError::Missing(_) => "missing",
            KernelError::Numerical(_) | KernelError::Internal(_) => "other",
        };
        assert_eq!(kind(&case(&[2], 1e30, 0)), "param");
        let mut c = case(&[2], 0.5, 0);
        c.model_params.push(Default::default());
        assert_eq!(kind(&c), "shape");
        let mut c = case(&[2], 0.5, 0);
        c.params.clear();
        assert_eq!(kind(&c), "missing");
        let mut c = case(&[2], 0.5, 0);
        c.base = None;
        assert_eq!(kind(&c), "missing");
    }

    #[test]
    fn rejects_bad_inputs() {
        let mut c = case(&[2], 0.5, 0);
        c.base = None;
        assert!(Slerp.check(&c.ctx()).is_err());
        let mut c = Case::new(&[2], 3);
        c.base = Some(0);
        c.params.insert("t".into(), 0.5);
        assert!(Slerp.check(&c.ctx()).unwrap_err().message().contains("two"));
        let c = case(&[2], f64::INFINITY, 0);
        assert!(Slerp.check(&c.ctx()).unwrap_err().message().contains('t'));
        // t = 1e30 was accepted; the error gives the valid range
        for t in [1e30, 1.0 + 1e-9, -0.5] {
            let e = Slerp
                .check(&case(&[2], t, 0).ctx())
                .unwrap_err()
                .to_string();
            assert!(e.contains("[0, 1]") && e.contains(&format!("{t}")), "{e}");
        }
        for t in [0.0, 0.3, 1.0] {
            Slerp.check(&case(&[2], t, 0).ctx()).unwrap();
        }
    }

    #[test]
    fn whole_and_cut_are_bit_identical() {
        for shape in [vec![37u64, 19], vec![101], vec![5, 3, 7]] {
            let n: u64 = shape.iter().product();
            let a = data(n as usize, 5, 1.0);
            let b: Vec<f32> = data(n as usize, 6, 1.0)
                .iter()
                .zip(&a)
                .map(|(d, a)| a + d.round() * 0.5)
                .collect();
            for t in [0.3, 0.77] {
                let c = case(&shape, t, 1);
                let inputs = [a.clone(), b.clone()];
                let whole = run(&Slerp, &c, &inputs);
                for cut in [1u64, 2, 3, 5, 36] {
                    let part = run_cut(&Slerp, &c, &inputs, cut);
                    assert!(whole
                        .iter()
                        .zip(&part)
                        .all(|(x, y)| x.to_bits() == y.to_bits()));
                }
            }
        }
    }
}
