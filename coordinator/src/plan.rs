//! Planning: from a recipe and the inputs' headers (range reads only) to one tensor job per
//! output tensor, laid out into output files whose headers and offsets are all known before
//! any tensor data moves.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;
use shardmerge_proto as pb;
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::format::index as st_index;
use shardmerge_worker::format::safetensors::{
    self as st, FileLayout, LayoutEntry, StDtype, TensorInfo,
};
use shardmerge_worker::kernels::{self, rng, BaseRule, Method};
use shardmerge_worker::storage::{retry, Location, Resolver};
use shardmerge_worker::tensor::view2d;

use crate::arch::{self, Arch, Place};
use crate::error::{Error, Result};
use crate::recipe::{self, Recipe, Slice, Source, TokenizerSource};

/// mergekit's default `--out-shard-size` (bytes).
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Files copied from the tokenizer source, when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// An input checkpoint, known from its config and headers.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub loc: Location,
    pub config: Option<Value>,
    /// Tensor name → (file URI, header entry).
    pub tensors: BTreeMap<String, (String, TensorInfo)>,
    /// Its architecture's definition, from `config.json`.
    pub arch: &'static Arch,
    pub num_layers: u64,
    /// Bytes of all its safetensors files.
    pub bytes: u64,
}

/// An output file: its name, its tensors (indices into `Plan::tensors`) and its layout.
#[derive(Clone, Debug)]
pub struct OutFile {
    pub name: String,
    pub tensors: Vec<usize>,
    pub layout: FileLayout,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub recipe: Recipe,
    pub models: Vec<ModelInfo>,
    pub tensors: Vec<pb::TensorJob>,
    pub files: Vec<OutFile>,
    /// The output `config.json`, if the donor model had one.
    pub config: Option<Value>,
    /// Where tokenizer files come from.
    pub tokenizer_from: Option<Location>,
    pub seed: u64,
    pub out_layers: u64,
    /// The architecture definition the plan followed (the donor model's).
    pub arch: &'static Arch,
}

impl Plan {
    pub fn bytes_out(&self) -> u64 {
        self.files.iter().map(|f| f.layout.total_size).sum()
    }

    /// Input bytes the merge reads (each input tensor byte once).
    pub fn bytes_in(&self) -> u64 {
        self.tensors
            .iter()
            .flat_map(|t| t.inputs.iter())
            .map(|s| {
                let es = DType::from_proto(s.dtype).map_or(4, |d| d.size()) as u64;
                s.shape.iter().product::<u64>() * es
            })
            .sum()
    }
}

/// Splits `model.layers.12.mlp.up_proj.weight` into (`model.layers.`, 12, `mlp.up_proj.weight`)
/// by the name-pattern rule that models of unknown architecture follow.
pub fn split_layer(name: &str) -> Option<(&str, u64, &str)> {
    arch::split_layer_anywhere(name)
}

async fn read_header(loc: &Location) -> Result<st::Header> {
    let uri = loc.uri();
    let size = retry(|| loc.store.size(&loc.path)).await.map_err(|e| {
        if e.not_found {
            Error::Input(format!("{uri}: file not found"))
        } else {
            Error::Input(format!("{uri}: {e}"))
        }
    })?;
    let prefix = retry(|| loc.store.read_range(&loc.path, 0..size.min(8)))
        .await
        .map_err(|e| Error::Input(format!("{uri}: {e}")))?;
    let n = st::header_len(&prefix, size).map_err(|e| Error::Input(format!("{uri}: {e}")))?;
    let json = retry(|| loc.store.read_range(&loc.path, 8..8 + n))
        .await
        .map_err(|e| Error::Input(format!("{uri}: {e}")))?;
    st::parse_header(&json, size).map_err(|e| Error::Input(format!("{uri}: {e}")))
}

