//! Running an extraction in this process: one task per module on the worker's executor, as
//! many at once as `workers` and the memory limit allow (a task holds its module's memory,
//! `module_memory`, while it runs), then the commit.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use shardmerge_worker::exec::extract::{extract_module, ModuleDone};
use shardmerge_worker::storage::{Location, Resolver};
use tokio::sync::Semaphore;

use super::{commit, config, module_memory, parts_folder, ExtractPlan};
use crate::error::{Error, Result};
use crate::size;

/// What an extraction wrote.
#[derive(Clone, Debug)]
pub struct Extracted {
    /// Each factored module and its rank, in task order.
    pub ranks: Vec<(String, usize)>,
    /// Each factored module's singular values (all of them), in task order.
    pub singular: Vec<Vec<f32>>,
    pub bytes_read: u64,
    pub adapter_bytes: u64,
    pub config: serde_json::Value,
}

/// How the run goes.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub workers: usize,
    pub memory_limit: u64,
    /// The base model as the user named it (the adapter's `base_model_name_or_path`).
    pub base_name: String,
    pub ft_name: String,
    /// The command line, for the model card.
    pub invocation: String,
}

/// Memory is counted in KiB against a semaphore (its permits are u32).
fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as u64) as u32
}

/// Runs every module's task of `p` and commits the adapter into `out`.
pub async fn run(
    p: &mut ExtractPlan,
    out: &Location,
    o: &RunOptions,
    resolver: &Resolver,
) -> Result<Extracted> {
    let peak = p.peak_task_memory();
    if peak > o.memory_limit {
        let big = p
            .modules
            .iter()
            .max_by_key(|t| module_memory(t))
            .map(|t| t.module.clone());
        return Err(Error::usage(
            "--memory-limit",
            format!(
                "module {} needs {} for its SVD (the weight and its task vector as f32, U, V and the workspace), more than the limit of {}: raise --memory-limit",
                big.unwrap_or_default(),
                size::human(peak),
                size::human(o.memory_limit)
            ),
        ));
    }
    let folder = parts_folder(out);
    let parts: Vec<Location> = (0..p.modules.len())
        .map(|i| folder.join(&format!("{i:05}.safetensors")))
        .collect();
    for (t, part) in p.modules.iter_mut().zip(&parts) {
        t.part = part.uri();
    }
    let memory = Arc::new(Semaphore::new(kib(o.memory_limit) as usize));
    let done: Vec<ModuleDone> = futures::stream::iter(p.modules.iter())
        .map(|t| {
            let memory = memory.clone();
            async move {
                let _held = memory
                    .acquire_many(kib(module_memory(t)))
                    .await
                    .map_err(|e| Error::job("extract-lora", e))?;
                extract_module(resolver, t)
                    .await
                    .map_err(|e| Error::plan(format!("{}.weight", t.module), e.message))
            }
        })
        .buffered(o.workers.max(1))
        .try_collect()
        .await
        .inspect_err(|_| {
            let parts = parts.clone();
            tokio::spawn(async move { commit::remove_parts(&parts).await });
        })?;
    let ranks: Vec<(String, usize)> = p
        .modules
        .iter()
        .zip(&done)
        .map(|(t, d)| (t.module.clone(), d.rank))
        .collect();
    let cfg = config::adapter_config(&o.base_name, &ranks, &p.modules_to_save);
    let r = ranks.iter().map(|(_, r)| *r).max().unwrap_or(0);
    let card = config::card(&o.base_name, &o.ft_name, &o.invocation, r);
    let adapter_bytes = commit::commit(p, out, &parts, &cfg, card, resolver).await?;
    Ok(Extracted {
        ranks,
        bytes_read: done.iter().map(|d| d.bytes_read).sum(),
        singular: done.into_iter().map(|d| d.singular).collect(),
        adapter_bytes,
        config: cfg,
    })
}
