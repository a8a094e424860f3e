//! `linear`: a weighted average of the models (a "model soup").
//!
//! out = Σ wᵢ·xᵢ, divided by Σ wᵢ when `normalize` (default true).

use super::{BaseRule, KResult, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx};

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
}