async fn read_json(loc: &Location) -> Result<Option<Value>> {
    match retry(|| loc.store.read_all(&loc.path)).await {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Input(format!("{}: not valid JSON: {e}", loc.uri()))),
        Err(e) if e.not_found => Ok(None),
        Err(e) => Err(Error::Input(format!("{}: {e}", loc.uri()))),
    }
}

/// Reads and checks a model folder's `model.safetensors.index.json`, if it has one.
async fn read_index(loc: &Location) -> Result<Option<st_index::Index>> {
    let iloc = loc.join("model.safetensors.index.json");
    match retry(|| iloc.store.read_all(&iloc.path)).await {
        Ok(b) => st_index::parse_index(&b)
            .map(Some)
            .map_err(|e| Error::Input(format!("{}: {e}", iloc.uri()))),
        Err(e) if e.not_found => Ok(None),
        Err(e) => Err(Error::Input(format!("{}: {e}", iloc.uri()))),
    }
}

/// Reads a model folder's config, index and headers (never the tensor data).
pub async fn load_model(resolver: &Resolver, base_dir: &Path, name: &str) -> Result<ModelInfo> {
    let loc = resolver.resolve(name, base_dir)?;
    let config = read_json(&loc.join("config.json")).await?;
    let index = read_index(&loc).await?;
    let files: Vec<String> = match &index {
        Some(idx) => idx.files.clone(),
        None => {
            let single = loc.join("model.safetensors");
            if !single.store.exists(&single.path).await? {
                let what = if loc.store.exists(&loc.path).await? || !loc.store.is_local() {
                    "has no model.safetensors or model.safetensors.index.json (is it a Hugging Face safetensors checkpoint?)"
                } else {
                    "does not exist"
                };
                return Err(Error::Input(format!("model folder {} {what}", loc.uri())));
            }
            vec!["model.safetensors".into()]
        }
    };
    let mut tensors = BTreeMap::new();
    let mut bytes = 0;
    for f in &files {
        let floc = loc.join(f);
        let h = read_header(&floc).await?;
        bytes += h.tensors.values().map(|t| t.end - t.start).sum::<u64>();
        let uri = floc.uri();
        for (n, t) in h.tensors {
            if let Some((other, _)) = tensors.get(&n) {
                return Err(Error::Input(format!(
                    "{}: tensor {n} is in two files, {other} and {uri}",
                    loc.uri()
                )));
            }
            tensors.insert(n, (uri.clone(), t));
        }
        let max = st::max_tensors();
        if tensors.len() > max {
            return Err(Error::Input(format!(
                "{}: more than {max} tensors in one checkpoint (set SHARDMERGE_MAX_TENSORS to raise the limit)",
                loc.uri()
            )));
        }
    }
    if let Some(idx) = &index {
        for (tname, file) in &idx.weight_map {
            match tensors.get(tname) {
                Some((uri, _)) if uri.ends_with(&format!("/{file}")) => {}
                _ => {
                    return Err(Error::Input(format!(
                        "{}: the index puts tensor {tname} in {file}, but that file's header doesn't have it",
                        loc.uri()
                    )))
                }
            }
        }
    }
    let arch = arch::of_config(config.as_ref());
    let from_names = tensors
        .keys()
        .filter_map(|n| arch.split_layer(n).map(|(_, i, _)| i + 1))
        .max()
        .unwrap_or(0);
    let num_layers = arch
        .config_layers(config.as_ref())
        .unwrap_or(from_names)
        .max(from_names);
    // every layer is planned (and a config can claim any number): bounded like the tensors
    if num_layers > st::max_tensors() as u64 {
        return Err(Error::Input(format!(
            "{}: config.json claims {num_layers} layers, more than the {} tensors a checkpoint may hold",
            loc.uri(),
            st::max_tensors()
        )));
    }
    Ok(ModelInfo {
        name: name.to_string(),
        loc,
        config,
        tensors,
        arch,
        num_layers,
        bytes,
    })
}

