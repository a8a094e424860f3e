//! `shardmerge extract-lora`: a PEFT LoRA adapter that takes a base model to (a low-rank
//! approximation of) a fine-tuned one, with mergekit-extract-lora's rules (mergekit 0.1.5).
//!
//! The coordinator's part: plan from the two models' headers which modules are factored, which
//! are saved whole (`modules_to_save`) and what each factoring task needs in memory; run one
//! task per module (`shardmerge_worker::exec::extract`: the task vector, its SVD and the
//! module's factors, written as a part); then commit the adapter from the parts (`commit.rs`).
//! A module's rank is known only once its SVD ran (`--sv-epsilon`), so the adapter's header is
//! laid out at the commit, from the parts' own headers. No arithmetic happens here.

use std::collections::BTreeSet;
use std::path::Path;

use regex::Regex;
use shardmerge_worker::exec::extract::{promoted, task_memory, ModuleTask, Source};
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::format::safetensors::{StDtype, TensorInfo};
use shardmerge_worker::kernels::lowrank::LowRank;
use shardmerge_worker::storage::{Location, Resolver};

use crate::arch::Place;
use crate::error::{Error, Result};
use crate::plan::{load_model, ModelInfo};

mod commit;
mod config;
mod run;

pub use run::{run, Extracted, RunOptions};

/// mergekit-extract-lora's options (same names and defaults).
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    pub max_rank: usize,
    pub distribute_scale: bool,
    pub embed_lora: bool,
    /// `--save-module`: module names, or their last component, saved whole.
    pub save_modules: Vec<String>,
    pub exclude: Vec<Regex>,
    pub include: Vec<Regex>,
    pub sv_epsilon: f64,
    pub skip_undecomposable: bool,
}

/// A tensor copied whole from the fine-tuned model into the adapter.
#[derive(Clone, Debug)]
pub struct Saved {
    /// Its name in the adapter (`base_model.model.` + its name in the model).
    pub name: String,
    pub uri: String,
    pub info: TensorInfo,
}

/// What the extraction does, known from headers.
#[derive(Clone, Debug)]
pub struct ExtractPlan {
    pub ft: ModelInfo,
    pub base: ModelInfo,
    /// The factoring tasks, one per module (their `part` is set when the job runs).
    pub modules: Vec<ModuleTask>,
    pub saved: Vec<Saved>,
    /// `modules_to_save` of the adapter's config, in the order they were added.
    pub modules_to_save: Vec<String>,
    /// Notes for the user (vocabulary mismatch, modules saved whole, ...).
    pub notes: Vec<String>,
}

impl ExtractPlan {
    /// The memory of the largest task.
    pub fn peak_task_memory(&self) -> u64 {
        self.modules.iter().map(module_memory).max().unwrap_or(0)
    }
}

/// The memory of a module's task (`exec::extract::task_memory`).
pub fn module_memory(t: &ModuleTask) -> u64 {
    let size = t.ft.dtype.size().max(t.base.dtype.size()) as u64;
    task_memory(t.shape[0], t.shape[1], size, t.lowrank.max_rank as u64)
}

/// How mergekit treats a module (from the transformers module type; here from the headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `nn.Linear` (a 2-D weight).
    Linear,
    /// The output embedding (`lm_head`): a Linear, but saved whole without `--embed-lora`.
    OutEmbedding,
    /// `nn.Embedding`: factored transposed with `--embed-lora`, else saved whole.
    Embedding,
    /// Norms, GPT-2's Conv1D, anything else with a weight: saved whole, or skipped.
    Other,
}

/// Plans the extraction of `ft` against `base` (names as given on the command line).
pub async fn plan(
    ft: &str,
    base: &str,
    o: &ExtractOptions,
    resolver: &Resolver,
    base_dir: &Path,
) -> Result<ExtractPlan> {
    let ft = load_model(resolver, base_dir, ft).await?;
    let base = load_model(resolver, base_dir, base).await?;
    plan_models(ft, base, o)
}

/// The modules of `m` (a `.weight` of a float dtype), in mergekit's walk order: before the
/// layers, the layers in order, after the layers (names sorted within each).
fn modules(m: &ModelInfo) -> Vec<String> {
    let mut keyed: Vec<((u8, u64), String)> = m
        .tensors
        .iter()
        .filter(|(_, (_, t))| matches!(t.dtype, StDtype::Float(_)))
        .filter_map(|(n, _)| n.strip_suffix(".weight"))
        .map(|module| {
            let w = format!("{module}.weight");
            let at = match m.arch.place(&w) {
                Place::Pre => (0, 0),
                Place::Layer { index, .. } => (1, index),
                Place::Post => (2, 0),
            };
            (at, module.to_string())
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, n)| n).collect()
}

fn kind(m: &ModelInfo, module: &str, shape: &[u64]) -> Kind {
    let w = format!("{module}.weight");
    if m.arch.is_embedding(&w) {
        return match m.arch.place(&w) {
            Place::Pre => Kind::Embedding,
            _ => Kind::OutEmbedding,
        };
    }
    // GPT-2's Conv1D is no nn.Linear: mergekit saves it whole
    if shape.len() == 2 && !crate::plan::lora::is_conv1d_model(m) {
        Kind::Linear
    } else {
        Kind::Other
    }
}

