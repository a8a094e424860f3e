//! Planning a submitted job off the async runtime, within a time budget.
//!
//! Parsing a recipe, resolving it per tensor and cutting it into tasks is CPU work that scales
//! with what a caller sends. It runs on a blocking thread (the header reads it makes still go
//! through the runtime's I/O), so a large or hostile submission cannot hold a runtime thread
//! that `ListJobs`, polls and running jobs need; at most [`PLANS_AT_ONCE`] plans run at once,
//! and one that takes longer than `--max-plan-time` is refused.
//!
//! [`cut_like`]: crate::cut::cut_like

use std::sync::Arc;
use std::time::Duration;

use shardmerge_worker::storage::{Location, Resolver};

use super::{JobManager, SubmitOptions};
use crate::cut::{self, Cut, CutOptions};
use crate::error::{Error, Result};
use crate::plan::{self, Plan, PlanOptions};
use crate::recipe::Recipe;

/// Plans that may run at once; further submissions wait for one to end (within their budget).
pub const PLANS_AT_ONCE: usize = 2;

/// The default of `--max-plan-time`: planning a 70B merge takes seconds.
pub const DEFAULT_MAX_PLAN_TIME: Duration = Duration::from_secs(300);

impl JobManager {
    /// Plans a job and cuts it into tasks (reads headers only), on a blocking thread, within
    /// the coordinator's `--max-plan-time`. `like`: a grid's methods, whose cut the job
    /// takes when it can ([`cut_like`]).
    pub(super) async fn prepare(
        &self,
        recipe_text: &str,
        output: &str,
        o: &SubmitOptions,
        like: &Arc<CutLike>,
    ) -> Result<(Plan, Cut, Location)> {
        let budget = self.limits().max_plan_time;
        let too_long = || Error::Exhausted {
            limit: "--max-plan-time",
            reason: format!(
                "planning the job took longer than {}s (--max-plan-time); a recipe this \
                     large, or inputs this slow to read, need a coordinator started with a \
                     larger budget",
                budget.as_secs_f64()
            ),
        };
        let planning = self.planning.clone();
        let (text, output, o) = (recipe_text.to_string(), output.to_string(), o.clone());
        let like = like.clone();
        let resolver = self.resolver.clone();
        let rt = tokio::runtime::Handle::current();
        let work = tokio::task::spawn_blocking(move || {
            rt.block_on(async move {
                // the permit is held until the work has ended, even after the caller gave up
                let _permit = tokio::time::timeout(budget, planning.acquire_owned())
                    .await
                    .ok()?
                    .ok()?;
                tokio::time::timeout(budget, prepare(&resolver, &text, &output, &o, &like))
                    .await
                    .ok()
            })
        });
        match tokio::time::timeout(budget, work).await {
            Ok(Ok(Some(Ok(r)))) => {
                self.plan_room(r.0.memory())?;
                Ok(r)
            }
            Ok(Ok(Some(Err(e)))) => Err(e),
            Ok(Ok(None)) | Err(_) => Err(too_long()),
            Ok(Err(e)) => Err(Error::job("", format!("planning the job: {e}"))),
        }
    }
}

/// Parses, plans and cuts (on the blocking thread it is called on).
async fn prepare(
    resolver: &Resolver,
    recipe_text: &str,
    output: &str,
    o: &SubmitOptions,
    like: &CutLike,
) -> Result<(Plan, Cut, Location)> {
    let plan_options = PlanOptions {
        out_shard_size: o.out_shard_size,
        seed: o.seed,
        rng: o.rng,
        unsafe_truncate_embeddings: o.unsafe_truncate_embeddings,
        compute_float32: o.compute_float32,
        given: Default::default(),
    };
    let out = resolver.resolve(output, &o.base_dir)?;
    let plan = match crate::recipe::stages::split(recipe_text)? {
        // a multi-stage recipe: one job, the earlier stages streamed into the final one
        Some(st) => {
            let at = |name: &str| plan::stages::stage_location(&out, name);
            plan::stages::plan_streamed(&st, recipe_text, resolver, &o.base_dir, &plan_options, &at)
                .await?
        }
        None => {
            let recipe = Recipe::parse(recipe_text)?;
            plan::plan(recipe, resolver, &o.base_dir, &plan_options).await?
        }
    };
    let opts = CutOptions {
        task_size: o.task_size,
        slot_memory: o.slot_memory_for(&plan)?,
        min_part: out.store.min_part_size(),
    };
    cut::check_whole(&plan, &opts)?;
    let chosen = like
        .plan
        .get_or_try_init(|| like_plan(resolver, &like.texts, o, &plan_options))
        .await?;
    let cut = chosen
        .as_deref()
        .and_then(|like| cut::cut_like(&plan, like, &opts))
        .unwrap_or_else(|| cut::cut(&plan, &opts));
    Ok((plan, cut, out))
}

/// Of the recipes `cut_like` (a grid's methods), the plan whose cut the others take: the one
/// the most of them fit ([`cut::fits_like`]), then the one with the most statistics passes
/// (its leader's passes are never fewer than a rider's), then the first. The same recipes
/// always give the same choice (a resumed job is cut as before).
async fn like_plan(
    resolver: &Resolver,
    cut_like: &[String],
    o: &SubmitOptions,
    plan_options: &PlanOptions,
) -> Result<Option<Arc<Plan>>> {
    let mut plans = Vec::with_capacity(cut_like.len());
    for text in cut_like {
        plans.push(plan::plan(Recipe::parse(text)?, resolver, &o.base_dir, plan_options).await?);
    }
    let score = |p: &Plan| {
        let fit = plans.iter().filter(|q| cut::fits_like(q, p)).count();
        let passes: u64 = p.tensors.iter().map(|t| u64::from(t.passes)).sum();
        (fit, passes)
    };
    let mut best: Option<((usize, u64), usize)> = None;
    for (k, p) in plans.iter().enumerate() {
        let s = score(p);
        if best.is_none_or(|(b, _)| s > b) {
            best = Some((s, k));
        }
    }
    Ok(best.map(|(_, k)| Arc::new(plans.swap_remove(k))))
}

/// The methods of a grid whose cut its points take ([`cut_like`]): one recipe of each (the
/// job's record keeps them, `JournalJob.cut_like`), and the plan chosen among them, planned
/// once for all the points (each point would otherwise plan every method again).
#[derive(Debug, Default)]
pub struct CutLike {
    pub texts: Vec<String>,
    plan: tokio::sync::OnceCell<Option<Arc<Plan>>>,
}

impl CutLike {
    pub fn new(texts: Vec<String>) -> Arc<Self> {
        Arc::new(CutLike {
            texts,
            plan: Default::default(),
        })
    }
}
