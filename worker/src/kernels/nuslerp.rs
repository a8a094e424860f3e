//! `nuslerp`: spherical interpolation of two models (or of their task vectors from a base).
//!
//! t = w₁ / (w₀ + w₁) (0.5 when the weights sum to about zero). With a base model the two
//! task vectors xᵢ - base are interpolated and the base added back. The vectors interpolated
//! are, per `nuslerp_flatten` / `nuslerp_row_wise`:
//! - flatten (default): the whole tensor is one vector: one statistics pass (exact sums of
//!   ‖v₀‖², ‖v₁‖², v₀·v₁);
//! - neither: each slice along the last dimension (inside a row, no pass);
//! - row_wise: each slice along the *first* dimension, i.e. a column of the stored 2-D view:
//!   one pass with exact sums per column. (A 1-D tensor is a single vector either way.)
//!
//! For a vector pair, cos θ = v̂₀·v̂₁ (norms clamped at 1e-7) and
//! out = (sin((1-t)θ)·v₀ + sin(tθ)·v₁) / sin θ, or (1-t)·v₀ + t·v₁ when |sin θ| < 1e-8.

use super::exact::ExactSum;
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx,
};

pub struct NuSlerp;

static SPEC: MethodSpec = MethodSpec {
    name: "nuslerp",
    params: &[
        ParamDef::flag("nuslerp_row_wise", false),
        ParamDef::flag("nuslerp_flatten", true),
    ],
    tensor_params: &[ParamDef::required("weight")],
    base: BaseRule::Optional,
    min_models: 2,
    max_models: Some(3),
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// The whole tensor is one vector.
    Flat,
    /// Vectors are contiguous runs of this length.
    Runs(usize),
    /// Vectors are the columns of the rows × row_len view.
    Columns,
}

fn layout(ctx: &TensorCtx) -> KResult<Layout> {
    let flatten = ctx.flag("nuslerp_flatten")?;
    let row_wise = ctx.flag("nuslerp_row_wise")?;
    Ok(if flatten {
        Layout::Flat
    } else if ctx.shape.len() < 2 {
        // transposing a 1-D tensor changes nothing: the single row is the vector
        Layout::Runs(ctx.row_len)
    } else if row_wise {
        Layout::Columns
    } else {
        Layout::Runs(ctx.shape.last().copied().unwrap_or(1) as usize)
    })
}

/// Interpolation coefficients for one vector pair from ‖v₀‖², ‖v₁‖², v₀·v₁.
#[derive(Clone, Copy)]
enum Coef {
    Slerp { a: f32, b: f32, s: f32 },
    Lerp { a: f32, b: f32 },
}

fn coef(t: f32, n00: f64, n11: f64, n01: f64) -> Coef {
    let n0 = (n00.sqrt() as f32).max(1e-7) as f64;
    let n1 = (n11.sqrt() as f32).max(1e-7) as f64;
    let cos = (n01 / (n0 * n1)).clamp(-1.0, 1.0) as f32;
    let theta = cos.acos();
    let s = theta.sin();
    if s.abs() < 1e-8 {
        Coef::Lerp { a: 1.0 - t, b: t }
    } else {
        Coef::Slerp {
            a: ((1.0 - t) * theta).sin(),
            b: (t * theta).sin(),
            s,
        }
    }
}

impl Coef {
    #[inline]
    fn at(&self, v0: f32, v1: f32) -> f32 {
        match *self {
            Coef::Slerp { a, b, s } => (a * v0 + b * v1) / s,
            Coef::Lerp { a, b } => a * v0 + b * v1,
        }
    }
}

/// The inputs seen as the two vectors to interpolate (task vectors when there is a base).
struct Pair<'a> {
    x0: &'a [f32],
    x1: &'a [f32],
    base: Option<&'a [f32]>,
}