pub struct PlanOptions {
    pub out_shard_size: u64,
    pub seed: Option<u64>,
    pub rng: pb::Rng,
    /// Merge embeddings of different vocabulary sizes by keeping the rows all of them have.
    pub unsafe_truncate_embeddings: bool,
    /// Compute in f32 even when the recipe's `dtype` is 16-bit.
    pub compute_float32: bool,
}

struct Ctx<'a> {
    recipe: &'a Recipe,
    /// The architecture of the model whose config the output takes.
    arch: &'static Arch,
    method: &'static dyn Method,
    models: &'a HashMap<String, ModelInfo>,
    seed: u64,
    rng: pb::Rng,
    truncate_embeddings: bool,
    compute_float32: bool,
}

/// Plans a merge.
pub async fn plan(
    recipe: Recipe,
    resolver: &Resolver,
    base_dir: &Path,
    opts: &PlanOptions,
) -> Result<Plan> {
    let method = kernels::method(&recipe.merge_method).ok_or_else(|| {
        let names: Vec<&str> = kernels::registry().iter().map(|m| m.spec().name).collect();
        Error::Recipe(format!(
            "merge_method: unknown method `{}` (known: {})",
            recipe.merge_method,
            names.join(", ")
        ))
    })?;
    let spec = method.spec();
    for (site, name) in recipe.parameter_sites() {
        let known = spec
            .params
            .iter()
            .chain(spec.tensor_params)
            .any(|p| p.name == name);
        if !known {
            let takes: Vec<&str> = spec
                .params
                .iter()
                .chain(spec.tensor_params)
                .map(|p| p.name)
                .collect();
            return Err(Error::Recipe(format!(
                "{site}.{name}: unknown parameter `{name}` for merge_method {} (it takes: {})",
                spec.name,
                if takes.is_empty() {
                    "none".to_string()
                } else {
                    takes.join(", ")
                }
            )));
        }
    }
    let mut models = HashMap::new();
    let mut order = Vec::new();
    for name in recipe.referenced_models() {
        let m = load_model(resolver, base_dir, &name).await?;
        order.push(m.clone());
        models.insert(name, m);
    }
    let seed = opts.seed.or(recipe.random_seed).unwrap_or(0);
    let donor = donor_model(&recipe)?;
    let arch = models[&donor].arch;
    for m in &order {
        let both_known = !m.arch.is_fallback() && !arch.is_fallback();
        if both_known && m.arch.layer_prefixes != arch.layer_prefixes {
            return Err(Error::Recipe(format!(
                "model {} is a {} model and {donor} a {}: their tensors are named differently, so they can't be merged (use models of one architecture)",
                m.name, m.arch.name, arch.name
            )));
        }
    }
    let cx = Ctx {
        recipe: &recipe,
        arch,
        method,
        models: &models,
        seed,
        rng: opts.rng,
        truncate_embeddings: opts.unsafe_truncate_embeddings,
        compute_float32: opts.compute_float32,
    };
    let slices = normalize_slices(&cx)?;
    for (i, s) in slices.iter().enumerate() {
        check_slice(&cx, i, s)?;
    }

    let mut tensors = Vec::new();
    // Tensors outside the layers: embeddings first (from the first slice), the rest last
    // (from the last slice), as mergekit's pre/post weights.
    let first = &slices[0];
    let last = &slices[slices.len() - 1];
    let pre = non_layer_names(&cx, first, true);
    for n in pre {
        tensors.push(plan_tensor(
            &cx,
            first,
            &n,
            &vec![n.clone(); first.sources.len()],
            0.0,
        )?);
    }
    let mut out_layer = 0u64;
    // (model, layer) each output layer comes from: its reference source's
    let mut origins: Vec<(&str, u64)> = Vec::new();
    // each reference model's layer tensors by layer, found in one pass over its names (a scan
    // of every name for every layer was quadratic: minutes for 200k tensors)
    let mut by_layer: HashMap<&str, LayerNames> = HashMap::new();
    for s in &slices {
        let (a, b) = s.sources[0].layer_range.unwrap_or((0, 0));
        let n = b - a;
        let refi = reference_source(&cx, s);
        let rsrc = &s.sources[refi];
        let rmodel = &models[&rsrc.model];
        let layers = by_layer
            .entry(rsrc.model.as_str())
            .or_insert_with(|| layer_names(rmodel, arch));
        for idx in 0..n {
            let t = if n > 1 {
                idx as f64 / (n - 1) as f64
            } else {
                1.0
            };
            let rlayer = rsrc.layer_range.map_or(0, |r| r.0) + idx;
            let names = layers.get(&rlayer).map(Vec::as_slice).unwrap_or_default();
            for &(prefix, suffix) in names {
                let out_name = format!("{prefix}{out_layer}.{suffix}");
                let ins: Vec<String> = s
                    .sources
                    .iter()
                    .map(|src| {
                        format!(
                            "{prefix}{}.{suffix}",
                            src.layer_range.map_or(0, |r| r.0) + idx
                        )
                    })
                    .collect();
                tensors.push(plan_tensor(&cx, s, &out_name, &ins, t)?);
            }
            origins.push((rsrc.model.as_str(), rlayer));
            out_layer += 1;
        }
    }
    let post = non_layer_names(&cx, last, false);
    for n in post {
        tensors.push(plan_tensor(
            &cx,
            last,
            &n,
            &vec![n.clone(); last.sources.len()],
            0.0,
        )?);
    }
    if tensors.is_empty() {
        return Err(Error::Input("the recipe selects no tensors".into()));
    }
    if opts.rng == pb::Rng::Mergekit {
        lay_out_draws(method, &mut tensors)?;
    }

    let files = layout_files(&tensors, opts.out_shard_size);
    let mut config = models[&donor].config.clone();
    if let Some(Value::Object(c)) = config.as_mut() {
        if let Some(dt) = recipe.out_dtype.or(recipe.dtype) {
            // transformers 5 reads `dtype`, older releases `torch_dtype`: a config that has
            // either gets both, so every release loads the output in its dtype
            let name = Value::String(dt.torch_name().into());
            if c.contains_key("dtype") || c.contains_key("torch_dtype") {
                c.insert("dtype".into(), name.clone());
            }
            c.insert("torch_dtype".into(), name);
        }
        layer_config(c, arch, &models, &origins)?;
    }
    let tok_model = match &recipe.tokenizer_source {
        Some(TokenizerSource::Model(m)) => m.clone(),
        _ => donor.clone(),
    };
    let tokenizer_from = Some(models[&tok_model].loc.clone());
    Ok(Plan {
        recipe: recipe.clone(),
        models: order,
        tensors,
        files,
        config,
        tokenizer_from,
        seed,
        out_layers: out_layer,
        arch,
    })
}

