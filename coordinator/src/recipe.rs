//! mergekit YAML recipes: parsing with errors that name the key and where it is, and parameter
//! resolution (four precedence levels, gradients across layers, filters).

use std::collections::BTreeMap;

use serde_yaml::Value;
use shardmerge_worker::format::dtype::DType;

use crate::error::{Error, Result};

/// A parameter value as written: a scalar, a gradient across layers, or filtered values.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Scalar(f64),
    Gradient(Vec<f64>),
    /// `- filter: mlp` / `value: ...`; the first matching entry wins (no filter matches all).
    Filtered(Vec<(Option<String>, Setting)>),
}

impl Setting {
    /// mergekit's evaluation: `t` in [0, 1] is the layer's position in its slice.
    pub fn eval(&self, tensor_name: &str, t: f64) -> Option<f64> {
        match self {
            Setting::Scalar(v) => Some(*v),
            Setting::Gradient(g) => {
                let scaled = t * (g.len() - 1) as f64;
                let i0 = (scaled.floor() as usize).min(g.len() - 1);
                let i1 = (i0 + 1).min(g.len() - 1);
                let frac = scaled - i0 as f64;
                Some((1.0 - frac) * g[i0] + frac * g[i1])
            }
            Setting::Filtered(conds) => {
                for (filter, v) in conds {
                    let hit = match filter.as_deref() {
                        None | Some("*") => true,
                        Some(f) => tensor_name.contains(f),
                    };
                    if hit {
                        return v.eval(tensor_name, t);
                    }
                }
                None
            }
        }
    }
}

pub type Params = BTreeMap<String, Setting>;

#[derive(Clone, Debug)]
pub struct Source {
    pub model: String,
    pub layer_range: Option<(u64, u64)>,
    pub params: Params,
}

#[derive(Clone, Debug)]
pub struct Slice {
    pub sources: Vec<Source>,
    pub base_model: Option<String>,
    pub params: Params,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    Base,
    Model(String),
}

#[derive(Clone, Debug)]
pub struct Recipe {
    pub merge_method: String,
    pub base_model: Option<String>,
    pub models: Option<Vec<Source>>,
    pub slices: Option<Vec<Slice>>,
    pub params: Params,
    pub dtype: Option<DType>,
    pub out_dtype: Option<DType>,
    pub tokenizer_source: Option<TokenizerSource>,
    pub random_seed: Option<u64>,
    /// The recipe as written, for the model card.
    pub text: String,
}

fn bad(path: &str, msg: impl std::fmt::Display) -> Error {
    Error::Recipe(format!("{path}: {msg}"))
}

fn as_map<'a>(v: &'a Value, path: &str) -> Result<&'a serde_yaml::Mapping> {
    v.as_mapping()
        .ok_or_else(|| bad(path, "expected a mapping (key: value pairs)"))
}

fn keys<'a>(
    m: &'a serde_yaml::Mapping,
    path: &str,
    allowed: &[&str],
) -> Result<BTreeMap<String, &'a Value>> {
    let mut out = BTreeMap::new();
    for (k, v) in m {
        let k = k
            .as_str()
            .ok_or_else(|| bad(path, format!("key {k:?} is not a string")))?;
        if !allowed.contains(&k) {
            return Err(bad(
                path,
                format!(
                    "unknown key `{k}` (expected one of: {})",
                    allowed.join(", ")
                ),
            ));
        }
        out.insert(k.to_string(), v);
    }
    Ok(out)
}

fn string(v: &Value, path: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(bad(path, "expected a string")),
    }
}

fn number(v: &Value, path: &str) -> Result<f64> {
    let x = match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| bad(path, "not a number"))?,
        Value::Bool(b) => return Ok(if *b { 1.0 } else { 0.0 }),
        _ => {
            return Err(bad(
                path,
                format!("expected a number or boolean, got {}", kind(v)),
            ))
        }
    };
    finite_f32(x).map_err(|why| bad(path, why))
}