impl<'a> Pair<'a> {
    fn new(ctx: &TensorCtx, inputs: &[&'a [f32]]) -> KResult<Option<Self>> {
        let others = ctx.others();
        let base = match ctx.base {
            Some(b) => Some(
                *inputs
                    .get(b)
                    .ok_or_else(|| KernelError::missing("nuslerp: base input is missing"))?,
            ),
            None => None,
        };
        match others.as_slice() {
            [_] if base.is_none() => Ok(None),
            [i, j] => Ok(Some(Pair {
                x0: inputs[*i],
                x1: inputs[*j],
                base,
            })),
            _ => Err(KernelError::shape(format!(
                "nuslerp expects exactly two models plus an optional base_model (which can not be one of the two), got {} other model(s)",
                others.len()
            )
            )),
        }
    }

    #[inline]
    fn v(&self, e: usize) -> (f32, f32) {
        match self.base {
            Some(b) => (self.x0[e] - b[e], self.x1[e] - b[e]),
            None => (self.x0[e], self.x1[e]),
        }
    }

    #[inline]
    fn finish(&self, e: usize, r: f32) -> f32 {
        match self.base {
            Some(b) => b[e] + r,
            None => r,
        }
    }
}

fn interp_t(ctx: &TensorCtx) -> KResult<f32> {
    let others = ctx.others();
    let (Some(&i), Some(&j)) = (others.first(), others.get(1)) else {
        return Ok(0.5);
    };
    let w0 = ctx.model_param(i, "weight")?;
    let w1 = ctx.model_param(j, "weight")?;
    let sum = w0 + w1;
    Ok(if sum.abs() < 1e-6 {
        0.5
    } else {
        (w1 / sum) as f32
    })
}

fn add3(sums: &mut [ExactSum], v0: f32, v1: f32) {
    let (a, b) = (v0 as f64, v1 as f64);
    sums[0].add(a * a);
    sums[1].add(b * b);
    sums[2].add(a * b);
}

impl Method for NuSlerp {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        for name in ["nuslerp_row_wise", "nuslerp_flatten"] {
            let v = ctx.param(name)?;
            if v != 0.0 && v != 1.0 {
                return Err(KernelError::param(format!(
                    "nuslerp: parameter {name} must be a boolean, got {v}"
                )));
            }
        }
        let others = ctx.others();
        if others.len() != 2 {
            return Err(KernelError::shape(format!(
                "nuslerp expects exactly two models plus an optional base_model, got {} model(s) besides the base",
                others.len()
            )
            ));
        }
        for &i in &others {
            let w = ctx.model_param(i, "weight")?;
            if !w.is_finite() {
                return Err(KernelError::param(format!(
                    "nuslerp: parameter weight must be a finite number, got {w}"
                )));
            }
        }
        Ok(())
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        match layout(ctx) {
            Ok(Layout::Flat) | Ok(Layout::Columns) => 1,
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
        let Some(p) = Pair::new(ctx, inputs)? else {
            return Ok(Stats::default());
        };
        let n = p.x0.len();
        let sums = match layout(ctx)? {
            Layout::Columns => {
                let rl = ctx.row_len;
                let mut sums = vec![ExactSum::new(); 3 * rl];
                for e in 0..n {
                    let (v0, v1) = p.v(e);
                    let c = e % rl;
                    add3(&mut sums[3 * c..3 * c + 3], v0, v1);
                }
                sums
            }
            _ => {
                let mut sums = vec![ExactSum::new(); 3];
                for e in 0..n {
                    let (v0, v1) = p.v(e);
                    add3(&mut sums, v0, v1);
                }
                sums
            }
        };
        Ok(Stats {
            sums,
            ..Default::default()
        })
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let Some(p) = Pair::new(ctx, inputs)? else {
            // a single model: mergekit returns it unchanged
            let i = ctx.others().first().copied().unwrap_or(0);
            out.copy_from_slice(
                inputs
                    .get(i)
                    .ok_or_else(|| KernelError::missing("nuslerp: no input"))?,
            );
            return Ok(());
        };
        let t = interp_t(ctx)?;
        let stat = |i: usize| -> KResult<f64> {
            state
                .values
                .get(i)
                .copied()
                .ok_or_else(|| KernelError::missing("nuslerp: statistics are missing"))
        };
        match layout(ctx)? {
            Layout::Flat => {
                let c = coef(t, stat(0)?, stat(1)?, stat(2)?);
                for (e, o) in out.iter_mut().enumerate() {
                    let (v0, v1) = p.v(e);
                    *o = p.finish(e, c.at(v0, v1));
                }
            }
            Layout::Columns => {
                let rl = ctx.row_len;
                let cs: Vec<Coef> = (0..rl)
                    .map(|c| Ok(coef(t, stat(3 * c)?, stat(3 * c + 1)?, stat(3 * c + 2)?)))
                    .collect::<KResult<_>>()?;
                for (e, o) in out.iter_mut().enumerate() {
                    let (v0, v1) = p.v(e);
                    *o = p.finish(e, cs[e % rl].at(v0, v1));
                }
            }
            Layout::Runs(len) => {
                let len = len.max(1);
                let mut s = 0;
                while s < out.len() {
                    let end = (s + len).min(out.len());
                    let mut sums = vec![ExactSum::new(); 3];
                    for e in s..end {
                        let (v0, v1) = p.v(e);
                        add3(&mut sums, v0, v1);
                    }
                    let c = coef(t, sums[0].value(), sums[1].value(), sums[2].value());
                    for (e, o) in out.iter_mut().enumerate().take(end).skip(s) {
                        let (v0, v1) = p.v(e);
                        *o = p.finish(e, c.at(v0, v1));
                    }
                    s = end;
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

    fn case(shape: &[u64], base: bool, flatten: bool, row_wise: bool) -> Case {
        let n = if base { 3 } else { 2 };
        let mut c = Case::new(shape, n).with_defaults(&NuSlerp);
        if base {
            c.base = Some(2);
        }
        c.params
            .insert("nuslerp_flatten".into(), flatten as u8 as f64);
        c.params
            .insert("nuslerp_row_wise".into(), row_wise as u8 as f64);
        c.model_params[0].insert("weight".into(), 0.3);
        c.model_params[1].insert("weight".into(), 0.7);
        c
    }

    #[test]
    fn hand_checked() {
        // orthogonal unit vectors, t = 0.5: both coefficients sin(pi/4) / 1
        let c = case(&[2], false, true, false);
        let mut c = c;
        c.model_params[1].insert("weight".into(), 0.3);
        let out = run(&NuSlerp, &c, &[vec![1.0, 0.0], vec![0.0, 1.0]]);
        let h = std::f32::consts::FRAC_PI_4.sin();
        assert!(
            (out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6,
            "{out:?}"
        );
        // with a base: the same around base (1, 1)
        let mut c = case(&[2], true, true, false);
        c.model_params[1].insert("weight".into(), 0.3);
        let out = run(
            &NuSlerp,
            &c,
            &[vec![2.0, 1.0], vec![1.0, 2.0], vec![1.0, 1.0]],
        );
        assert!(
            (out[0] - 1.0 - h).abs() < 1e-6 && (out[1] - 1.0 - h).abs() < 1e-6,
            "{out:?}"
        );
        // row-wise: columns are the vectors. Column 0: (1,0) vs (0,1); column 1 colinear -> lerp
        let mut c = case(&[2, 2], false, false, true);
        c.model_params[1].insert("weight".into(), 0.3);
        let out = run(
            &NuSlerp,
            &c,
            &[vec![1.0, 2.0, 0.0, 0.0], vec![0.0, 4.0, 1.0, 0.0]],
        );
        assert!(
            (out[0] - h).abs() < 1e-6 && (out[2] - h).abs() < 1e-6,
            "{out:?}"
        );
        assert_eq!((out[1], out[3]), (3.0, 0.0));
        // not flattened, not row-wise: rows are the vectors
        let mut c = case(&[2, 2], false, false, false);
        c.model_params[1].insert("weight".into(), 0.3);
        let out = run(
            &NuSlerp,
            &c,
            &[vec![1.0, 0.0, 2.0, 0.0], vec![0.0, 1.0, 4.0, 0.0]],
        );
        assert!(
            (out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6,
            "{out:?}"
        );
        assert_eq!((out[2], out[3]), (3.0, 0.0));
    }

    #[test]
    fn whole_equals_cut() {
        for base in [false, true] {
            for (flatten, row_wise) in [(true, false), (false, false), (false, true), (true, true)]
            {
                for shape in [vec![37u64, 19], vec![101], vec![7, 3, 5]] {
                    let n = shape.iter().product::<u64>() as usize;
                    let c = case(&shape, base, flatten, row_wise);
                    let mut ins = vec![data(n, 1, 1.0), data(n, 2, 1.0)];
                    if base {
                        ins.push(data(n, 3, 0.5));
                    }
                    let whole = run(&NuSlerp, &c, &ins);
                    for k in [1, 2, 5, 7, 36, 100] {
                        let cut = run_cut(&NuSlerp, &c, &ins, k);
                        assert!(whole
                            .iter()
                            .zip(&cut)
                            .all(|(a, b)| a.to_bits() == b.to_bits()));
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_models_and_params() {
        let mut c = case(&[3], false, true, false);
        c.params.insert("nuslerp_flatten".into(), 0.5);
        assert!(NuSlerp
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("nuslerp_flatten"));
        // base given but only one other model
        let mut c = case(&[3], false, true, false);
        c.base = Some(1);
        assert!(NuSlerp
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("nuslerp expects exactly two"));
        let mut c = Case::new(&[3], 3).with_defaults(&NuSlerp);
        for m in &mut c.model_params {
            m.insert("weight".into(), 1.0);
        }
        assert!(NuSlerp.check(&c.ctx()).is_err());
    }
}