/// The model whose config the output takes: the base model, else the first one named.
fn donor_model(recipe: &Recipe) -> Result<String> {
    recipe
        .base_model
        .clone()
        .or_else(|| recipe.models.as_ref()?.first().map(|m| m.model.clone()))
        .or_else(|| {
            let s = recipe.slices.as_ref()?.first()?;
            s.sources.first().map(|x| x.model.clone())
        })
        .ok_or_else(|| Error::Recipe("the recipe names no models".into()))
}

/// Writes the layer-indexed fields of the output config: the layer count under the
/// architecture's key, each per-layer array rebuilt from the entries of the layers the output's
/// layers come from, each layer-index list renumbered.
fn layer_config(
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
                return Err(Error::Input(format!(
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
type LayerNames<'a> = BTreeMap<u64, Vec<(&'a str, &'a str)>>;

fn layer_names<'a>(m: &'a ModelInfo, arch: &Arch) -> LayerNames<'a> {
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

fn normalize_slices(cx: &Ctx) -> Result<Vec<Slice>> {
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

fn slice_base<'a>(cx: &'a Ctx, s: &'a Slice) -> Option<&'a str> {
    s.base_model.as_deref().or(cx.recipe.base_model.as_deref())
}

fn base_index(cx: &Ctx, s: &Slice) -> Option<usize> {
    if cx.method.spec().base == BaseRule::Ignored {
        return None;
    }
    let b = slice_base(cx, s)?;
    s.sources.iter().position(|x| x.model == b)
}

/// The source whose tensor names define the slice's output: the base if present, else the first.
fn reference_source(cx: &Ctx, s: &Slice) -> usize {
    base_index(cx, s).unwrap_or(0)
}

fn check_slice(cx: &Ctx, i: usize, s: &Slice) -> Result<()> {
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
        return Err(Error::Recipe(format!(
            "{where_}: merge_method {} takes {want} models (base model included), the recipe gives {n}",
            spec.name
        )));
    }
    if spec.base == BaseRule::Required {
        match slice_base(cx, s) {
            None => {
                return Err(Error::Recipe(format!(
                    "merge_method {} needs base_model: set `base_model:` to the model the others are deltas from",
                    spec.name
                )))
            }
            Some(b) if base_index(cx, s).is_none() => {
                return Err(Error::Recipe(format!(
                    "{where_}: base_model {b} is not among the sources"
                )))
            }
            _ => {}
        }
    }
    let mut len = None;
    for (j, src) in s.sources.iter().enumerate() {
        let m = &cx.models[&src.model];
        let (a, b) = src.layer_range.unwrap_or((0, m.num_layers));
        if b > m.num_layers {
            return Err(Error::Recipe(format!(
                "{where_}.sources[{j}].layer_range: [{a}, {b}] is past the {} layers of {}",
                m.num_layers, src.model
            )));
        }
        if *len.get_or_insert(b - a) != b - a {
            return Err(Error::Recipe(format!(
                "{where_}: all sources must span the same number of layers"
            )));
        }
    }
    Ok(())
}

fn non_layer_names(cx: &Ctx, s: &Slice, pre: bool) -> Vec<String> {
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

fn plan_tensor(
    cx: &Ctx,
    s: &Slice,
    out_name: &str,
    in_names: &[String],
    t: f64,
) -> Result<pb::TensorJob> {
    let spec = cx.method.spec();
    let mut inputs = Vec::new();
    let mut infos: Vec<&TensorInfo> = Vec::new();
    for (pos, (src, in_name)) in s.sources.iter().zip(in_names).enumerate() {
        let m = &cx.models[&src.model];
        // a model with tied embeddings reads its input-side twin
        let in_name = match cx.arch.tied_to(in_name) {
            Some(twin) if !m.tensors.contains_key(in_name) => twin,
            _ => in_name.as_str(),
        };
        let (uri, info) = m.tensors.get(in_name).ok_or_else(|| {
            Error::Input(format!(
                "tensor {in_name} is missing from model {} ({}), but {out_name} needs it",
                src.model,
                m.loc.uri()
            ))
        })?;
        let dt = match info.dtype {
            StDtype::Float(dt) => dt,
            StDtype::Other(n, _) => DType::from_st_name(n).ok_or_else(|| {
                Error::Input(format!(
                    "{uri}: tensor {in_name} has dtype {n}, which can't be merged or copied (F32, F16 and BF16 merge; BOOL and integer tensors are copied from the base model)"
                ))
            })?,
        };
        inputs.push(pb::TensorSource {
            uri: uri.clone(),
            data_offset: info.start,
            dtype: dt.to_proto() as i32,
            shape: info.shape.clone(),
            model: src.model.clone(),
            // keyed by the model's position among the inputs, not by where it is stored, so
            // the same recipe over copies on S3 or local disk draws the same numbers
            model_key: rng::key_of(&format!("input:{pos}")),
            tensor: in_name.to_string(),
            rng_offset: 0,
        });
        infos.push(info);
    }
    let base = base_index(cx, s);
    if inputs
        .iter()
        .any(|i| DType::from_proto(i.dtype).is_some_and(|d| !d.is_float()))
    {
        return copy_job(cx, out_name, inputs, reference_source(cx, s));
    }
    let shape = out_shape(cx, out_name, &s.sources, &infos)?;
    let mut params = HashMap::new();
    for p in spec.params {
        let v = recipe::resolve(cx.recipe, s, p.name, None, out_name, t).or(p.default);
        match v {
            Some(v) => {
                params.insert(p.name.to_string(), v);
            }
            None => {
                return Err(Error::Recipe(format!(
                    "merge_method {} requires parameter `{}` (set it under `parameters:`), missing for tensor {out_name}",
                    spec.name, p.name
                )))
            }
        }
    }
    let mut model_params = Vec::new();
    for (i, (src, in_name)) in s.sources.iter().zip(in_names).enumerate() {
        let mut mp = HashMap::new();
        for p in spec.tensor_params {
            match recipe::resolve(cx.recipe, s, p.name, Some(&src.model), in_name, t).or(p.default) {
                Some(v) => {
                    mp.insert(p.name.to_string(), v);
                }
                None if Some(i) == base => {}
                None => {
                    return Err(Error::Recipe(format!(
                        "merge_method {} requires parameter `{}` for model {} (missing for tensor {in_name})",
                        spec.name, p.name, src.model
                    )))
                }
            }
        }
        model_params.push(pb::ParamMap { values: mp });
    }
    let out_dtype = cx
        .recipe
        .out_dtype
        .or(cx.recipe.dtype)
        .or_else(|| DType::from_proto(inputs[base.unwrap_or(0)].dtype))
        .unwrap_or(DType::F32);
    // mergekit loads every input in the recipe's dtype, else casts to the base's
    let work_dtype = cx
        .recipe
        .dtype
        .map(|d| d.to_proto() as i32)
        .unwrap_or(inputs[base.unwrap_or(0)].dtype);
    let job = pb::TensorJob {
        name: out_name.to_string(),
        shape,
        out_dtype: out_dtype.to_proto() as i32,
        method: spec.name.to_string(),
        params: Some(pb::ParamMap { values: params }),
        inputs,
        model_params,
        base_index: base.map(|b| b as u32),
        seed: cx.seed,
        rng: cx.rng as i32,
        work_dtype,
        // mergekit's arithmetic: every op rounds to the recipe's 16-bit dtype
        compute_dtype: match cx.recipe.dtype {
            Some(d @ (DType::BF16 | DType::F16)) if !cx.compute_float32 => d.to_proto() as i32,
            _ => 0,
        },
    };
    let ctx = shardmerge_worker::tensor::tensor_ctx(&job).map_err(Error::Input)?;
    cx.method.check(&ctx).map_err(|e| {
        Error::Recipe(format!(
            "merge_method {}, tensor {out_name}: {e}",
            spec.name
        ))
    })?;
    Ok(job)
}

/// The job of a non-float tensor (a BOOL mask, integer ids): not merged, but copied from the
/// base model (else the first), as mergekit carries them through. Every input must have its
/// dtype and shape; the worker checks that they hold the same bytes too.
fn copy_job(
    cx: &Ctx,
    out_name: &str,
    mut inputs: Vec<pb::TensorSource>,
    from: usize,
) -> Result<pb::TensorJob> {
    let first = &inputs[from];
    if inputs
        .iter()
        .any(|i| i.dtype != first.dtype || i.shape != first.shape)
    {
        let what: Vec<String> = inputs
            .iter()
            .map(|i| {
                let dt = DType::from_proto(i.dtype).map_or("?", DType::name);
                format!("{} has {dt} {:?}", i.model, i.shape)
            })
            .collect();
        return Err(Error::Input(format!(
            "tensor {out_name}: non-float tensors are copied from the base model, not merged, so every model must have it with one dtype and shape, but {}",
            what.join(", ")
        )));
    }
    // the model it is copied from first: the worker copies the first and compares the rest
    let src = inputs.remove(from);
    inputs.insert(0, src);
    Ok(pb::TensorJob {
        name: out_name.to_string(),
        shape: inputs[0].shape.clone(),
        out_dtype: inputs[0].dtype,
        method: COPY_METHOD.to_string(),
        params: Some(pb::ParamMap::default()),
        model_params: vec![pb::ParamMap::default(); inputs.len()],
        inputs,
        base_index: None,
        seed: cx.seed,
        rng: cx.rng as i32,
        work_dtype: 0,
        compute_dtype: 0,
    })
}

/// The method a copied (non-float) tensor's job names: it has no statistics passes and no
/// random draws.
pub const COPY_METHOD: &str = "passthrough";

/// Whether a tensor job copies a non-float tensor rather than merging.
pub fn is_copy(t: &pb::TensorJob) -> bool {
    DType::from_proto(t.out_dtype).is_some_and(|d| !d.is_float())
}

/// Gives every randomised (tensor, input) its place in mergekit's draw stream. mergekit runs
/// its merge tasks in order of their group label (the largest input tensor name, compared as
/// Python compares strings: by code point, which is UTF-8 byte order), and each task draws
/// once per element for each input in recipe order. Ties keep output order.
fn lay_out_draws(method: &dyn Method, tensors: &mut [pb::TensorJob]) -> Result<()> {
    let mut order: Vec<(String, usize)> = tensors
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let label = t.inputs.iter().map(|s| s.tensor.as_str()).max();
            (label.unwrap_or_default().to_string(), k)
        })
        .collect();
    order.sort();
    let mut at = 0u64;
    for (_, k) in order {
        if is_copy(&tensors[k]) {
            continue;
        }
        let counts = {
            let ctx = shardmerge_worker::tensor::tensor_ctx(&tensors[k]).map_err(Error::Input)?;
            method.draws(&ctx)
        };
        for (src, n) in tensors[k].inputs.iter_mut().zip(counts) {
            src.rng_offset = at;
            at = at.checked_add(n).ok_or_else(|| {
                Error::Input("more random draws than a 64-bit stream position holds".into())
            })?;
        }
    }
    Ok(())
}

fn out_shape(cx: &Ctx, name: &str, sources: &[Source], infos: &[&TensorInfo]) -> Result<Vec<u64>> {
    let first = &infos[0].shape;
    if infos.iter().all(|i| &i.shape == first) {
        return Ok(first.clone());
    }
    let shapes: Vec<String> = sources
        .iter()
        .zip(infos)
        .map(|(s, i)| format!("{} has {:?}", s.model, i.shape))
        .collect();
    if cx.arch.is_embedding(name) && infos.iter().all(|i| i.shape.len() == 2) {
        // the largest common submatrix, as mergekit takes when told to truncate
        let rows = infos.iter().map(|i| i.shape[0]).min().unwrap_or(0);
        let cols = infos.iter().map(|i| i.shape[1]).min().unwrap_or(0);
        if cx.truncate_embeddings {
            return Ok(vec![rows, cols]);
        }
        return Err(Error::Input(format!(
            "tensor {name}: the models' vocabularies differ ({}): merging their rows as they are would mix up tokens. Align the vocabulary axes with the tokenizer configuration first (one tokenizer for all models; mergekit's `tokenizer_source`/`tokenizer:` are not supported by shardmerge yet), or pass --unsafe-truncate-embeddings to keep only the first {rows} rows of every model",
            shapes.join(", ")
        )));
    }
    Err(Error::Input(format!(
        "shape mismatch for tensor {name}: {}",
        shapes.join(", ")
    )))
}

/// Lays tensors into files of at most `max` bytes (a tensor larger than that gets its own).
fn layout_files(tensors: &[pb::TensorJob], max: u64) -> Vec<OutFile> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let es = DType::from_proto(t.out_dtype).map_or(4, |d| d.size()) as u64;
        let bytes = t.shape.iter().product::<u64>() * es;
        let last = groups.len() - 1;
        if !groups[last].is_empty() && max > 0 && cur + bytes > max {
            groups.push(Vec::new());
            cur = 0;
        }
        let last = groups.len() - 1;
        groups[last].push(i);
        cur += bytes;
    }
    let n = groups.len();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    groups
        .into_iter()
        .enumerate()
        .map(|(k, idx)| {
            let entries: Vec<LayoutEntry> = idx
                .iter()
                .map(|&i| LayoutEntry {
                    name: tensors[i].name.clone(),
                    dtype: DType::from_proto(tensors[i].out_dtype).unwrap_or(DType::F32),
                    shape: tensors[i].shape.clone(),
                })
                .collect();
            OutFile {
                name: if n == 1 {
                    "model.safetensors".into()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
                },
                tensors: idx,
                layout: st::layout_file(&entries, &meta),
            }
        })
        .collect()
}

