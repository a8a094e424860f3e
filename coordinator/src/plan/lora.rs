//! LoRA adapters (`model+adapter`): which adapter tensors each tensor of the model reads, with
//! PEFT's semantics. The adapter's `adapter_config.json` and its safetensors header are read
//! (range reads, never the data); the arithmetic is the worker's (`kernels::lora`).
//!
//! PEFT's rules followed here (peft 0.21, `merge_and_unload`, which mergekit runs):
//! - keys are `base_model.model.MODULE.lora_A.weight` / `.lora_B.weight` (embeddings:
//!   `.lora_embedding_A` [r, rows] and `.lora_embedding_B` [cols, r]); the target is
//!   `MODULE.weight`;
//! - every other key (`modules_to_save` copies, biases saved with `bias: all|lora_only`, an
//!   embedding's `base_layer.weight`) replaces the model's tensor of that name (with
//!   `.base_layer` dropped), rounded to the model's dtype;
//! - scaling is `alpha / r`, `alpha / sqrt(r)` with `use_rslora`; `r` and `alpha` come from the
//!   first key of `rank_pattern` / `alpha_pattern` (in file order) that matches the module name
//!   as the regex `(.*\.)?(KEY)$`, else `r` / `lora_alpha`;
//! - the delta is added in f32 and the sum rounded to the weight's dtype, but an embedding's
//!   delta is rounded to that dtype first (peft's `Embedding.merge` casts it);
//! - the delta is transposed for embeddings and for GPT-2's Conv1D modules (fan_in_fan_out:
//!   PEFT sets it from the module's type whatever the config says).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::format::safetensors::{StDtype, TensorInfo};
use shardmerge_worker::storage::Resolver;

use super::load::{read_header, read_json};
use super::{InputPlan, ModelInfo};
use crate::error::{Error, Result};

mod config;
use config::LoraConfig;

const PREFIX: &str = "base_model.model.";
pub(super) const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The files of a PEFT adapter that its effect on a merge depends on.
pub(crate) const ADAPTER_FILES: [&str; 2] = [CONFIG_FILE, WEIGHTS_FILE];

/// An adapter's tensor: where its data lies.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterTensor {
    pub uri: Arc<str>,
    pub name: String,
    pub offset: u64,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// PEFT's delta of one module: `transpose?(B A) * scaling`.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    pub a: AdapterTensor,
    pub b: AdapterTensor,
    pub scaling: f64,
    pub transpose: bool,
    /// An embedding's (`lora_embedding_A/B`): PEFT rounds its delta to the weight's dtype
    /// before adding it.
    pub embedding: bool,
}

/// What an adapter does to one input: the input is read (from the adapter, when it replaces
/// the tensor), the delta added, and the sum rounded to `merged` (the model's dtype).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPlan {
    /// The adapter's reference, for messages.
    pub adapter: Arc<str>,
    pub delta: Option<Delta>,
    pub merged: DType,
}

impl LoraPlan {
    /// Bytes of the adapter's factors a task over `rows` rows of a tensor of `rows_total`
    /// reads, and holds as f32 beside: (fixed, per row).
    pub fn memory(&self) -> (u64, u64) {
        let Some(d) = &self.delta else { return (0, 0) };
        let n = |t: &AdapterTensor| t.shape.iter().product::<u64>();
        let per = |t: &AdapterTensor| 4 + t.dtype.size() as u64;
        let rank = d.a.shape.first().copied().unwrap_or(0);
        if d.transpose {
            (n(&d.b) * per(&d.b), rank * per(&d.a))
        } else {
            (n(&d.a) * per(&d.a), rank * per(&d.b))
        }
    }

    /// Bytes of the adapter's tensors this input reads in all.
    pub fn bytes(&self) -> u64 {
        self.delta.as_ref().map_or(0, |d| {
            [&d.a, &d.b]
                .iter()
                .map(|t| t.shape.iter().product::<u64>() * t.dtype.size() as u64)
                .sum()
        })
    }
}

/// What an adapter does to one tensor of its model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Edit {
    /// The adapter's own copy, read instead of the model's.
    pub replace: Option<AdapterTensor>,
    pub delta: Option<Delta>,
}

/// An adapter, resolved against the model it applies to: its edits by tensor name.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub reference: Arc<str>,
    pub edits: BTreeMap<String, Edit>,
    /// Bytes of its safetensors data.
    pub bytes: u64,
}

