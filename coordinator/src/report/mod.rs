//! `shardmerge report RECIPE OUT` (and `run --report`): how the task vectors of a recipe's
//! models relate, per tensor, per layer, per module kind and in all, written as `report.json`,
//! `report.csv` and a self-contained `report.html` (docs/report.md).
//!
//! The coordinator's part is the plan and the bookkeeping: every float tensor becomes a job
//! of the report's statistics method (`kernels::report`, in the worker), run by the executor
//! over row ranges that fit a slot's memory; tensors are grouped by layer and kind by name, and
//! the groups' statistics folded and turned into figures by the same kernel module. No
//! arithmetic on tensor data happens here.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use shardmerge_worker::exec::{Executor, ReportTap, Scratch};
use shardmerge_worker::kernels::report::{self as kr, Figures};
use shardmerge_worker::kernels::{round::Work, Stats};
use shardmerge_worker::storage::{Location, Resolver};
use shardmerge_worker::tensor::view2d;

use crate::arch::Place;
use crate::error::{Error, Result};
use crate::job::{tensor_job, SubmitOptions};
use crate::plan::{self, InputPlan, ModelInfo, Params, Plan, PlanOptions, TensorPlan};
use crate::recipe::{sweep, Recipe};

mod html;
mod kind;
pub(crate) mod write;

pub use write::{to_csv, to_json, write};

/// How the report runs.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Plan options (seed, vocabularies, ...) and `slot_memory`, the memory of one slot.
    pub submit: SubmitOptions,
    /// Tensors computed at once.
    pub workers: usize,
    /// Sweep points whose checkpoints to measure against the base: (point name, its folder).
    pub points: Vec<(String, String)>,
}

/// One row of the report: a tensor, a layer, a module kind or the whole model.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub layer: Option<u64>,
    pub kind: &'static str,
    pub figures: Figures,
}

/// The merge report of a recipe.
#[derive(Clone, Debug)]
pub struct Report {
    /// The base model and the other models (recipe names), in input order.
    pub base: String,
    pub models: Vec<String>,
    /// Trim densities of the sign-conflict rates (every density in (0, 1) the recipe uses).
    pub densities: Vec<f64>,
    /// The sweep points the recipe expands to (none for a plain recipe).
    pub points: Vec<String>,
    /// The points whose checkpoints were measured: the order of the distance figures.
    pub distance_points: Vec<String>,
    /// Why the points' distances were not measured, when they were asked for and were not.
    pub distance_note: Option<String>,
    pub tensors: Vec<Entry>,
    pub layers: Vec<Entry>,
    pub kinds: Vec<Entry>,
    pub total: Entry,
    /// Input bytes read from storage.
    pub bytes_read: u64,
}

impl Report {
    /// Pairs of models (indices into `models`), in the order of the pair figures.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let m = self.models.len();
        (0..m)
            .flat_map(|i| (i + 1..m).map(move |j| (i, j)))
            .collect()
    }
}

async fn plan_of(text: &str, o: &SubmitOptions, resolver: &Resolver) -> Result<Plan> {
    plan::plan(
        Recipe::parse(text)?,
        resolver,
        &o.base_dir,
        &PlanOptions {
            out_shard_size: o.out_shard_size,
            seed: o.seed,
            rng: o.rng,
            unsafe_truncate_embeddings: o.unsafe_truncate_embeddings,
            compute_float32: o.compute_float32,
            given: Default::default(),
        },
    )
    .await
}

/// Every `density` in (0, 1) any tensor of `plans` gives a model, ascending, each once.
fn densities(plans: &[Plan]) -> Vec<f64> {
    let mut ds: Vec<f64> = plans
        .iter()
        .flat_map(|p| &p.tensors)
        .flat_map(|t| &t.model_params)
        .filter_map(|mp| mp.get("density").copied())
        .filter(|d| *d > 0.0 && *d < 1.0)
        .collect();
    ds.sort_by(f64::total_cmp);
    ds.dedup();
    ds
}

