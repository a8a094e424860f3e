//! Generalized task arithmetic (placeholder: being written).
use super::{BaseRule, KResult, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx};

pub struct Gta {
    spec: MethodSpec,
}

macro_rules! gta {
    ($id:ident, $name:literal) => {
        pub static $id: Gta = Gta {
            spec: MethodSpec {
                name: $name,
                params: &[],
                tensor_params: &[ParamDef::required("weight")],
                base: BaseRule::Required,
                min_models: 2,
                max_models: None,
            },
        };
    };
}
gta!(TASK_ARITHMETIC, "task_arithmetic");
gta!(TIES, "ties");
gta!(DARE_LINEAR, "dare_linear");
gta!(DARE_TIES, "dare_ties");
gta!(BREADCRUMBS, "breadcrumbs");
gta!(BREADCRUMBS_TIES, "breadcrumbs_ties");
gta!(DELLA, "della");
gta!(DELLA_LINEAR, "della_linear");

impl Method for Gta {
    fn spec(&self) -> &MethodSpec {
        &self.spec
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
