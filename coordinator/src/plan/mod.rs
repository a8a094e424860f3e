//! Planning: from a recipe and the inputs' headers (range reads only) to one tensor job per
//! output tensor, laid out into output files whose headers and offsets are all known before
//! any tensor data moves.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use shardmerge_proto as pb;
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::format::index as st_index;
use shardmerge_worker::format::names;
use shardmerge_worker::format::safetensors::{
    self as st, FileLayout, LayoutEntry, StDtype, TensorInfo,
};
use shardmerge_worker::kernels::{self, rng, BaseRule, Method};
use shardmerge_worker::storage::{retry, Location, Resolver};

use crate::arch::{self, Arch, Place};
use crate::error::{Error, Result};
use crate::recipe::{self, Recipe, Slice, Source, TokenizerSource};

mod layout;
mod load;
pub mod lora;
mod params;
mod slices;
pub mod stages;
mod tensor;
mod typed;
pub(crate) mod vocab;

use layout::{lay_out_draws, layout_files};
pub(crate) use load::read_header;
pub use load::{load_model, planned_model};
use slices::*;
pub use tensor::COPY_METHOD;
use tensor::*;
#[cfg(test)]
pub(crate) use typed::test_tensor;
pub use typed::{Derived, InputPlan, Interner, Params, TensorPlan};

/// mergekit's default `--out-shard-size` (bytes).
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Files copied from the tokenizer source, when present.
pub(crate) const TOKENIZER_FILES: &[&str] = &[
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
    /// Tensor name → (file URI, header entry). Shared: the plan keeps the models both by
    /// name and in recipe order, and a model's tensors are its largest part (200k of them
    /// took 110 MB twice).
    pub tensors: std::sync::Arc<BTreeMap<String, (std::sync::Arc<str>, TensorInfo)>>,
    /// Its architecture's definition, from `config.json`.
    pub arch: &'static Arch,
    pub num_layers: u64,
    /// Bytes of all its safetensors files.
    pub bytes: u64,
    /// Its LoRA adapter (`model+adapter`), applied to its tensors as they are read.
    pub adapter: Option<Arc<lora::Adapter>>,
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
    pub tensors: Vec<TensorPlan>,
    pub files: Vec<OutFile>,
    /// The output `config.json`, if the donor model had one.
    pub config: Option<Value>,
    /// Where tokenizer files come from.
    pub tokenizer_from: Option<Location>,
    /// Tokenizer files made for the output vocabulary (`tokenizer_source`, `tokenizer:`):
    /// written instead of the copies.
    pub tokenizer_files: Vec<(String, Vec<u8>)>,
    pub seed: u64,
    pub out_layers: u64,
    /// The architecture definition the plan followed (the donor model's).
    pub arch: &'static Arch,
}

/// Memory a job holds for each output tensor, each of its inputs and each header entry of the
/// models it reads, and twice each output header, from planning to the end of the job: bounds
/// rounded up from what heaptrack and peak RSS measured (a run of 200k one-row tensors held
/// about 2.0 KB per tensor with its two inputs and four header entries; one model listed
/// 10,000 times about 250 B per tensor input), so that `--memory-limit` can count them.
const PLAN_BYTES_PER_TENSOR: u64 = 1536;
const PLAN_BYTES_PER_INPUT: u64 = 320;
const PLAN_BYTES_PER_HEADER_ENTRY: u64 = 256;

impl Plan {
    /// About how much memory this plan and the job run from it hold (an upper bound for the
    /// shapes measured; see `PLAN_BYTES_PER_TENSOR`).
    pub fn memory(&self) -> u64 {
        let inputs: u64 = self.tensors.iter().map(|t| t.inputs.len() as u64).sum();
        let entries: u64 = self.models.iter().map(|m| m.tensors.len() as u64).sum();
        let headers: u64 = self
            .files
            .iter()
            .map(|f| f.layout.header.len() as u64)
            .sum();
        (self.tensors.len() as u64)
            .saturating_mul(PLAN_BYTES_PER_TENSOR)
            .saturating_add(inputs.saturating_mul(PLAN_BYTES_PER_INPUT))
            .saturating_add(entries.saturating_mul(PLAN_BYTES_PER_HEADER_ENTRY))
            .saturating_add(headers.saturating_mul(2))
    }

    pub(crate) fn bytes_out(&self) -> u64 {
        self.files.iter().map(|f| f.layout.total_size).sum()
    }

    /// Input bytes the merge reads (each input tensor byte once).
    pub(crate) fn bytes_in(&self) -> u64 {
        self.tensors.iter().map(TensorPlan::input_bytes).sum()
    }
}