/// The tensors the report covers (floating point, with a base) and the models they are made
/// of: the same for every tensor, or an error naming the one that differs.
fn covered(plan: &Plan) -> Result<(String, Vec<String>, Vec<&TensorPlan>)> {
    let mut who: Option<(String, Vec<String>)> = None;
    let mut out = Vec::new();
    for t in plan.tensors.iter().filter(|t| !t.is_copy()) {
        let Some(b) = t.base else {
            return Err(Error::recipe(
                "base_model",
                "the report compares task vectors (each model minus the base): the recipe needs a base_model",
            ));
        };
        let names = (
            t.inputs[b].model.to_string(),
            (0..t.inputs.len())
                .filter(|&i| i != b)
                .map(|i| t.inputs[i].model.to_string())
                .collect::<Vec<_>>(),
        );
        match &who {
            None => who = Some(names),
            Some(w) if *w != names => {
                return Err(Error::plan(
                    &t.name,
                    "the report needs every tensor made from the same models; this one is made from others (slices of different sources are not supported)",
                ))
            }
            Some(_) => {}
        }
        out.push(t);
    }
    let (base, models) =
        who.ok_or_else(|| Error::recipe("models", "no floating-point tensor to report on"))?;
    Ok((base, models, out))
}

/// Row ranges of `t` whose f32 values and raw bytes, all inputs together, fit `budget`.
fn ranges(t: &TensorPlan, budget: u64) -> Vec<(u64, u64)> {
    let (rows, row_len) = view2d(&t.shape);
    let per_row = (row_len * 4 * t.inputs.len() as u64 + t.input_row_bytes()).max(1);
    let per = (budget / per_row).max(1);
    (0..rows.div_ceil(per))
        .map(|i| (i * per, ((i + 1) * per).min(rows)))
        .collect()
}

/// The plan of the report's statistics over tensor `t`: its inputs, read as the merge reads
/// them, then the tensor of each checkpoint of `points` (sweep points' outputs), with the
/// report's pseudo-method, the trims `params` asks for, and f32 arithmetic. (Its `passes`
/// are the merge's: the executor runs the report's own over the whole tensor.)
fn stats_plan(
    t: &TensorPlan,
    params: &std::sync::Arc<Params>,
    points: &[ModelInfo],
) -> Result<TensorPlan> {
    let mut p = TensorPlan {
        method: &kr::REPORT,
        params: params.clone(),
        compute: Work::F32,
        ..t.clone()
    };
    let no_params = std::sync::Arc::new(Params::new());
    for m in points {
        p.inputs.push(point_input(t, m)?);
        p.model_params.push(no_params.clone());
    }
    Ok(p)
}

/// Tensor `t` of the checkpoint a sweep point wrote, as an input: it must be there, floating
/// point and of `t`'s shape.
fn point_input(t: &TensorPlan, m: &ModelInfo) -> Result<InputPlan> {
    let bad = |why: &str| Error::input(m.loc.uri(), format!("sweep point {}: {why}", m.name));
    let (uri, info) = m.tensors.get(&t.name).ok_or_else(|| {
        bad(&format!(
            "tensor {} is missing from its checkpoint (was it written by another recipe?)",
            t.name
        ))
    })?;
    let dtype = match info.dtype {
        shardmerge_worker::format::safetensors::StDtype::Float(dt) if info.shape == t.shape => dt,
        _ => {
            return Err(bad(&format!(
                "tensor {} is not a floating-point tensor of shape {:?} (was it written by another recipe?)",
                t.name, t.shape
            )))
        }
    };
    Ok(InputPlan {
        uri: uri.clone(),
        data_offset: info.start,
        dtype,
        shape: info.shape.clone(),
        model: m.name.as_str().into(),
        model_key: 0,
        tensor: t.name.clone(),
        rng_offset: 0,
        lora: None,
        derived: None,
    })
}

/// The checkpoints of `points` (headers only), or why their distances are not measured: a
/// vocabulary-aligned embedding (its rows re-mapped by token) is not compared with a point.
async fn point_models(
    points: &[(String, String)],
    tensors: &[&TensorPlan],
    o: &SubmitOptions,
    resolver: &Resolver,
) -> Result<(Vec<ModelInfo>, Option<String>)> {
    if points.is_empty() {
        return Ok((Vec::new(), None));
    }
    if let Some(t) = tensors.iter().find(|t| t.row_map.is_some()) {
        let why = format!("the distances of the sweep points from the base are not measured: tensor {} is re-mapped into the output vocabulary (tokenizer), which the report does not compare with a point yet", t.name);
        return Ok((Vec::new(), Some(why)));
    }
    let mut models = Vec::with_capacity(points.len());
    for (name, at) in points {
        let mut m = plan::load_model(resolver, &o.base_dir, at).await?;
        m.name = name.clone();
        models.push(m);
    }
    Ok((models, None))
}