impl Adapter {
    /// (tensors given a delta, tensors replaced by the adapter's copies, their largest rank)
    pub fn summary(&self) -> (usize, usize, u64) {
        let deltas = self.edits.values().filter_map(|e| e.delta.as_ref());
        let rank = deltas
            .clone()
            .map(|d| d.a.shape.first().copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        let replaced = self.edits.values().filter(|e| e.replace.is_some()).count();
        (deltas.count(), replaced, rank)
    }

    /// Gives `input` (tensor `name` of the adapter's model) what the adapter does to it.
    pub fn attach(&self, name: &str, input: &mut InputPlan) {
        let Some(e) = self.edits.get(name) else {
            return;
        };
        let merged = input.dtype;
        if let Some(r) = &e.replace {
            input.uri = r.uri.clone();
            input.data_offset = r.offset;
            input.dtype = r.dtype;
        }
        if e.delta.is_some() || input.dtype != merged {
            input.lora = Some(Arc::new(LoraPlan {
                adapter: self.reference.clone(),
                delta: e.delta.clone(),
                merged,
            }));
        }
    }
}

/// Input `name` of a recipe: a model (known from an earlier stage's plan in `given`, else
/// read), and for `model+adapter` its LoRA adapter, resolved against it.
pub(super) async fn load_input(
    resolver: &Resolver,
    base_dir: &Path,
    name: &str,
    given: &super::Given,
) -> Result<ModelInfo> {
    let (model, adapter) = match name.split_once('+') {
        Some((m, a)) => (m, Some(a)),
        None => (name, None),
    };
    let mut m = match given.get(model) {
        Some(m) => m.clone(),
        None => super::load_model(resolver, base_dir, model).await?,
    };
    if let Some(a) = adapter {
        let ad = load_adapter(resolver, base_dir, a, &m).await?;
        m.bytes += ad.bytes;
        m.adapter = Some(Arc::new(ad));
    }
    m.name = name.to_string();
    Ok(m)
}

/// Reads adapter `reference` (a local path, `s3://` URI or Hub id, with `@revision`) and
/// resolves it against `model`.
pub async fn load_adapter(
    resolver: &Resolver,
    base_dir: &Path,
    reference: &str,
    model: &ModelInfo,
) -> Result<Adapter> {
    let r = shardmerge_worker::storage::hub::model_reference(reference, base_dir);
    let loc = resolver.resolve(&r, base_dir)?;
    let cfg_loc = loc.join(CONFIG_FILE);
    let cfg = read_json(&cfg_loc).await?.ok_or_else(|| {
        Error::input(
            cfg_loc.uri(),
            format!("adapter {reference} has no {CONFIG_FILE} (is it a PEFT LoRA adapter?)"),
        )
    })?;
    let cfg = LoraConfig::parse(&cfg, reference)?;
    let wloc = loc.join(WEIGHTS_FILE);
    if !wloc.store.exists(&wloc.path).await? {
        return Err(Error::input(
            wloc.uri(),
            format!("adapter {reference} has no {WEIGHTS_FILE} (adapters saved as .bin are not read; save it with safe_serialization)"),
        ));
    }
    let header = read_header(&wloc).await?;
    let uri: Arc<str> = wloc.uri().into();
    let bytes = header.tensors.values().map(|t| t.end - t.start).sum();
    let edits = resolve(&cfg, reference, model, &uri, &header.tensors)?;
    Ok(Adapter {
        reference: reference.into(),
        edits,
        bytes,
    })
}

/// One module's factors, as found in the adapter's keys.
#[derive(Default)]
struct Factors<'a> {
    a: Option<(&'a str, &'a TensorInfo)>,
    b: Option<(&'a str, &'a TensorInfo)>,
    embedding: bool,
}

