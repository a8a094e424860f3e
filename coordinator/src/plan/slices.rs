//! Slices and layers: the donor model, the output config's layer fields, normalising a recipe into slices and checking them.

use super::*;

/// The model whose config the output takes: the base model, else the first one named.
pub(super) fn donor_model(recipe: &Recipe) -> Result<String> {
    recipe
        .base_model
        .clone()
        .or_else(|| recipe.models.as_ref()?.first().map(|m| m.model.clone()))
        .or_else(|| {
            let s = recipe.slices.as_ref()?.first()?;
            s.sources.first().map(|x| x.model.clone())
        })
        .ok_or_else(|| Error::recipe("", "the recipe names no models"))
}

/// Writes the layer-indexed fields of the output config: the layer count under the
/// architecture's key, each per-layer array rebuilt from the entries of the layers the output's
/// layers come from, each layer-index list renumbered.
pub(super) fn layer_config(
    c: &mut serde_json::Map<String, Value>,
    arch: &Arch,
    models: &HashMap<String, ModelInfo>,
    origins: &[(&str, u64)],
) -> Result<()> {
    let n = origins.len() as u64;
    if c.contains_key(arch.layers_key) || n > 0 {
        c.insert(arch.layers_key.into(), Value::from(n));
    }
    for key in arch.layer_arrays {
        if !c.get(*key).is_some_and(Value::is_array) {
            continue;
        }
        let mut out = Vec::with_capacity(origins.len());
        for (model, layer) in origins {
            let m = &models[*model];
            let entries = m
                .config
                .as_ref()
                .and_then(|c| c.get(*key))
                .and_then(Value::as_array);
            let entry = match entries {
                Some(a) if a.len() as u64 == m.num_layers => a.get(*layer as usize),
                _ => None,
            };
            let Some(entry) = entry else {
                return Err(Error::input("", format!(
                    "{}/config.json: `{key}` must list one entry for each of its {} layers (the output's `{key}` is built from it)",
                    m.loc.uri(),
                    m.num_layers
                )));
            };
            out.push(entry.clone());
        }
        c.insert((*key).into(), Value::Array(out));
    }
    for key in arch.layer_index_lists {
        if !c.get(*key).is_some_and(Value::is_array) {
            continue;
        }
        let mut out = Vec::new();
        for (j, (model, layer)) in origins.iter().enumerate() {
            let m = &models[*model];
            let listed = m
                .config
                .as_ref()
                .and_then(|c| c.get(*key))
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v.as_u64() == Some(*layer)));
            if listed {
                out.push(Value::from(j as u64));
            }
        }
        c.insert((*key).into(), Value::Array(out));
    }
    Ok(())
}

/// A model's layer tensors: layer index → (prefix, suffix) of each name, sorted by suffix.
pub(super) type LayerNames<'a> = BTreeMap<u64, Vec<(&'a str, &'a str)>>;

pub(super) fn layer_names<'a>(m: &'a ModelInfo, arch: &Arch) -> LayerNames<'a> {
    let mut out: LayerNames = BTreeMap::new();
    for k in m.tensors.keys() {
        if let Some((p, i, s)) = arch.split_layer(k) {
            out.entry(i).or_default().push((p, s));
        }
    }
    for v in out.values_mut() {
        // stable, as the per-layer collect-and-sort was (names come in key order)
        v.sort_by_key(|(_, s)| *s);
    }
    out
}

pub(super) fn normalize_slices(cx: &Ctx) -> Result<Vec<Slice>> {
    let r = cx.recipe;
    let uses_base = cx.method.spec().base != BaseRule::Ignored;
    if let Some(ms) = &r.models {
        let mut sources: Vec<Source> = ms
            .iter()
            .map(|m| Source {
                model: m.model.clone(),
                layer_range: Some((0, cx.models[&m.model].num_layers)),
                params: m.params.clone(),
            })
            .collect();
        if let Some(b) = &r.base_model {
            if uses_base && !sources.iter().any(|s| &s.model == b) {
                sources.push(Source {
                    model: b.clone(),
                    layer_range: Some((0, cx.models[b].num_layers)),
                    params: Default::default(),
                });
            }
        }
        return Ok(vec![Slice {
            sources,
            base_model: None,
            params: Default::default(),
        }]);
    }
    Ok(r.slices.clone().unwrap_or_default())
}

pub(super) fn slice_base<'a>(cx: &'a Ctx, s: &'a Slice) -> Option<&'a str> {
    s.base_model.as_deref().or(cx.recipe.base_model.as_deref())
}

pub(super) fn base_index(cx: &Ctx, s: &Slice) -> Option<usize> {
    if cx.method.spec().base == BaseRule::Ignored {
        return None;
    }
    let b = slice_base(cx, s)?;
    s.sources.iter().position(|x| x.model == b)
}

/// The source whose tensor names define the slice's output: the base if present, else the first.
pub(super) fn reference_source(cx: &Ctx, s: &Slice) -> usize {
    base_index(cx, s).unwrap_or(0)
}

pub(super) fn check_slice(cx: &Ctx, i: usize, s: &Slice) -> Result<()> {
    let spec = cx.method.spec();
    let n = s.sources.len();
    let where_ = if cx.recipe.slices.is_some() {
        format!("slices[{i}]")
    } else {
        "models".into()
    };
    if n < spec.min_models || spec.max_models.is_some_and(|m| n > m) {
        let want = match spec.max_models {
            Some(m) if m == spec.min_models => format!("exactly {m}"),
            Some(m) => format!("{} to {m}", spec.min_models),
            None => format!("at least {}", spec.min_models),
        };
        return Err(Error::recipe(
            &where_,
            format!(
                "merge_method {} takes {want} models (base model included), the recipe gives {n}",
                spec.name
            ),
        ));
    }
    if spec.base == BaseRule::Required {
        match slice_base(cx, s) {
            None => {
                return Err(Error::recipe("", format!(
                    "merge_method {} needs base_model: set `base_model:` to the model the others are deltas from",
                    spec.name
                )))
            }
            Some(b) if base_index(cx, s).is_none() => {
                return Err(Error::recipe(&where_, format!("base_model {b} is not among the sources")))
            }
            _ => {}
        }
    }
    let mut len = None;
    for (j, src) in s.sources.iter().enumerate() {
        let m = &cx.models[&src.model];
        let (a, b) = src.layer_range.unwrap_or((0, m.num_layers));
        if b > m.num_layers {
            return Err(Error::recipe(
                format!("{where_}.sources[{j}].layer_range"),
                format!(
                    "[{a}, {b}] is past the {} layers of {}",
                    m.num_layers, src.model
                ),
            ));
        }
        if *len.get_or_insert(b - a) != b - a {
            return Err(Error::recipe(
                &where_,
                "all sources must span the same number of layers",
            ));
        }
    }
    Ok(())
}

pub(super) fn non_layer_names(cx: &Ctx, s: &Slice, pre: bool) -> Vec<String> {
    let m = &cx.models[&s.sources[reference_source(cx, s)].model];
    let want = if pre { Place::Pre } else { Place::Post };
    let mut v: Vec<String> = m
        .tensors
        .keys()
        .filter(|n| cx.arch.place(n) == want)
        .cloned()
        .collect();
    v.sort();
    v
}
