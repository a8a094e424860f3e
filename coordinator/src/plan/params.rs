//! A recipe's parameters checked against the merge method's declaration
//! ([`MethodSpec`]: each parameter's name and type, declared once with the kernel): an unknown
//! name, or a value that is not of the parameter's type (a boolean that is not true or false,
//! an integer with a fraction, a number out of its range), is refused naming the recipe key and
//! the method, before any input is read.

use shardmerge_worker::kernels::{MethodSpec, ParamDef, ParamType};

use crate::error::{Error, Result};
use crate::recipe::{Recipe, Setting};

/// Checks every parameter the recipe sets against `spec`.
pub(super) fn check(recipe: &Recipe, spec: &MethodSpec) -> Result<()> {
    for (site, name, setting) in recipe.parameter_sites() {
        let key = format!("{site}.{name}");
        let Some(def) = spec
            .params
            .iter()
            .chain(spec.tensor_params)
            .find(|p| p.name == name)
        else {
            return Err(unknown(spec, &key, name));
        };
        check_setting(spec, def, &key, setting)?;
    }
    Ok(())
}

fn unknown(spec: &MethodSpec, key: &str, name: &str) -> Error {
    let takes: Vec<&str> = spec
        .params
        .iter()
        .chain(spec.tensor_params)
        .map(|p| p.name)
        .collect();
    Error::recipe(
        key,
        format!(
            "unknown parameter `{name}` for merge_method {} (it takes: {})",
            spec.name,
            if takes.is_empty() {
                "none".to_string()
            } else {
                takes.join(", ")
            }
        ),
    )
}

/// Every value `setting` can take is of `def`'s type. A gradient's values lie between its
/// points, so its points are checked for a range; a boolean or an integer cannot vary along a
/// gradient (its values between two different points would be fractions).
fn check_setting(spec: &MethodSpec, def: &ParamDef, key: &str, setting: &Setting) -> Result<()> {
    let refuse = |key: &str, why: String| {
        Error::recipe(
            key,
            format!("merge_method {}: parameter {} {why}", spec.name, def.name),
        )
    };
    match setting {
        Setting::Scalar(v) => match def.ty.refuse(*v) {
            Some(why) => Err(refuse(key, why)),
            None => Ok(()),
        },
        Setting::Gradient(points) => {
            for (i, v) in points.iter().enumerate() {
                if let Some(why) = def.ty.refuse(*v) {
                    return Err(refuse(&format!("{key}[{i}]"), why));
                }
            }
            let varies = points.windows(2).any(|w| w[0] != w[1]);
            if varies && !matches!(def.ty, ParamType::Number { .. }) {
                return Err(refuse(
                    key,
                    format!("({}) cannot be a gradient of different values", def.ty),
                ));
            }
            Ok(())
        }
        Setting::Filtered(entries) => {
            for (i, (_, s)) in entries.iter().enumerate() {
                check_setting(spec, def, &format!("{key}[{i}].value"), s)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use shardmerge_worker::kernels;

    use crate::recipe::Recipe;

    /// The planner's check of `text`'s parameters against its method's declaration.
    fn check(text: &str) -> Result<(), String> {
        let r = Recipe::parse(text).map_err(|e| e.to_string())?;
        let m = kernels::method(&r.merge_method).expect("a known method");
        super::check(&r, m.spec()).map_err(|e| e.to_string())
    }

    const TIES: &str = "merge_method: breadcrumbs\nbase_model: a\nmodels:\n- model: a\n- model: b\n  parameters:\n    weight: 1\n";

    #[test]
    fn values_of_the_declared_type_pass() {
        for ok in [
            "merge_method: linear\nparameters:\n  normalize: true\nmodels:\n- model: a\n  parameters:\n    weight: 1\n",
            "merge_method: linear\nparameters:\n  normalize: 0\nmodels:\n- model: a\n  parameters:\n    weight: [0, 1]\n",
            "merge_method: karcher\nparameters:\n  max_iter: 30\n  tol: 0\nmodels:\n- model: a\n",
            "merge_method: sce\nbase_model: a\nparameters:\n  select_topk:\n  - filter: mlp\n    value: 0.5\n  - value: 1\nmodels:\n- model: b\n",
            "merge_method: linear\nparameters:\n  normalize: [1, 1]\nmodels:\n- model: a\n  parameters:\n    weight: 1\n",
        ] {
            check(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        check(TIES).unwrap();
    }

    /// Before the declarations had types, `normalize: 0.5` was taken as true and `max_iter:
    /// 2.5` reached the kernel; each is refused now, naming the key, the method and the type.
    #[test]
    fn values_of_another_type_are_refused_naming_key_method_and_reason() {
        let cases = [
            (
                "merge_method: linear\nparameters:\n  normalize: 0.5\nmodels:\n- model: a\n  parameters:\n    weight: 1\n".to_string(),
                "recipe: parameters.normalize: merge_method linear: parameter normalize must be a boolean (true or false), got 0.5",
            ),
            (
                TIES.replace("weight: 1\n", "weight: 1\n    gamma: 2\n"),
                "recipe: models[1].parameters.gamma: merge_method breadcrumbs: parameter gamma must be in [0, 1], got 2",
            ),
            (
                "merge_method: karcher\nparameters:\n  max_iter: 2.5\nmodels:\n- model: a\n".into(),
                "recipe: parameters.max_iter: merge_method karcher: parameter max_iter must be an integer in [0, 1000000000], got 2.5",
            ),
            (
                "merge_method: linear\nparameters:\n  normalize: [0, 1]\nmodels:\n- model: a\n  parameters:\n    weight: 1\n".into(),
                "recipe: parameters.normalize: merge_method linear: parameter normalize (boolean) cannot be a gradient of different values",
            ),
            (
                "merge_method: slerp\nbase_model: a\nparameters:\n  t: [0, 1.5]\nmodels:\n- model: a\n- model: b\n".into(),
                "recipe: parameters.t[1]: merge_method slerp: parameter t must be in [0, 1], got 1.5",
            ),
            (
                "merge_method: sce\nbase_model: a\nparameters:\n  select_topk:\n  - filter: mlp\n    value: -1\nmodels:\n- model: b\n".into(),
                "recipe: parameters.select_topk[0].value: merge_method sce: parameter select_topk must be in [0, 1], got -1",
            ),
            (
                "merge_method: nearswap\nbase_model: a\nmodels:\n- model: a\n- model: b\n  parameters:\n    t: -0.5\n".into(),
                "recipe: models[1].parameters.t: merge_method nearswap: parameter t must be >= 0, got -0.5",
            ),
            (
                TIES.replace("weight: 1\n", "wieght: 1\n"),
                "recipe: models[1].parameters.wieght: unknown parameter `wieght` for merge_method breadcrumbs (it takes: int8_mask, normalize, rescale, lambda, weight, density, gamma)",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(check(&text).unwrap_err(), want, "{text}");
        }
    }
}