/// A parameter value as the kernels will use it: finite and within f32's range (every kernel
/// computes in f32; a larger value would turn into infinity there).
fn finite_f32(x: f64) -> std::result::Result<f64, String> {
    if x.is_nan() {
        return Err("`.nan` is not a usable value: give a finite number".into());
    }
    if x.is_infinite() {
        return Err(format!(
            "`{}` is not a usable value: give a finite number",
            if x > 0.0 { ".inf" } else { "-.inf" }
        ));
    }
    if x.abs() > f32::MAX as f64 {
        return Err(format!(
            "{x:e} is beyond the range of a 32-bit float (at most {:e} in magnitude)",
            f32::MAX
        ));
    }
    Ok(x)
}

/// The line (from 1) of the first YAML alias (`*name` where a value starts), outside quotes and
/// comments. Aliases are refused: each one replays its anchor's whole content, so a chain of
/// them grows exponentially (a 2 KB recipe parsed into hundreds of megabytes).
fn alias_line(text: &str) -> Option<usize> {
    for (n, line) in text.lines().enumerate() {
        let b = line.as_bytes();
        let mut quote: Option<u8> = None;
        for i in 0..b.len() {
            let c = b[i];
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => {
                    let starts = i == 0 || b" \t[{,:-".contains(&b[i - 1]);
                    if c == b'#' && starts {
                        break;
                    }
                    if (c == b'"' || c == b'\'') && starts {
                        quote = Some(c);
                    } else if c == b'*'
                        && starts
                        && b.get(i + 1).is_some_and(|x| !b" \t,]}".contains(x))
                    {
                        return Some(n + 1);
                    }
                }
            }
        }
    }
    None
}

/// The largest recipe accepted, in bytes (`SHARDMERGE_MAX_RECIPE_BYTES`; default 1 MiB, far
/// above any real recipe: the largest frankenmerge recipes are tens of kilobytes).
pub fn max_recipe_bytes() -> usize {
    std::env::var("SHARDMERGE_MAX_RECIPE_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1 << 20)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn setting(v: &Value, path: &str) -> Result<Setting> {
    match v {
        Value::Sequence(items) if items.is_empty() => Err(bad(path, "empty list")),
        Value::Sequence(items) if items.iter().all(|i| i.is_mapping()) => {
            let mut conds = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                let m = keys(as_map(item, &p)?, &p, &["filter", "value"])?;
                let filter = m
                    .get("filter")
                    .map(|f| string(f, &format!("{p}.filter")))
                    .transpose()?;
                let value = m.get("value").ok_or_else(|| bad(&p, "missing `value`"))?;
                conds.push((filter, setting(value, &format!("{p}.value"))?));
            }
            Ok(Setting::Filtered(conds))
        }
        Value::Sequence(items) => Ok(Setting::Gradient(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| number(x, &format!("{path}[{i}]")))
                .collect::<Result<_>>()?,
        )),
        other => Ok(Setting::Scalar(number(other, path)?)),
    }
}

fn params(v: Option<&&Value>, path: &str) -> Result<Params> {
    let mut out = Params::new();
    let Some(v) = v else { return Ok(out) };
    if v.is_null() {
        return Ok(out);
    }
    for (k, val) in as_map(v, path)? {
        let k = k
            .as_str()
            .ok_or_else(|| bad(path, "parameter names must be strings"))?;
        out.insert(k.to_string(), setting(val, &format!("{path}.{k}"))?);
    }
    Ok(out)
}

fn model_ref(v: &Value, path: &str) -> Result<String> {
    let s = string(v, path)?;
    if s.contains('+') {
        return Err(bad(
            path,
            format!("`{s}`: LoRA references (model+lora) are not supported yet"),
        ));
    }
    if s.trim().is_empty() {
        return Err(bad(path, "empty model reference"));
    }
    Ok(s)
}

fn dtype(v: &Value, path: &str) -> Result<DType> {
    let s = string(v, path)?;
    DType::from_recipe(&s).ok_or_else(|| {
        bad(
            path,
            format!("unsupported dtype `{s}` (use float32, float16 or bfloat16)"),
        )
    })
}

