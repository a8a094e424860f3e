//! slerp (placeholder: being written).
use super::{BaseRule, KResult, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx};
pub struct Slerp;
static SPEC: MethodSpec = MethodSpec {
    name: "slerp",
    params: &[ParamDef::required("t")],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 2,
    max_models: Some(2),
};
impl Method for Slerp {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }
    fn apply(
        &self,
        _: &TensorCtx,
        _: &Stats,
        _: RowRange,
        _: &[&[f32]],
        _: &mut [f32],
    ) -> KResult<()> {
        Err("not yet".into())
    }
}
