//! The eight methods as [`Config`]s of [`Gta`], with their parameters and defaults.

use super::super::{BaseRule, MethodSpec, ParamDef};
use super::{Config, Gta, Sparsify};

const TP_PLAIN: &[ParamDef] = &[
    ParamDef::required("weight"),
    ParamDef::with_default("density", 1.0),
];
const TP_GAMMA: &[ParamDef] = &[
    ParamDef::required("weight"),
    ParamDef::with_default("density", 1.0),
    ParamDef::with_default("gamma", 0.01).within(0.0, 1.0),
];
const TP_EPSILON: &[ParamDef] = &[
    ParamDef::required("weight"),
    ParamDef::with_default("density", 1.0),
    ParamDef::with_default("epsilon", 0.15),
];

macro_rules! gta {
    ($id:ident, $name:literal, $sp:ident, $cons:literal, normalize = $norm:literal, rescale = $resc:literal, $tp:ident) => {
        pub static $id: Gta = Gta {
            spec: MethodSpec {
                name: $name,
                params: &[
                    ParamDef::flag("int8_mask", false),
                    ParamDef::flag("normalize", $norm),
                    ParamDef::flag("rescale", $resc),
                    ParamDef::with_default("lambda", 1.0),
                ],
                tensor_params: $tp,
                base: BaseRule::Required,
                min_models: 2,
                max_models: None,
            },
            cfg: Config {
                sparsify: Sparsify::$sp,
                consensus: $cons,
            },
        };
    };
}

gta!(
    TASK_ARITHMETIC,
    "task_arithmetic",
    None,
    false,
    normalize = false,
    rescale = false,
    TP_PLAIN
);
gta!(
    TIES,
    "ties",
    Magnitude,
    true,
    normalize = true,
    rescale = false,
    TP_PLAIN
);
gta!(
    DARE_TIES,
    "dare_ties",
    Random,
    true,
    normalize = false,
    rescale = true,
    TP_PLAIN
);
gta!(
    DARE_LINEAR,
    "dare_linear",
    Random,
    false,
    normalize = false,
    rescale = true,
    TP_PLAIN
);
gta!(
    BREADCRUMBS,
    "breadcrumbs",
    Outliers,
    false,
    normalize = false,
    rescale = false,
    TP_GAMMA
);
gta!(
    BREADCRUMBS_TIES,
    "breadcrumbs_ties",
    Outliers,
    true,
    normalize = false,
    rescale = false,
    TP_GAMMA
);
gta!(
    DELLA,
    "della",
    Della,
    true,
    normalize = true,
    rescale = true,
    TP_EPSILON
);
gta!(
    DELLA_LINEAR,
    "della_linear",
    Della,
    false,
    normalize = false,
    rescale = true,
    TP_EPSILON
);