fn source(v: &Value, path: &str, with_range: bool) -> Result<Source> {
    let allowed: &[&str] = if with_range {
        &["model", "layer_range", "parameters"]
    } else {
        &["model", "parameters"]
    };
    let m = keys(as_map(v, path)?, path, allowed)?;
    let model = model_ref(
        m.get("model").ok_or_else(|| bad(path, "missing `model`"))?,
        &format!("{path}.model"),
    )?;
    let layer_range = if with_range {
        let p = format!("{path}.layer_range");
        let r = m
            .get("layer_range")
            .ok_or_else(|| bad(path, "missing `layer_range`"))?;
        let seq = r
            .as_sequence()
            .ok_or_else(|| bad(&p, "expected [start, end]"))?;
        if seq.len() != 2 {
            return Err(bad(&p, "expected [start, end]"));
        }
        let a = seq[0]
            .as_u64()
            .ok_or_else(|| bad(&p, "start must be a non-negative integer"))?;
        let b = seq[1]
            .as_u64()
            .ok_or_else(|| bad(&p, "end must be a non-negative integer"))?;
        if b <= a {
            return Err(bad(
                &p,
                format!("[{a}, {b}] is empty: end must be greater than start"),
            ));
        }
        Some((a, b))
    } else {
        None
    };
    // a bad value names the model it is for, not only its place in the list
    let params =
        params(m.get("parameters"), &format!("{path}.parameters")).map_err(|e| match e {
            Error::Recipe(msg) => Error::Recipe(format!("{msg} (model {model})")),
            e => e,
        })?;
    Ok(Source {
        model,
        layer_range,
        params,
    })
}