/// Splits `model.layers.12.mlp.up_proj.weight` into (`model.layers.`, 12, `mlp.up_proj.weight`)
/// by the name-pattern rule that models of unknown architecture follow.
pub fn split_layer(name: &str) -> Option<(&str, u64, &str)> {
    arch::split_layer_anywhere(name)
}

#[derive(Clone)]
pub struct PlanOptions {
    pub out_shard_size: u64,
    pub seed: Option<u64>,
    pub rng: pb::Rng,
    /// Merge embeddings of different vocabulary sizes by keeping the rows all of them have.
    pub unsafe_truncate_embeddings: bool,
    /// Compute in f32 even when the recipe's `dtype` is 16-bit.
    pub compute_float32: bool,
    /// Inputs known from their plans, by the name the recipe gives them ([`planned_model`]).
    pub given: Given,
}

/// Inputs known before they are written: a multi-stage recipe's earlier stages.
pub type Given = std::sync::Arc<HashMap<String, ModelInfo>>;

struct Ctx<'a> {
    recipe: &'a Recipe,
    /// The architecture of the model whose config the output takes.
    arch: &'static Arch,
    method: &'static dyn Method,
    models: &'a HashMap<String, ModelInfo>,
    /// Each model's recipe name, shared by the inputs that name it.
    model_names: HashMap<String, Arc<str>>,
    /// One copy of each distinct parameter map.
    params: Interner,
    seed: u64,
    rng: rng::Mode,
    truncate_embeddings: bool,
    compute_float32: bool,
    /// The output vocabulary, when the recipe re-maps embeddings by token.
    vocab: Option<&'a vocab::Vocab>,
}

/// Plans a merge.
pub async fn plan(
    recipe: Recipe,
    resolver: &Resolver,
    base_dir: &Path,
    opts: &PlanOptions,
) -> Result<Plan> {
    let method = recipe_method(&recipe)?;
    let mut models = HashMap::new();
    let mut order = Vec::new();
    for name in recipe.referenced_models() {
        let m = lora::load_input(resolver, base_dir, &name, &opts.given).await?;
        order.push(m.clone());
        models.insert(name, m);
    }
    let seed = opts.seed.or(recipe.random_seed).unwrap_or(0);
    let donor = donor_model(&recipe)?;
    let arch = models[&donor].arch;
    check_architectures(&order, &donor, arch)?;
    let vocab = vocab::build(&recipe, &models, &donor).await?;
    let cx = Ctx {
        recipe: &recipe,
        arch,
        method,
        models: &models,
        model_names: models
            .keys()
            .map(|k| (k.clone(), Arc::from(k.as_str())))
            .collect(),
        params: Interner::default(),
        seed,
        rng: match opts.rng {
            pb::Rng::Mergekit => rng::Mode::Mergekit,
            pb::Rng::Counter => rng::Mode::Counter,
        },
        truncate_embeddings: opts.unsafe_truncate_embeddings,
        compute_float32: opts.compute_float32,
        vocab: vocab.as_ref(),
    };
    let slices = normalize_slices(&cx)?;
    for (i, s) in slices.iter().enumerate() {
        check_slice(&cx, i, s)?;
    }
    let (mut tensors, origins) = plan_tensors(&cx, &slices)?;
    if tensors.is_empty() {
        return Err(Error::input("", "the recipe selects no tensors"));
    }
    if opts.rng == pb::Rng::Mergekit {
        lay_out_draws(method, &mut tensors)?;
    }
    for t in &mut tensors {
        t.passes = t.method.passes(&t.ctx()?);
    }

    let files = layout_files(&tensors, opts.out_shard_size);
    let mut config = output_config(&recipe, &donor, arch, &models, &origins)?;
    if let (Some(v), Some(Value::Object(c))) = (&vocab, config.as_mut()) {
        c.insert("vocab_size".into(), Value::from(v.rows));
    }
    let tok_model = match recipe.vocab_source() {
        Some(TokenizerSource::Model(m)) => m.clone(),
        _ => donor.clone(),
    };
    let tokenizer_from = Some(models[&tok_model].loc.clone());
    let out_layers = origins.len() as u64;
    Ok(Plan {
        recipe: recipe.clone(),
        models: order,
        tensors,
        files,
        config,
        tokenizer_from,
        tokenizer_files: vocab.map(|v| v.files).unwrap_or_default(),
        seed,
        out_layers,
        arch,
    })
}

