//! Reading a recipe's YAML: each value checked where it is read, errors naming the key path.

mod tokens;

use super::depth::MAX_RECIPE_DEPTH;
use super::*;

pub(super) fn bad(path: &str, msg: impl std::fmt::Display) -> Error {
    Error::recipe(path, msg)
}

pub(super) fn as_map<'a>(v: &'a Value, path: &str) -> Result<&'a serde_yaml::Mapping> {
    v.as_mapping()
        .ok_or_else(|| bad(path, "expected a mapping (key: value pairs)"))
}

pub(super) fn keys<'a>(
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

pub(super) fn string(v: &Value, path: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(bad(path, "expected a string")),
    }
}

pub(super) fn number(v: &Value, path: &str) -> Result<f64> {
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
pub(super) fn finite_f32(x: f64) -> std::result::Result<f64, String> {
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
pub(super) fn alias_line(text: &str) -> Option<usize> {
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

pub(super) fn kind(v: &Value) -> &'static str {
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

pub(super) fn setting(v: &Value, path: &str) -> Result<Setting> {
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

pub(super) fn params(v: Option<&&Value>, path: &str) -> Result<Params> {
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

pub(super) fn model_ref(v: &Value, path: &str) -> Result<String> {
    let s = string(v, path)?;
    if s.trim().is_empty() {
        return Err(bad(path, "empty model reference"));
    }
    // `model+adapter`: a LoRA adapter applied to the model (mergekit's syntax: one `+`)
    let parts: Vec<&str> = s.split('+').collect();
    if parts.len() > 2 {
        return Err(bad(
            path,
            format!("`{s}`: one LoRA adapter per model (`model+adapter`), not several `+`"),
        ));
    }
    if parts.iter().any(|p| p.trim().is_empty()) {
        return Err(bad(
            path,
            format!("`{s}`: `model+adapter` needs both a model and an adapter"),
        ));
    }
    Ok(s)
}

pub(super) fn dtype(v: &Value, path: &str) -> Result<DType> {
    let s = string(v, path)?;
    DType::from_recipe(&s).ok_or_else(|| {
        bad(
            path,
            format!("unsupported dtype `{s}` (use float32, float16 or bfloat16)"),
        )
    })
}

pub(super) fn source(v: &Value, path: &str, with_range: bool) -> Result<Source> {
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
            Error::Recipe { key, reason } => Error::Recipe {
                key,
                reason: format!("{reason} (model {model})"),
            },
            e => e,
        })?;
    Ok(Source {
        model,
        layer_range,
        params,
    })
}

/// The keys a recipe may have at its top level.
const TOP_KEYS: &[&str] = &[
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
];

/// Refuses a recipe too large, nested too deeply, or with YAML aliases, before parsing it.
pub(super) fn check_text(text: &str) -> Result<()> {
    let max = max_recipe_bytes();
    if text.len() > max {
        return Err(Error::recipe("", format!(
            "the recipe is {} bytes, more than the {max} accepted (set SHARDMERGE_MAX_RECIPE_BYTES to raise the limit)",
            text.len()
        )));
    }
    if let Some(line) = super::depth::too_deep(text, MAX_RECIPE_DEPTH) {
        return Err(Error::recipe("", format!(
            "line {line}: the recipe nests deeper than {MAX_RECIPE_DEPTH} levels (lists and mappings inside each other; mergekit recipes need about 10), which is refused before parsing"
        )));
    }
    if let Some(line) = alias_line(text) {
        return Err(Error::recipe("", format!(
            "line {line}: YAML aliases (`*name`) are not accepted in recipes: a few of them can expand a small recipe into gigabytes; write the value out"
        )));
    }
    Ok(())
}

impl Recipe {
    pub fn parse(text: &str) -> Result<Recipe> {
        check_text(text)?;
        let doc: Value = serde_yaml::from_str(text).map_err(|e| {
            if several_documents(text) {
                // `run`, `plan` and `submit` split such a file into its stages first
                return bad("", "this file holds several `---`-separated recipes (a multi-stage recipe): `shardmerge run`, `plan` and `submit` run its stages, each recipe on its own");
            }
            Error::recipe("", format!("not valid YAML: {e}"))
        })?;
        let top = keys(as_map(&doc, "recipe")?, "recipe", TOP_KEYS)?;
        for unsupported in ["modules", "chat_template"] {
            if top.contains_key(unsupported) {
                return Err(bad(
                    unsupported,
                    "not supported yet (supported: models, slices, base_model, parameters, dtype, out_dtype, tokenizer_source, tokenizer, random_seed)",
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
        let models = top.get("models").map(|v| models_list(v)).transpose()?;
        let slices = top.get("slices").map(|v| slices_list(v)).transpose()?;
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
            .map(|v| tokenizer_source(v, "tokenizer_source"))
            .transpose()?;
        let tokenizer = top
            .get("tokenizer")
            .filter(|v| !v.is_null())
            .map(|v| tokens::tokenizer_section(v))
            .transpose()?;
        if tokenizer.is_some() && tokenizer_source.is_some() {
            return Err(bad(
                "tokenizer",
                "give either `tokenizer_source` or a `tokenizer:` section, not both (put the source under `tokenizer.source`)",
            ));
        }
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
            tokenizer,
            random_seed,
            text: text.to_string(),
        })
    }
}

/// Whether `text` holds more than one YAML document (each read in turn, up to the second; the
/// first that is not valid YAML ends the look, as an unread erroneous document never would).
fn several_documents(text: &str) -> bool {
    let mut n = 0;
    for d in serde_yaml::Deserializer::from_str(text).take(2) {
        if <Value as serde::Deserialize>::deserialize(d).is_err() {
            return false;
        }
        n += 1;
    }
    n > 1
}

/// `models:`: the list of whole-model sources.
fn models_list(v: &Value) -> Result<Vec<Source>> {
    let seq = v
        .as_sequence()
        .ok_or_else(|| bad("models", "expected a list"))?;
    seq.iter()
        .enumerate()
        .map(|(i, s)| source(s, &format!("models[{i}]"), false))
        .collect()
}

/// `slices:`: the list of output slices.
fn slices_list(v: &Value) -> Result<Vec<Slice>> {
    let seq = v
        .as_sequence()
        .ok_or_else(|| bad("slices", "expected a list"))?;
    seq.iter().enumerate().map(|(i, s)| slice(s, i)).collect()
}

/// `slices[i]`: its sources (at least one), base model and parameters.
fn slice(s: &Value, i: usize) -> Result<Slice> {
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
}

/// `tokenizer_source:` (or `tokenizer.source`): `base`, `union` or a model.
pub(super) fn tokenizer_source(v: &Value, path: &str) -> Result<TokenizerSource> {
    let s = string(v, path)?;
    Ok(match s.as_str() {
        "base" => TokenizerSource::Base,
        "union" => TokenizerSource::Union,
        _ => TokenizerSource::Model(model_ref(v, path)?),
    })
}