/// The plans of `text` (of each sweep point), the densities they trim at, and the sweep.
async fn plans(
    text: &str,
    o: &SubmitOptions,
    resolver: &Resolver,
) -> Result<(Option<sweep::Sweep>, Vec<Plan>, Vec<f64>)> {
    let expanded = sweep::expand(text)?;
    let texts: Vec<&str> = match &expanded {
        Some(s) => s.points.iter().map(|p| p.recipe.as_str()).collect(),
        None => vec![text],
    };
    let mut plans = Vec::with_capacity(texts.len());
    for t in texts {
        plans.push(plan_of(t, o, resolver).await?);
    }
    let ds = densities(&plans);
    Ok((expanded, plans, ds))
}

/// The report's parameters: its trim densities and the number of sweep points measured.
fn report_params(ds: &[f64], points: usize) -> Arc<Params> {
    let mut params: Params = kr::density_params(ds).into_iter().collect();
    params.insert("points".into(), points as f64);
    Arc::new(params)
}

/// A tap for the merge of `text` to feed (`run --report`): the report's statistics of every
/// tensor it covers, computed from the rows the merge reads ([`compute`] then reads only
/// what the tap did not see). Planned as [`compute`] plans the report.
pub async fn tap_for(text: &str, o: &ReportOptions, resolver: &Resolver) -> Result<ReportTap> {
    let (_, plans, ds) = plans(text, &o.submit, resolver).await?;
    let (_, _, tensors) = covered(&plans[0])?;
    let params = report_params(&ds, 0);
    let jobs = tensors
        .iter()
        .map(|t| {
            Ok(tensor_job(
                &stats_plan(t, &params, &[])?,
                0,
                view2d(&t.shape).0,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    ReportTap::new(jobs).map_err(|e| Error::plan("report", e.message))
}

/// The plan of the distances from the base of the checkpoints of `points` over tensor `t`:
/// the report's statistics of the base alone, then the points.
fn distances_plan(t: &TensorPlan, points: &[ModelInfo]) -> Result<TensorPlan> {
    let b = t
        .base
        .ok_or_else(|| Error::plan(&t.name, "no base model"))?;
    let base = TensorPlan {
        inputs: vec![t.inputs[b].clone()],
        model_params: vec![t.model_params[b].clone()],
        base: Some(0),
        ..t.clone()
    };
    stats_plan(&base, &report_params(&[], points.len()), points)
}

/// Of tensor `name`, the distances of the sweep points `measured` that `tap` measured as the
/// merge wrote them (the statistics [`kr::with_distances`] joins), when it measured all of
/// them (none measured: none to join).
fn tapped_distances(tap: &ReportTap, name: &str, measured: &[ModelInfo]) -> Option<Stats> {
    let sums = measured
        .iter()
        .map(|m| tap.distance(name, &m.loc.uri()))
        .collect::<Option<Vec<_>>>()?;
    Some(kr::Distance::statistics(sums))
}

/// What to compute of each tensor of `tensors`: a job to run (its row ranges within
/// `budget`), a tap's statistics of the models, or both (the job then measures the points'
/// distances only).
type StatsJob = (
    Option<(shardmerge_proto::TensorJob, Vec<(u64, u64)>)>,
    Option<Stats>,
);

fn stats_jobs(
    tensors: &[&TensorPlan],
    tap: Option<&ReportTap>,
    measured: &[ModelInfo],
    params: &Arc<Params>,
    budget: u64,
) -> Result<Vec<StatsJob>> {
    let mut jobs = Vec::with_capacity(tensors.len());
    for t in tensors {
        let rows = view2d(&t.shape).0;
        let job = match tap.and_then(|tp| Some((tp.stats(&t.name)?, tp))) {
            Some((st, tp)) => match tapped_distances(tp, &t.name, measured) {
                Some(d) => (None, Some(kr::with_distances(st, &d))),
                None => {
                    let d = distances_plan(t, measured)?;
                    (
                        Some((tensor_job(&d, 0, rows), ranges(&d, budget))),
                        Some(st),
                    )
                }
            },
            None => {
                let stats = stats_plan(t, params, measured)?;
                let r = ranges(&stats, budget);
                (Some((tensor_job(&stats, 0, rows), r)), None)
            }
        };
        jobs.push(job);
    }
    Ok(jobs)
}

/// Computes the report of a recipe (a sweep's: the models of its first point, the densities of
/// every point), reading each tensor's inputs once when its rows fit a slot; with `tap` (the
/// merge's, `run --report`), the tensors it covered are not read (the sweep points' distances
/// from the base read the base and the points' checkpoints).
/// `out`, where the report goes, is refused when it is, holds or sits inside an input's folder.
pub async fn compute(
    text: &str,
    out: &Location,
    o: &ReportOptions,
    resolver: &Resolver,
    tap: Option<&ReportTap>,
) -> Result<Report> {
    let (expanded, plans, ds) = plans(text, &o.submit, resolver).await?;
    for p in &plans {
        crate::output::check_overlap(p, out)?;
    }
    let (base, models, tensors) = covered(&plans[0])?;
    let budget = o.submit.slot_memory / 2;
    let exec = Executor::new(resolver.clone());
    let (measured, distance_note) = point_models(&o.points, &tensors, &o.submit, resolver).await?;
    let params = report_params(&ds, measured.len());
    let jobs = stats_jobs(&tensors, tap, &measured, &params, budget)?;
    let results: Vec<(Stats, u64)> = futures::stream::iter(jobs)
        .map(|(read, tapped)| {
            let exec = exec.clone();
            async move {
                let Some((job, r)) = read else {
                    return Ok::<_, Error>((tapped.unwrap_or_default(), 0));
                };
                let mut scratch = Scratch::new(0);
                let (st, n) = exec
                    .tensor_stats(&job, &r, &mut scratch)
                    .await
                    .map_err(|e| Error::plan(&job.name, e.message))?;
                Ok(match tapped {
                    Some(models) => (kr::with_distances(models, &st), n),
                    None => (st, n),
                })
            }
        })
        .buffered(o.workers.max(1))
        .try_collect()
        .await?;
    let arch = plans[0].arch;
    let m = models.len();
    let named: Vec<(Entry, Stats)> = tensors
        .iter()
        .zip(results.iter())
        .map(|(t, (st, _))| {
            let layer = match arch.place(&t.name) {
                Place::Layer { index, .. } => Some(index),
                _ => None,
            };
            let e = Entry {
                name: t.name.clone(),
                layer,
                kind: kind::of(&t.name),
                figures: kr::figures(m, ds.len(), st),
            };
            (e, st.clone())
        })
        .collect();
    let (layers, kinds, total) = groups(&named, m, ds.len());
    Ok(Report {
        base,
        models,
        densities: ds,
        points: expanded.map_or_else(Vec::new, |s| s.points.into_iter().map(|p| p.name).collect()),
        distance_points: measured.into_iter().map(|m| m.name).collect(),
        distance_note,
        tensors: named.into_iter().map(|(e, _)| e).collect(),
        layers,
        kinds,
        total,
        bytes_read: results.iter().map(|(_, b)| b).sum(),
    })
}

/// The per-layer, per-kind and whole-model entries: each the figures of its tensors'
/// statistics folded together.
fn groups(named: &[(Entry, Stats)], m: usize, n_d: usize) -> (Vec<Entry>, Vec<Entry>, Entry) {
    let mut by_layer: BTreeMap<u64, Vec<Stats>> = BTreeMap::new();
    let mut by_kind: BTreeMap<usize, Vec<Stats>> = BTreeMap::new();
    for (e, st) in named {
        if let Some(l) = e.layer {
            by_layer.entry(l).or_default().push(st.clone());
        }
        let k = kind::KINDS.iter().position(|&k| k == e.kind).unwrap_or(0);
        by_kind.entry(k).or_default().push(st.clone());
    }
    let entry = |name: String, layer, kind, parts: &[Stats]| Entry {
        name,
        layer,
        kind,
        figures: kr::figures(m, n_d, &kr::merge(parts)),
    };
    let layers = by_layer
        .iter()
        .map(|(&l, p)| entry(format!("layer {l}"), Some(l), "layer", p))
        .collect();
    let kinds = by_kind
        .iter()
        .map(|(&k, p)| entry(kind::KINDS[k].into(), None, kind::KINDS[k], p))
        .collect();
    let all: Vec<Stats> = named.iter().map(|(_, s)| s.clone()).collect();
    (layers, kinds, entry("all".into(), None, "all", &all))
}