/// The adapter's edits by tensor name of `model`.
fn resolve(
    cfg: &LoraConfig,
    reference: &str,
    model: &ModelInfo,
    uri: &Arc<str>,
    tensors: &BTreeMap<String, TensorInfo>,
) -> Result<BTreeMap<String, Edit>> {
    let bad = |key: &str, why: String| {
        Error::input(uri.as_ref(), format!("adapter {reference}: {key}: {why}"))
    };
    let mut modules: BTreeMap<&str, Factors> = BTreeMap::new();
    let mut edits: BTreeMap<String, Edit> = BTreeMap::new();
    for (key, info) in tensors {
        let name = key
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad(key, format!("not a PEFT key (they start with `{PREFIX}`)")))?;
        let part = [
            (".lora_A.weight", 'a', false),
            (".lora_B.weight", 'b', false),
            (".lora_embedding_A", 'a', true),
            (".lora_embedding_B", 'b', true),
        ]
        .into_iter()
        .find_map(|(suffix, which, emb)| name.strip_suffix(suffix).map(|m| (m, which, emb)));
        if let Some((module, which, emb)) = part {
            let f = modules.entry(module).or_default();
            f.embedding |= emb;
            let slot = if which == 'a' { &mut f.a } else { &mut f.b };
            *slot = Some((key.as_str(), info));
            continue;
        }
        if name.contains("lora_magnitude_vector") {
            return Err(bad(key, "DoRA (use_dora) is not supported: its merge rescales each column by a norm of the merged weight".into()));
        }
        if name.contains(".lora_") {
            return Err(bad(key, "a LoRA part this planner does not know (supported: lora_A, lora_B, lora_embedding_A, lora_embedding_B)".into()));
        }
        let target = name.replace(".base_layer.", ".");
        let t = target_info(model, &target).ok_or_else(|| {
            bad(
                key,
                format!(
                    "replaces {target}, which model {} does not have",
                    model.name
                ),
            )
        })?;
        if t.shape != info.shape || !matches!(t.dtype, StDtype::Float(_)) {
            return Err(bad(
                key,
                format!(
                    "replaces {target} {:?} {} with a {:?} {} tensor",
                    t.shape,
                    st_name(&t.dtype),
                    info.shape,
                    st_name(&info.dtype)
                ),
            ));
        }
        edits.entry(target).or_default().replace =
            Some(adapter_tensor(uri, key, info).map_err(|w| bad(key, w))?);
    }
    for (module, f) in modules {
        let (Some(a), Some(b)) = (f.a, f.b) else {
            return Err(bad(module, "has only one of lora_A and lora_B".into()));
        };
        let target = format!("{module}.weight");
        let t = target_info(model, &target).ok_or_else(|| {
            bad(
                a.0,
                format!("targets {target}, which model {} does not have", model.name),
            )
        })?;
        let delta = delta(cfg, model, module, &t.shape, (a, b), f.embedding, uri)
            .map_err(|w| bad(a.0, w))?;
        edits.entry(target).or_default().delta = Some(delta);
    }
    Ok(edits)
}

fn st_name(d: &StDtype) -> &'static str {
    match d {
        StDtype::Float(dt) => dt.name(),
        StDtype::Other(n, _) => n,
    }
}

fn target_info<'a>(model: &'a ModelInfo, name: &str) -> Option<&'a TensorInfo> {
    model.tensors.get(name).map(|(_, t)| t)
}

fn adapter_tensor(
    uri: &Arc<str>,
    key: &str,
    info: &TensorInfo,
) -> std::result::Result<AdapterTensor, String> {
    let StDtype::Float(dtype) = info.dtype else {
        return Err(format!(
            "dtype {} (adapters hold F32, F16 or BF16 tensors)",
            st_name(&info.dtype)
        ));
    };
    Ok(AdapterTensor {
        uri: uri.clone(),
        name: key.to_string(),
        offset: info.start,
        dtype,
        shape: info.shape.clone(),
    })
}

/// Module `module`'s delta for a target of shape `w`, checked against the config's rank.
fn delta(
    cfg: &LoraConfig,
    model: &ModelInfo,
    module: &str,
    w: &[u64],
    ((ak, a), (bk, b)): ((&str, &TensorInfo), (&str, &TensorInfo)),
    embedding: bool,
    uri: &Arc<str>,
) -> std::result::Result<Delta, String> {
    let (r, alpha) = cfg.rank_alpha(module);
    let (sa, sb) = (&a.shape, &b.shape);
    if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] {
        return Err(format!(
            "lora_A {sa:?} and lora_B {sb:?} are not a rank decomposition"
        ));
    }
    if sa[0] != r {
        return Err(format!(
            "rank {} in the file, but the config gives module {module} rank {r} (r / rank_pattern)",
            sa[0]
        ));
    }
    let (plain, transposed) = ([sb[0], sa[1]], [sa[1], sb[0]]);
    let transpose = if embedding {
        true
    } else if w == plain && w == transposed {
        // square: only GPT-2's Conv1D modules store their weight transposed
        is_conv1d_model(model)
    } else {
        w == transposed
    };
    let want = if transpose { transposed } else { plain };
    if w != want {
        return Err(format!(
            "B A has shape {plain:?}, which does not fit {module}.weight {w:?}"
        ));
    }
    let scaling = if cfg.use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    Ok(Delta {
        a: adapter_tensor(uri, ak, a)?,
        b: adapter_tensor(uri, bk, b)?,
        scaling,
        transpose,
        embedding,
    })
}

/// Whether the model's linear layers are GPT-2's Conv1D (weights stored [in, out]).
pub(crate) fn is_conv1d_model(model: &ModelInfo) -> bool {
    let t = model
        .config
        .as_ref()
        .and_then(|c| c.get("model_type"))
        .and_then(Value::as_str);
    matches!(
        t,
        Some("gpt2" | "openai-gpt" | "imagegpt" | "decision_transformer")
    )
}
