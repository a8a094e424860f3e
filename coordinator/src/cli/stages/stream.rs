//! Which intermediates are streamed into the final job (computed in its tasks, never written)
//! and which are written first, with why; and the final job's recipe: the streamed stages with
//! their names, the final stage, and every written stage named by its location.

use super::{absolute, Role, StageJob};
use crate::cut::{self, CutOptions};
use crate::error::Result;
use crate::job::SubmitOptions;
use crate::planinfo::{self, PlanInfo};
use crate::recipe::Recipe;
use shardmerge_worker::storage::Resolver;

/// Why a stage planned ahead cannot be streamed, if it cannot: it re-maps a vocabulary, or a
/// stage names it with a LoRA adapter.
fn cannot_stream(jobs: &[StageJob<'_>], k: usize, info: &PlanInfo) -> Option<String> {
    let name = jobs[k].stage.name.as_deref()?;
    if info.plan.tensors.iter().any(|t| t.row_map.is_some())
        || !info.plan.tokenizer_files.is_empty()
    {
        return Some("it re-maps the vocabulary (tokenizer_source / tokenizer:)".into());
    }
    let with_adapter = jobs.iter().any(|j| {
        Recipe::parse(&j.stage.raw_text()).is_ok_and(|r| {
            r.referenced_models()
                .iter()
                .any(|m| m.split_once('+').is_some_and(|(m, _)| m == name))
        })
    });
    with_adapter.then(|| "a stage names it with a LoRA adapter".to_string())
}

/// Marks the intermediates (`Role::Scratch`) that stream into the final job `Role::Streamed`;
/// the others keep `why` they are written. A stage streams when it was planned ahead, does not
/// re-map a vocabulary, is not named with a LoRA adapter, every stage that uses it streams too
/// (or is the final one), and every tensor of it that must be computed whole fits a worker
/// slot in the task that uses it. Then the final job's recipe is set.
pub(super) async fn choose(
    jobs: &mut [StageJob<'_>],
    infos: &[Option<PlanInfo>],
    o: &SubmitOptions,
    workers: usize,
    resolver: &Resolver,
) -> Result<()> {
    for k in 0..jobs.len() {
        if jobs[k].role != Role::Scratch {
            continue;
        }
        let why = match &infos[k] {
            None => Some(
                "a later stage's vocabulary is read from it, so it is planned only once written"
                    .to_string(),
            ),
            Some(info) => cannot_stream(jobs, k, info),
        };
        match why {
            None => jobs[k].role = Role::Streamed,
            Some(w) => jobs[k].why = Some(w),
        }
    }
    loop {
        close(jobs);
        if !jobs.iter().any(|j| j.role == Role::Streamed) {
            break;
        }
        let text = final_text(jobs, &o.base_dir);
        let info = planinfo::describe(&text, o, workers, resolver).await?;
        let opts = CutOptions {
            task_size: o.task_size,
            slot_memory: o.slot_memory_for(&info.plan)?,
            min_part: 0,
        };
        let Some((stage, why)) = cut::unfit_stage(&info.plan, &opts) else {
            break;
        };
        if let Some(j) = jobs
            .iter_mut()
            .find(|j| j.stage.name.as_deref() == Some(&stage))
        {
            j.role = Role::Scratch;
            j.why = Some(why);
        } else {
            break;
        }
    }
    let text = final_text(jobs, &o.base_dir);
    if let Some(f) = jobs.iter_mut().find(|j| j.role == Role::Final) {
        f.text = text;
    }
    Ok(())
}

/// Streams no stage that a written stage uses (a written stage is a job of its own).
fn close(jobs: &mut [StageJob<'_>]) {
    loop {
        let written: Vec<(String, String)> = jobs
            .iter()
            .filter(|j| !matches!(j.role, Role::Streamed | Role::Final))
            .flat_map(|j| {
                let user = j.stage.label();
                j.stage.deps.iter().map(move |d| (d.clone(), user.clone()))
            })
            .collect();
        let mut changed = false;
        for j in jobs.iter_mut().filter(|j| j.role == Role::Streamed) {
            let name = j.stage.name.as_deref().unwrap_or_default();
            if let Some((_, user)) = written.iter().find(|(d, _)| d == name) {
                j.role = Role::Scratch;
                j.why = Some(format!("{user}, which is written, uses it"));
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

/// The final job's recipe: each streamed stage (with its `name:`), then the final stage, every
/// written stage they name replaced by its location; just the final stage's recipe when no
/// stage streams.
fn final_text(jobs: &[StageJob<'_>], base: &std::path::Path) -> String {
    let locate = |n: &str| -> String {
        match jobs.iter().find(|j| j.stage.name.as_deref() == Some(n)) {
            Some(j) if j.role == Role::Streamed => n.to_string(),
            Some(j) => absolute(&j.out, base),
            None => n.to_string(),
        }
    };
    let mut docs: Vec<String> = jobs
        .iter()
        .filter(|j| j.role == Role::Streamed)
        .map(|j| {
            let name = j.stage.name.as_deref().unwrap_or_default();
            format!("name: {name}\n{}", j.stage.text(&locate))
        })
        .collect();
    if let Some(f) = jobs.iter().find(|j| j.role == Role::Final) {
        docs.push(f.stage.text(&locate));
    }
    docs.join("---\n")
}