/// The recipe's merge method, with every parameter the recipe sets known to it.
fn recipe_method(recipe: &Recipe) -> Result<&'static dyn Method> {
    let method = kernels::method(&recipe.merge_method).ok_or_else(|| {
        let names: Vec<&str> = kernels::registry().iter().map(|m| m.spec().name).collect();
        Error::recipe(
            "merge_method",
            format!(
                "unknown method `{}` (known: {})",
                recipe.merge_method,
                names.join(", ")
            ),
        )
    })?;
    params::check(recipe, method.spec())?;
    Ok(method)
}

/// Refuses models whose tensors are named differently from the donor's (`arch`).
fn check_architectures(order: &[ModelInfo], donor: &str, arch: &Arch) -> Result<()> {
    for m in order {
        let both_known = !m.arch.is_fallback() && !arch.is_fallback();
        if both_known && m.arch.layer_prefixes != arch.layer_prefixes {
            return Err(Error::recipe("", format!(
                "model {} is a {} model and {donor} a {}: their tensors are named differently, so they can't be merged (use models of one architecture)",
                m.name, m.arch.name, arch.name
            )));
        }
    }
    Ok(())
}

/// The (model, layer) each output layer comes from.
type Origins<'a> = Vec<(&'a str, u64)>;

/// Plans the tensors of `s` outside the layers: those before them (`pre`) or after them, each
/// read under its own name from every source.
fn outside_layers(cx: &Ctx<'_>, s: &Slice, pre: bool, tensors: &mut Vec<TensorPlan>) -> Result<()> {
    for n in non_layer_names(cx, s, pre) {
        let ins = vec![n.clone(); s.sources.len()];
        tensors.push(plan_tensor(cx, s, &n, &ins, 0.0)?);
    }
    Ok(())
}

/// Every output tensor's job, in output order, and the (model, layer) each output layer
/// comes from.
fn plan_tensors<'a>(cx: &Ctx<'a>, slices: &'a [Slice]) -> Result<(Vec<TensorPlan>, Origins<'a>)> {
    // Tensors outside the layers: embeddings first (from the first slice), the rest last
    // (from the last slice), as mergekit's pre/post weights.
    let first = &slices[0];
    // as many as its reference model has, most often: no copies while the list grows
    let mut tensors = Vec::with_capacity(
        cx.models[&first.sources[reference_source(cx, first)].model]
            .tensors
            .len(),
    );
    let last = &slices[slices.len() - 1];
    outside_layers(cx, first, true, &mut tensors)?;
    let mut out_layer = 0u64;
    // (model, layer) each output layer comes from: its reference source's
    let mut origins: Vec<(&str, u64)> = Vec::new();
    // each reference model's layer tensors by layer, found in one pass over its names (a scan
    // of every name for every layer was quadratic: minutes for 200k tensors)
    let mut by_layer: HashMap<&str, LayerNames> = HashMap::new();
    for s in slices {
        let (a, b) = s.sources[0].layer_range.unwrap_or((0, 0));
        let n = b - a;
        let refi = reference_source(cx, s);
        let rsrc = &s.sources[refi];
        let rmodel = &cx.models[&rsrc.model];
        let layers = by_layer
            .entry(rsrc.model.as_str())
            .or_insert_with(|| layer_names(rmodel, cx.arch));
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
                tensors.push(plan_tensor(cx, s, &out_name, &ins, t)?);
            }
            origins.push((rsrc.model.as_str(), rlayer));
            out_layer += 1;
        }
    }
    outside_layers(cx, last, false, &mut tensors)?;
    tensors.shrink_to_fit();
    Ok((tensors, origins))
}

/// The output `config.json`: the donor's, with the recipe's dtype and the output's layers.
fn output_config(
    recipe: &Recipe,
    donor: &str,
    arch: &Arch,
    models: &HashMap<String, ModelInfo>,
    origins: &[(&str, u64)],
) -> Result<Option<Value>> {
    let mut config = models[donor].config.clone();
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
        layer_config(c, arch, models, origins)?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dare_linear tensor job over base + two models, with `density` for both.
    fn dare_job(out: &str, ins: &[&str; 3], shape: &[u64], density: f64) -> TensorPlan {
        let mut t = typed::test_tensor(out, "dare_linear", shape, 3);
        for (input, name) in t.inputs.iter_mut().zip(ins) {
            input.tensor = name.to_string();
        }
        let mp = |w: f64| -> HashMap<String, f64> {
            [("weight".to_string(), w), ("density".to_string(), density)].into()
        };
        t.model_params = vec![Default::default(), mp(1.0).into(), mp(1.0).into()];
        t.base = Some(0);
        t
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
