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
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| bad(path, "not a number")),
        Value::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
        _ => Err(bad(
            path,
            format!("expected a number or boolean, got {}", kind(v)),
        )),
    }
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
    Ok(Source {
        model,
        layer_range,
        params: params(m.get("parameters"), &format!("{path}.parameters"))?,
    })
}

impl Recipe {
    pub fn parse(text: &str) -> Result<Recipe> {
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
}
