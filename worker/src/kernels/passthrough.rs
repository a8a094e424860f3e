//! `passthrough`: copies the one input tensor, optionally multiplied by `scale`. Used with
//! `slices:` to stack layers of different models (frankenmerges).

use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx,
};

pub struct Passthrough;

static SPEC: MethodSpec = MethodSpec {
    name: "passthrough",
    params: &[],
    tensor_params: &[ParamDef::optional("scale")],
    base: BaseRule::Ignored,
    min_models: 1,
    max_models: Some(1),
};

impl Method for Passthrough {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        _state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let [x] = inputs else {
            return Err(KernelError::shape(format!(
                "passthrough takes exactly one model per tensor, got {}",
                inputs.len()
            )));
        };
        // scale defaults to NaN, meaning "not set"
        match ctx.model_param_opt(0, "scale").filter(|s| !s.is_nan()) {
            Some(s) => {
                let s = s as f32;
                for (o, &v) in out.iter_mut().zip(x.iter()) {
                    *o = v * s;
                }
            }
            None => out.copy_from_slice(x),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn copies_and_scales() {
        let mut c = Case::new(&[4], 1).with_defaults(&Passthrough);
        assert_eq!(
            run(&Passthrough, &c, &[vec![1.0, 2.0, 3.0, 4.0]]),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        c.model_params[0].insert("scale".into(), 0.5);
        assert_eq!(run(&Passthrough, &c, &[vec![2.0; 4]]), vec![1.0; 4]);
    }
}