/// Number of rows in a tensor's 2-D view and bytes per output row.
pub fn rows_of(t: &pb::TensorJob) -> (u64, u64) {
    let (rows, row_len) = view2d(&t.shape);
    let es = DType::from_proto(t.out_dtype).map_or(4, |d| d.size()) as u64;
    (rows, row_len * es)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dare_linear tensor job over base + two models, with `density` for both.
    fn dare_job(out: &str, ins: &[&str; 3], shape: &[u64], density: f64) -> pb::TensorJob {
        let m = kernels::method("dare_linear").expect("dare_linear");
        let params = m
            .spec()
            .params
            .iter()
            .filter_map(|p| p.default.map(|d| (p.name.to_string(), d)))
            .collect();
        let mp = |w: f64| pb::ParamMap {
            values: [("weight".to_string(), w), ("density".to_string(), density)].into(),
        };
        pb::TensorJob {
            name: out.into(),
            shape: shape.to_vec(),
            method: "dare_linear".into(),
            params: Some(pb::ParamMap { values: params }),
            inputs: ins
                .iter()
                .map(|t| pb::TensorSource {
                    tensor: t.to_string(),
                    shape: shape.to_vec(),
                    ..Default::default()
                })
                .collect(),
            model_params: vec![pb::ParamMap::default(), mp(1.0), mp(1.0)],
            base_index: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn draws_follow_mergekit_task_order() {
        let m = kernels::method("dare_linear").expect("dare_linear");
        // output order differs from mergekit's: it runs tasks by largest input name, as
        // Python compares strings ("layers.10" < "layers.2"); a frankenmerge's output layer
        // 0 reading input layer 2 sorts by the input name
        let mut jobs = vec![
            dare_job("model.layers.0.w", &["model.layers.2.w"; 3], &[10], 0.5),
            dare_job("model.layers.1.w", &["model.layers.10.w"; 3], &[7], 0.5),
            dare_job("lm_head.weight", &["lm_head.weight"; 3], &[3, 4], 0.5),
            // density 1: no draws at all
            dare_job("model.norm.weight", &["model.norm.weight"; 3], &[5], 1.0),
        ];
        lay_out_draws(m, &mut jobs).expect("lay out");
        let offs = |k: usize| -> Vec<u64> { jobs[k].inputs.iter().map(|s| s.rng_offset).collect() };
        // lm_head (12 draws per model), then layers.10 (7), then layers.2 (10), then norm
        assert_eq!(offs(2)[1..], [0, 12]);
        assert_eq!(offs(1)[1..], [24, 31]);
        assert_eq!(offs(0)[1..], [38, 48]);
        assert_eq!(offs(3)[1..], [58, 58]);
    }

    #[test]
    fn layer_names() {
        assert_eq!(
            split_layer("model.layers.12.mlp.up_proj.weight"),
            Some(("model.layers.", 12, "mlp.up_proj.weight"))
        );
        assert_eq!(split_layer("layers.0.x"), Some(("layers.", 0, "x")));
        assert_eq!(split_layer("model.norm.weight"), None);
        assert_eq!(split_layer("model.sublayers.1.x"), None);
    }
}