impl Recipe {
    pub fn parse(text: &str) -> Result<Recipe> {
        let max = max_recipe_bytes();
        if text.len() > max {
            return Err(Error::Recipe(format!(
                "the recipe is {} bytes, more than the {max} accepted (set SHARDMERGE_MAX_RECIPE_BYTES to raise the limit)",
                text.len()
            )));
        }
        if let Some(line) = alias_line(text) {
            return Err(Error::Recipe(format!(
                "line {line}: YAML aliases (`*name`) are not accepted in recipes: a few of them can expand a small recipe into gigabytes; write the value out"
            )));
        }
        let doc: Value = serde_yaml::from_str(text)
            .map_err(|e| Error::Recipe(format!("not valid YAML: {e}")))?;
        let top = keys(
            as_map(&doc, "recipe")?,
            "recipe",
            &[
                "merge_method",
                "base_model",
                "models",
                "slices",
                "parameters",
                "dtype",
                "out_dtype",
                "tokenizer_source",
                "random_seed",
                "name",
                "modules",
                "tokenizer",
                "chat_template",
            ],
        )?;
        for unsupported in ["modules", "tokenizer", "chat_template"] {
            if top.contains_key(unsupported) {
                return Err(bad(
                    unsupported,
                    "not supported yet (supported: models, slices, base_model, parameters, dtype, out_dtype, tokenizer_source, random_seed)",
                ));
            }
        }
        let merge_method = string(
            top.get("merge_method")
                .ok_or_else(|| bad("recipe", "missing `merge_method`"))?,
            "merge_method",
        )?;
        let base_model = top
            .get("base_model")
            .filter(|v| !v.is_null())
            .map(|v| model_ref(v, "base_model"))
            .transpose()?;
        let models = top
            .get("models")
            .map(|v| {
                let seq = v
                    .as_sequence()
                    .ok_or_else(|| bad("models", "expected a list"))?;
                seq.iter()
                    .enumerate()
                    .map(|(i, s)| source(s, &format!("models[{i}]"), false))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let slices = top
            .get("slices")
            .map(|v| {
                let seq = v
                    .as_sequence()
                    .ok_or_else(|| bad("slices", "expected a list"))?;
                seq.iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let p = format!("slices[{i}]");
                        let m = keys(as_map(s, &p)?, &p, &["sources", "base_model", "parameters"])?;
                        let srcs = m
                            .get("sources")
                            .and_then(|v| v.as_sequence())
                            .ok_or_else(|| bad(&p, "missing `sources` list"))?;
                        if srcs.is_empty() {
                            return Err(bad(&p, "`sources` is empty"));
                        }
                        Ok(Slice {
                            sources: srcs
                                .iter()
                                .enumerate()
                                .map(|(j, s)| source(s, &format!("{p}.sources[{j}]"), true))
                                .collect::<Result<_>>()?,
                            base_model: m
                                .get("base_model")
                                .map(|v| model_ref(v, &format!("{p}.base_model")))
                                .transpose()?,
                            params: params(m.get("parameters"), &format!("{p}.parameters"))?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        match (&models, &slices) {
            (Some(_), Some(_)) => {
                return Err(bad("recipe", "give either `models` or `slices`, not both"))
            }
            (None, None) => return Err(bad("recipe", "missing `models` or `slices`")),
            (Some(m), None) if m.is_empty() => return Err(bad("models", "the list is empty")),
            (None, Some(s)) if s.is_empty() => return Err(bad("slices", "the list is empty")),
            _ => {}
        }
        let tokenizer_source = top
            .get("tokenizer_source")
            .filter(|v| !v.is_null())
            .map(|v| {
                let s = string(v, "tokenizer_source")?;
                match s.as_str() {
                    "base" => Ok(TokenizerSource::Base),
                    "union" => Err(bad(
                        "tokenizer_source",
                        "`union` is not supported yet (use `base` or a model from the recipe)",
                    )),
                    _ => Ok(TokenizerSource::Model(s)),
                }
            })
            .transpose()?;
        let random_seed = top
            .get("random_seed")
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| bad("random_seed", "expected a non-negative integer"))
            })
            .transpose()?;
        Ok(Recipe {
            merge_method,
            base_model,
            models,
            slices,
            params: params(top.get("parameters"), "parameters")?,
            dtype: top.get("dtype").map(|v| dtype(v, "dtype")).transpose()?,
            out_dtype: top
                .get("out_dtype")
                .map(|v| dtype(v, "out_dtype"))
                .transpose()?,
            tokenizer_source,
            random_seed,
            text: text.to_string(),
        })
    }

    /// Every model the recipe names, each once, in order of first mention.
    pub fn referenced_models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |m: &str| {
            if !out.iter().any(|x| x == m) {
                out.push(m.to_string());
            }
        };
        if let Some(ms) = &self.models {
            ms.iter().for_each(|s| add(&s.model));
        }
        if let Some(ss) = &self.slices {
            for s in ss {
                s.sources.iter().for_each(|x| add(&x.model));
                if let Some(b) = &s.base_model {
                    add(b);
                }
            }
        }
        if let Some(b) = &self.base_model {
            add(b);
        }
        if let Some(TokenizerSource::Model(m)) = &self.tokenizer_source {
            add(m);
        }
        out
    }

    /// Every place a parameter is set: (where, name), for unknown-parameter errors.
    pub fn parameter_sites(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut add = |site: String, p: &Params| {
            for k in p.keys() {
                out.push((site.clone(), k.clone()));
            }
        };
        add("parameters".into(), &self.params);
        if let Some(ms) = &self.models {
            for (i, s) in ms.iter().enumerate() {
                add(format!("models[{i}].parameters"), &s.params);
            }
        }
        if let Some(ss) = &self.slices {
            for (i, s) in ss.iter().enumerate() {
                add(format!("slices[{i}].parameters"), &s.params);
                for (j, x) in s.sources.iter().enumerate() {
                    add(format!("slices[{i}].sources[{j}].parameters"), &x.params);
                }
            }
        }
        out
    }
}

/// Resolves a parameter with mergekit's precedence: the slice source's (for `model`), the
/// output slice's, then the global `parameters`.
pub fn resolve(
    recipe: &Recipe,
    slice: &Slice,
    name: &str,
    model: Option<&str>,
    tensor_name: &str,
    t: f64,
) -> Option<f64> {
    if let Some(m) = model {
        for s in &slice.sources {
            if s.model == m {
                if let Some(v) = s.params.get(name).and_then(|x| x.eval(tensor_name, t)) {
                    return Some(v);
                }
            }
        }
    }
    if let Some(v) = slice.params.get(name).and_then(|x| x.eval(tensor_name, t)) {
        return Some(v);
    }
    recipe.params.get(name).and_then(|x| x.eval(tensor_name, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_interpolate_like_mergekit() {
        let g = Setting::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]);
        assert_eq!(g.eval("x", 0.0), Some(0.0));
        assert_eq!(g.eval("x", 1.0), Some(1.0));
        let v = g.eval("x", 1.0 / 3.0).unwrap();
        assert!((v - (0.5 + (0.3 - 0.5) * (4.0 / 3.0 - 1.0))).abs() < 1e-12);
        let f = Setting::Filtered(vec![
            (Some("mlp".into()), Setting::Scalar(0.9)),
            (None, Setting::Scalar(0.4)),
        ]);
        assert_eq!(f.eval("model.layers.0.mlp.up_proj.weight", 0.0), Some(0.9));
        assert_eq!(f.eval("model.norm.weight", 0.0), Some(0.4));
    }

    #[test]
    fn errors_name_the_key() {
        let e = Recipe::parse("merge_method: ties\nmodels:\n- model: a\n  paramters: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("models[0]") && e.contains("paramters"), "{e}");
        let e = Recipe::parse("merge_method: [").unwrap_err().to_string();
        assert!(e.contains("YAML"), "{e}");
        let e = Recipe::parse("merge_method: linear\nmodels: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let e = Recipe::parse("merge_method: linear\ndtype: int8\nmodels:\n- model: a\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype") && e.contains("int8"), "{e}");
        let e =
            Recipe::parse("merge_method: linear\ntokenizer_source: union\nmodels:\n- model: a\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("not supported yet"), "{e}");
    }

    #[test]
    fn bad_numbers_are_refused_with_key_and_model() {
        let cases = [
            // (recipe, what the error must contain)
            (
                "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: .nan\n",
                &["models[0].parameters.weight", "model a", ".nan"][..],
            ),
            (
                "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: .inf\n",
                &["models[0].parameters.weight", "model a", ".inf"],
            ),
            (
                "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: -.inf\n",
                &["weight", "-.inf"],
            ),
            (
                "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: 1e39\n",
                &["models[0].parameters.weight", "model a", "1e39", "32-bit float"],
            ),
            (
                "merge_method: linear\nparameters:\n  weight: [0.1, .nan, 0.3]\nmodels:\n- model: a\n",
                &["parameters.weight[1]", ".nan"],
            ),
            (
                "merge_method: linear\nparameters:\n  weight:\n  - filter: mlp\n    value: -1e40\n  - value: 1\nmodels:\n- model: a\n",
                &["parameters.weight[0].value", "-1e40"],
            ),
            (
                "merge_method: slerp\nbase_model: a\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 2]\n  - model: b\n    layer_range: [0, 2]\n    parameters:\n      t: [0, .inf]\n",
                &["slices[0].sources[1].parameters.t[1]", "model b", ".inf"],
            ),
            (
                "merge_method: slerp\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 2]\n  parameters:\n    t: .NaN\n",
                &["slices[0].parameters.t", ".nan"],
            ),
        ];
        for (text, want) in cases {
            let e = Recipe::parse(text).unwrap_err().to_string();
            for w in want {
                assert!(e.contains(w), "{w:?} missing from: {e}");
            }
        }
        // the largest f32 and booleans are fine
        Recipe::parse("merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: 3.4e38\n    normalize: true\n").unwrap();
    }

    #[test]
    fn aliases_are_refused_anchors_and_stars_in_text_are_not() {
        let bomb = "merge_method: linear\na: &a [x, x]\nb: &b [*a, *a]\nmodels:\n- model: m\n";
        let e = Recipe::parse(bomb).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("aliases"), "{e}");
        assert_eq!(alias_line("x: *a"), Some(1));
        assert_eq!(alias_line("- *a"), Some(1));
        for ok in [
            "x: a*b",
            "x: '*a'",
            "x: \"*a\"",
            "x: 1 # *a",
            "filter: \"*\"",
            "x: 2 * 3",
        ] {
            assert_eq!(alias_line(ok), None, "{ok}");
        }
    }

    #[test]
    fn oversized_recipe_is_refused() {
        let text = format!(
            "# {}\nmerge_method: linear\nmodels:\n- model: a\n",
            "x".repeat(max_recipe_bytes())
        );
        let e = Recipe::parse(&text).unwrap_err().to_string();
        assert!(e.contains("SHARDMERGE_MAX_RECIPE_BYTES"), "{e}");
    }
}