/// The last component of a module name (mergekit's key for `modules_to_save`).
fn key(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// Rows of the input embedding, if the model has one.
fn vocab(m: &ModelInfo) -> Option<u64> {
    m.tensors
        .iter()
        .find(|(n, _)| m.arch.is_embedding(n) && m.arch.place(n) == Place::Pre)
        .and_then(|(_, (_, t))| t.shape.first().copied())
}

/// Plans from the two models' headers, following mergekit's walk over the modules.
pub fn plan_models(ft: ModelInfo, base: ModelInfo, o: &ExtractOptions) -> Result<ExtractPlan> {
    let mut notes = Vec::new();
    let mut embed_lora = o.embed_lora;
    let (fv, bv) = (vocab(&ft), vocab(&base));
    if embed_lora && fv != bv {
        notes.push(format!("vocabulary sizes differ (fine-tuned {fv:?}, base {bv:?}): embeddings saved whole, as if without --embed-lora"));
        embed_lora = false;
    }
    let mut p = ExtractPlan {
        modules: Vec::new(),
        saved: Vec::new(),
        modules_to_save: o.save_modules.clone(),
        notes,
        ft,
        base,
    };
    let excluded = |n: &str| o.exclude.iter().any(|r| r.is_match(n));
    let extract =
        |n: &str| (o.include.is_empty() || o.include.iter().any(|r| r.is_match(n))) && !excluded(n);
    let mut warned = BTreeSet::new();
    for module in modules(&p.ft) {
        let (_, w) = &p.ft.tensors[&format!("{module}.weight")];
        let kind = kind(&p.ft, &module, &w.shape);
        let k = key(&module).to_string();
        let embed = matches!(kind, Kind::Embedding | Kind::OutEmbedding);
        if !embed_lora && embed && !excluded(&module) && !p.modules_to_save.contains(&k) {
            p.notes.push(format!(
                "{k} saved whole (modules_to_save; --embed-lora factors it)"
            ));
            p.modules_to_save.push(k.clone());
        }
        if p.modules_to_save.iter().any(|s| *s == module || *s == k) {
            save(&mut p, &module);
        } else if extract(&module) {
            if kind == Kind::Other {
                if !o.skip_undecomposable {
                    if !p.modules_to_save.contains(&k) {
                        p.modules_to_save.push(k.clone());
                    }
                    save(&mut p, &module);
                }
                if warned.insert(k.clone()) {
                    let what = if o.skip_undecomposable {
                        "skipped"
                    } else {
                        "saved whole"
                    };
                    p.notes.push(format!(
                        "{k} cannot be factored (not a linear layer or an embedding): {what}"
                    ));
                }
            } else {
                let t = module_task(&p, &module, kind == Kind::Embedding, o)?;
                p.modules.push(t);
            }
        }
    }
    if p.modules.is_empty() {
        return Err(Error::input(
            p.ft.loc.uri(),
            "no module to factor (every one is excluded, saved whole or not a linear layer)",
        ));
    }
    Ok(p)
}

/// Adds the weight and bias of `module` of the fine-tuned model to the tensors saved whole.
fn save(p: &mut ExtractPlan, module: &str) {
    for suffix in ["weight", "bias"] {
        let n = format!("{module}.{suffix}");
        if let Some((uri, info)) = p.ft.tensors.get(&n) {
            p.saved.push(Saved {
                name: format!("base_model.model.{n}"),
                uri: uri.to_string(),
                info: info.clone(),
            });
        }
    }
}

/// The tensor `name` of both models, as sources of one shape, or an error naming it.
fn pair(p: &ExtractPlan, name: &str) -> Result<(Source, Source, Vec<u64>)> {
    let src = |m: &ModelInfo| -> Result<(Source, Vec<u64>)> {
        let (uri, t) = m.tensors.get(name).ok_or_else(|| {
            Error::input(
                m.loc.uri(),
                format!("has no tensor {name}, which the fine-tuned model has"),
            )
        })?;
        let StDtype::Float(dtype) = t.dtype else {
            return Err(Error::input(
                m.loc.uri(),
                format!("tensor {name} is {}, not a float", t.dtype.name()),
            ));
        };
        let s = Source {
            uri: uri.to_string(),
            start: t.start,
            end: t.end,
            dtype,
        };
        Ok((s, t.shape.clone()))
    };
    let (f, fs) = src(&p.ft)?;
    let (b, bs) = src(&p.base)?;
    if fs != bs {
        return Err(Error::plan(
            name,
            format!("shape {fs:?} in the fine-tuned model but {bs:?} in the base: no task vector"),
        ));
    }
    Ok((f, b, fs))
}

fn module_task(
    p: &ExtractPlan,
    module: &str,
    embedding: bool,
    o: &ExtractOptions,
) -> Result<ModuleTask> {
    let (ft, base, shape) = pair(p, &format!("{module}.weight"))?;
    let bias_name = format!("{module}.bias");
    let bias = match p.ft.tensors.contains_key(&bias_name) {
        true => {
            let (f, b, _) = pair(p, &bias_name)?;
            Some((f, b))
        }
        false => None,
    };
    let dtype: DType = promoted(ft.dtype, base.dtype);
    Ok(ModuleTask {
        module: module.to_string(),
        shape: [shape[0], shape[1]],
        ft,
        base,
        bias,
        embedding,
        dtype,
        lowrank: LowRank {
            max_rank: o.max_rank,
            sv_epsilon: o.sv_epsilon,
            distribute_scale: o.distribute_scale,
        },
        part: String::new(),
    })
}

/// Where the parts of a job writing `out` go: a folder inside it, removed at the commit.
pub fn parts_folder(out: &Location) -> Location {
    out.join(".shardmerge-extract")
}
