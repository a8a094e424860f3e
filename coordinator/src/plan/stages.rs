//! A multi-stage recipe planned as one job (its stages *streamed*): every stage is planned from
//! headers, each later one from the plans of the stages it names (`planned_model`), and then
//! each input that names a stage is *derived*: it carries that stage's plan of the tensor it
//! reads, which the worker computes in the same task, for the same rows, and rounds to the
//! stage's output dtype as writing the stage's checkpoint and reading it back would
//! (`TensorSource::derived`). No stage but the final one is written.
//!
//! A job of this kind is a file whose every named stage the final (unnamed) stage needs; a
//! stage that cannot be streamed (one that re-maps a vocabulary, or is named with a LoRA
//! adapter) is refused with why: `shardmerge run` and `submit` write such a stage as an
//! intermediate of its own first (`cli/stages.rs`), and name its checkpoint instead.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use shardmerge_worker::storage::{Location, Resolver};

use super::{planned_model, Derived, InputPlan, Plan, PlanOptions, TensorPlan};
use crate::error::{Error, Result};
use crate::recipe::stages::Stages;
use crate::recipe::Recipe;

/// A stage planned already: its tensors (shared by every input derived from them), found by
/// name, and where its tokenizer files come from.
struct Planned {
    tensors: Vec<Arc<TensorPlan>>,
    by_name: HashMap<String, usize>,
    tokenizer_from: Option<Location>,
    /// Where its checkpoint would lie (`virtual_at`).
    at: String,
}

/// Why stage `name` cannot be streamed, for the error that says so.
fn refuse(name: &str, why: &str) -> Error {
    Error::recipe(
        format!("stage `{name}`"),
        format!("it cannot be streamed into the stages that use it: {why}; write it as an intermediate (shardmerge run/submit do that for such a stage)"),
    )
}

/// Plans multi-stage file `st` as one job whose output is its final stage, every other stage
/// streamed into it. `text` is the file (the model card embeds it); `virtual_at(name)` names
/// where a stage's checkpoint would lie (in messages only: nothing is written there).
pub async fn plan_streamed(
    st: &Stages,
    text: &str,
    resolver: &Resolver,
    base_dir: &Path,
    opts: &PlanOptions,
    virtual_at: &dyn Fn(&str) -> Result<Location>,
) -> Result<Plan> {
    let fin = st.final_stage().ok_or_else(|| {
        Error::recipe(
            "",
            "a multi-stage recipe runs as one job only with a final (unnamed) stage",
        )
    })?;
    let needed: Vec<usize> = st.needed_for(fin).iter().map(|s| s.index).collect();
    if let Some(s) = st.stages.iter().find(|s| !needed.contains(&s.index)) {
        let name = s.name.as_deref().unwrap_or_default();
        return Err(refuse(name, "the final stage does not use it"));
    }
    let mut given: HashMap<String, super::ModelInfo> = HashMap::new();
    let mut planned: HashMap<String, Planned> = HashMap::new();
    let mut models: Vec<super::ModelInfo> = Vec::new();
    for s in &st.stages {
        let recipe = Recipe::parse(&s.raw_text()).map_err(|e| in_stage(&s.label(), e))?;
        if let Some(d) = recipe.referenced_models().iter().find_map(|m| {
            m.split_once('+')
                .filter(|(m, _)| s.deps.iter().any(|d| d == m))
        }) {
            return Err(refuse(d.0, "a LoRA adapter is applied to it"));
        }
        let o = PlanOptions {
            given: Arc::new(given.clone()),
            ..opts.clone()
        };
        let mut plan = super::plan(recipe, resolver, base_dir, &o)
            .await
            .map_err(|e| in_stage(&s.label(), e))?;
        derive(&mut plan, &planned);
        for m in &plan.models {
            let real = !planned.contains_key(&m.name);
            if real && !models.iter().any(|x| x.loc.uri() == m.loc.uri()) {
                models.push(m.clone());
            }
        }
        let Some(name) = &s.name else {
            plan.models = models;
            plan.recipe.text = text.to_string();
            return Ok(plan);
        };
        if plan.tensors.iter().any(|t| t.row_map.is_some()) || !plan.tokenizer_files.is_empty() {
            return Err(refuse(
                name,
                "it re-maps the vocabulary (tokenizer_source / tokenizer:)",
            ));
        }
        let at = virtual_at(name)?;
        given.insert(name.clone(), planned_model(name, at.clone(), &plan));
        planned.insert(name.clone(), Planned::of(plan, at.uri()));
    }
    Err(Error::recipe(
        "",
        "the final stage was not planned (stage order error)",
    ))
}

/// `e` with the stage it happened in.
fn in_stage(label: &str, e: Error) -> Error {
    match e {
        Error::Recipe { key, reason } if key.is_empty() => Error::Recipe {
            key: label.to_string(),
            reason,
        },
        Error::Recipe { key, reason } => Error::Recipe {
            key: format!("{label}: {key}"),
            reason,
        },
        Error::Input { at, reason } => Error::Input {
            at: format!("{label}: {at}").trim_end_matches(": ").to_string(),
            reason,
        },
        e => e,
    }
}

impl Planned {
    fn of(plan: Plan, at: String) -> Planned {
        let by_name = plan
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Planned {
            tensors: plan.tensors.into_iter().map(Arc::new).collect(),
            by_name,
            tokenizer_from: plan.tokenizer_from,
            at,
        }
    }
}

/// Makes every input of `plan` that names a stage of `planned` derived from that stage's
/// tensor; a copied (non-float) tensor instead reads what the stage's copy reads (every one of
/// its inputs, which must all agree, as the stage's own run checks). Tokenizer files that
/// would come from a stage come from where that stage takes them.
fn derive(plan: &mut Plan, planned: &HashMap<String, Planned>) {
    let inner_of = |i: &InputPlan| {
        let s = planned.get(&*i.model)?;
        s.by_name.get(&i.tensor).map(|&k| s.tensors[k].clone())
    };
    for t in &mut plan.tensors {
        if t.is_copy() {
            splice_copy(t, &inner_of);
            continue;
        }
        for i in &mut t.inputs {
            i.derived = inner_of(i).map(Derived);
        }
    }
    let from = plan.tokenizer_from.as_ref().map(Location::uri);
    if let Some(s) = planned.values().find(|s| Some(&s.at) == from.as_ref()) {
        plan.tokenizer_from = s.tokenizer_from.clone();
    }
}

/// A copied tensor's inputs with each one that a stage copies replaced by that copy's inputs
/// (its base, if it was one, the first of them).
fn splice_copy(t: &mut TensorPlan, inner_of: &dyn Fn(&InputPlan) -> Option<Arc<TensorPlan>>) {
    let (mut inputs, mut params, mut base) = (Vec::new(), Vec::new(), None);
    for (k, (i, p)) in t.inputs.iter().zip(&t.model_params).enumerate() {
        if t.base == Some(k) {
            base = Some(inputs.len());
        }
        match inner_of(i) {
            Some(inner) => {
                inputs.extend(inner.inputs.iter().cloned());
                params.extend(inner.model_params.iter().cloned());
            }
            None => {
                inputs.push(i.clone());
                params.push(p.clone());
            }
        }
    }
    (t.inputs, t.model_params, t.base) = (inputs, params, base);
}

/// Where stage `name` of a streamed job writing `out` would lie, were it written: next to the
/// output, for messages only (nothing is read or written there).
pub fn stage_location(out: &Location, name: &str) -> Result<Location> {
    let base = out.path.trim_end_matches('/');
    Ok(Location {
        store: out.store.clone(),
        path: format!("{base}.stage-{name}"),
    })
}
