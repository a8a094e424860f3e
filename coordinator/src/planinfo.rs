//! `shardmerge plan`: what a merge will do, from headers only.

use serde_json::{json, Value};
use shardmerge_worker::storage::Resolver;

use crate::cut::{self, bytes_per_element, CutOptions, SegDef};
use crate::error::Result;
use crate::job::SubmitOptions;
use crate::plan::{self, Plan, PlanOptions};
use crate::recipe::Recipe;
use crate::size::human;

pub struct PlanInfo {
    pub plan: Plan,
    pub cut: cut::Cut,
    pub workers: usize,
    pub peak_per_slot: u64,
    /// Input bytes the job will read from each of `plan.models`, every pass included.
    pub reads: Vec<u64>,
}

pub async fn describe(
    text: &str,
    o: &SubmitOptions,
    workers: usize,
    resolver: &Resolver,
) -> Result<PlanInfo> {
    describe_given(text, o, workers, resolver, &Default::default()).await
}

/// [`describe`], with some inputs known from their plans instead of their files (the earlier
/// stages of a multi-stage recipe, before they are written).
pub async fn describe_given(
    text: &str,
    o: &SubmitOptions,
    workers: usize,
    resolver: &Resolver,
    given: &plan::Given,
) -> Result<PlanInfo> {
    let opts = PlanOptions {
        out_shard_size: o.out_shard_size,
        seed: o.seed,
        rng: o.rng,
        unsafe_truncate_embeddings: o.unsafe_truncate_embeddings,
        compute_float32: o.compute_float32,
        given: given.clone(),
    };
    let plan = match crate::recipe::stages::split(text)? {
        // a multi-stage recipe planned as one job (its stages streamed into the final one)
        Some(st) => {
            let out = resolver.resolve("OUT", &o.base_dir)?;
            let at = |n: &str| plan::stages::stage_location(&out, n);
            plan::stages::plan_streamed(&st, text, resolver, &o.base_dir, &opts, &at).await?
        }
        None => plan::plan(Recipe::parse(text)?, resolver, &o.base_dir, &opts).await?,
    };
    let cut = cut::cut(
        &plan,
        &CutOptions {
            task_size: o.task_size,
            slot_memory: o.slot_memory_for(&plan)?,
            min_part: 0,
        },
    );
    let peak_per_slot = cut
        .tasks
        .iter()
        .map(|t| {
            let seg = t
                .segments
                .iter()
                .map(|s| match s {
                    SegDef::Literal(_) => 0,
                    SegDef::Rows {
                        tensor, start, end, ..
                    } => {
                        let tj = &plan.tensors[*tensor];
                        let (rows, row) = shardmerge_worker::tensor::view2d(&tj.shape);
                        let bpe = if *start == 0 && *end == rows {
                            cut::whole_bytes_per_element(tj)
                        } else {
                            bytes_per_element(tj)
                        };
                        (end - start) * row * bpe
                    }
                })
                .max()
                .unwrap_or(0);
            t.length + seg
        })
        .max()
        .unwrap_or(0);
    let reads = crate::reads::planned_reads(&plan, &cut, false);
    Ok(PlanInfo {
        plan,
        cut,
        workers,
        peak_per_slot,
        reads,
    })
}

impl PlanInfo {
    /// Input bytes the job will read, all models together.
    pub fn bytes_read(&self) -> u64 {
        self.reads.iter().sum()
    }

    /// Bytes of the input tensors the merge reads (each once).
    pub fn bytes_input(&self) -> u64 {
        self.plan.bytes_in()
    }

    pub fn to_json(&self) -> Value {
        let p = &self.plan;
        json!({
            "method": p.recipe.merge_method,
            "architecture": p.arch.name,
            "models": p.models.iter().zip(&self.reads).map(|(m, r)| json!({"name": m.name, "uri": m.loc.uri(), "tensors": m.tensors.len(), "bytes": m.bytes, "bytes_read": r, "adapter": m.adapter.as_ref().map(|a| adapter_json(a))})).collect::<Vec<_>>(),
            "tensors": p.tensors.iter().map(|t| json!({"name": t.name, "shape": t.shape, "inputs": t.inputs.len()})).collect::<Vec<_>>(),
            "files": p.files.iter().map(|f| json!({"name": f.name, "tensors": f.tensors.len(), "bytes": f.layout.total_size})).collect::<Vec<_>>(),
            "tasks": self.cut.tasks.len(),
            "stats_units": self.cut.units.len(),
            "bytes_read": self.bytes_read(),
            "bytes_input": p.bytes_in(),
            "bytes_written": p.bytes_out(),
            "workers": self.workers,
            "peak_memory_per_worker": self.peak_per_slot,
            "plan_memory": self.plan.memory(),
            "output_layers": p.out_layers,
            "copied": p.tensors.iter().filter(|t| t.is_copy()).map(|t| &t.name).collect::<Vec<_>>(),
            "seed": p.seed,
        })
    }

    pub fn to_text(&self) -> String {
        let p = &self.plan;
        let mut s = String::new();
        s += &format!("method       {}\n", p.recipe.merge_method);
        s += &format!("architecture {}\n", p.arch.name);
        for (m, r) in p.models.iter().zip(&self.reads) {
            s += &format!(
                "input        {} ({} tensors, {}; reads {})\n",
                m.loc.uri(),
                m.tensors.len(),
                human(m.bytes),
                human(*r)
            );
            if let Some(a) = &m.adapter {
                let (deltas, replaced, rank) = a.summary();
                s += &format!(
                    "  + adapter  {} (LoRA up to rank {rank}: a delta on {deltas} tensors, {replaced} replaced; {} of data)\n",
                    a.reference,
                    human(a.bytes)
                );
            }
        }
        s += &format!(
            "tensors      {} ({} layers)\n",
            p.tensors.len(),
            p.out_layers
        );
        let copied: Vec<&str> = p
            .tensors
            .iter()
            .filter(|t| t.is_copy())
            .map(|t| t.name.as_str())
            .collect();
        if !copied.is_empty() {
            s += &format!(
                "copied       {} non-float tensors from the base model, not merged (e.g. {})\n",
                copied.len(),
                copied[0]
            );
        }
        for f in &p.files {
            s += &format!(
                "file         {} ({} tensors, {})\n",
                f.name,
                f.tensors.len(),
                human(f.layout.total_size)
            );
        }
        s += &format!(
            "tasks        {} writes, {} tensors with statistics passes\n",
            self.cut.tasks.len(),
            self.cut.units.len()
        );
        s += &format!(
            "read         {} ({:.2}x the input tensors' {}, every pass included)\n",
            human(self.bytes_read()),
            self.bytes_read() as f64 / p.bytes_in().max(1) as f64,
            human(p.bytes_in())
        );
        s += &format!("write        {}\n", human(p.bytes_out()));
        s += &format!(
            "peak memory  {} per worker slot x {} slots, and the plan about {}\n",
            human(self.peak_per_slot),
            self.workers,
            human(p.memory())
        );
        s
    }
}

/// `plan --json`'s view of a model's LoRA adapter.
fn adapter_json(a: &crate::plan::lora::Adapter) -> Value {
    let (deltas, replaced, rank) = a.summary();
    json!({"reference": &*a.reference, "tensors_with_delta": deltas, "tensors_replaced": replaced, "max_rank": rank, "bytes": a.bytes})
}
