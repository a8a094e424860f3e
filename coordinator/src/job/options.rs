//! What a submitter chooses about a job, and its `JobOptions` message.

use std::path::PathBuf;

use shardmerge_proto as pb;

use crate::error::{Error, Result};
use crate::plan;
use crate::size::human;

/// Small enough that a task's output bytes are still in cache when they are written (0.75B
/// bench, alternating runs: task_arithmetic 3.0-3.3 s with 4 MiB tasks against 4.0-4.7 s with
/// 8 MiB, where the copy into the page cache went from 8% to 24% of the profile; ties 5%
/// slower; peak memory 108 MB against 182 MB). S3 outputs raise it to the 5 MiB part minimum.
pub const DEFAULT_TASK_SIZE: u64 = 4 << 20;
pub const DEFAULT_SLOT_MEMORY: u64 = 512 << 20;

#[derive(Clone, Debug)]
pub struct SubmitOptions {
    pub out_shard_size: u64,
    pub task_size: u64,
    pub slot_memory: u64,
    pub seed: Option<u64>,
    /// How randomised methods draw.
    pub rng: pb::Rng,
    pub base_dir: PathBuf,
    /// Replace an output that already holds files (without it, such an output is refused).
    /// The new data files complete only at the commit: the old checkpoint stays whole until
    /// then (see `crate::output`).
    pub overwrite: bool,
    /// Merge embeddings of different vocabulary sizes by cropping them (`--unsafe-truncate-embeddings`).
    pub unsafe_truncate_embeddings: bool,
    /// Compute in f32 whatever the recipe's `dtype` (`--compute-dtype float32`).
    pub compute_float32: bool,
    /// A process that plans and runs the job itself (embedded `run`): the plan's memory comes
    /// out of its `--memory-limit` before the slots share the rest (`slot_memory` is then
    /// what a slot would get with no plan to hold).
    pub budget: Option<ProcessBudget>,
    /// How many jobs run together sharing their reads (the points of a sweep, `job/group.rs`),
    /// this one included: each gets that share of a slot, so one task of each fits a slot
    /// together. 0 or 1: alone.
    pub points: u32,
}

/// The memory of a process that holds the job's plan and runs its tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessBudget {
    /// `--memory-limit`: the plan and every slot's buffers together.
    pub limit: u64,
    pub slots: usize,
}

/// The least a worker slot is given.
pub const MIN_SLOT_MEMORY: u64 = 1 << 20;

impl ProcessBudget {
    /// What each slot may use once the plan (`plan_memory` bytes) is held, or why the limit
    /// is too small for this merge.
    pub fn slot_memory(&self, plan_memory: u64) -> Result<u64> {
        let slots = self.slots.max(1) as u64;
        let least = plan_memory.saturating_add(slots * MIN_SLOT_MEMORY);
        if self.limit < least {
            return Err(Error::Exhausted {
                limit: "--memory-limit",
                reason: format!(
                    "this merge's plan takes about {} (its output tensors and their inputs), \
                     which leaves too little of --memory-limit {} for {slots} worker slot(s); \
                     give at least {} (or fewer models or tensors)",
                    human(plan_memory),
                    human(self.limit),
                    human(least.saturating_add(slots * 15 * MIN_SLOT_MEMORY)),
                ),
            });
        }
        Ok((self.limit - plan_memory) / slots)
    }
}

impl Default for SubmitOptions {
    fn default() -> Self {
        SubmitOptions {
            out_shard_size: plan::DEFAULT_SHARD_SIZE,
            task_size: DEFAULT_TASK_SIZE,
            slot_memory: DEFAULT_SLOT_MEMORY,
            seed: None,
            rng: pb::Rng::Mergekit,
            base_dir: PathBuf::from("."),
            overwrite: false,
            unsafe_truncate_embeddings: false,
            compute_float32: false,
            budget: None,
            points: 1,
        }
    }
}

impl SubmitOptions {
    /// The options a job record keeps (everything that shapes the output).
    pub fn to_proto(&self) -> pb::JobOptions {
        pb::JobOptions {
            out_shard_size: self.out_shard_size,
            task_size: self.task_size,
            slot_memory: self.slot_memory,
            seed: self.seed,
            base_dir: self.base_dir.to_string_lossy().into_owned(),
            min_part_size: 0,
            rng: self.rng as i32,
            overwrite: self.overwrite,
            unsafe_truncate_embeddings: self.unsafe_truncate_embeddings,
            compute_float32: self.compute_float32,
            points: self.points,
        }
    }

    /// Options from their message; 0 or empty means the default, and relative model paths
    /// resolve against the coordinator's working directory when `base_dir` is empty.
    pub fn from_proto(o: &pb::JobOptions) -> Self {
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        SubmitOptions {
            out_shard_size: or(o.out_shard_size, plan::DEFAULT_SHARD_SIZE),
            task_size: or(o.task_size, DEFAULT_TASK_SIZE),
            slot_memory: or(o.slot_memory, DEFAULT_SLOT_MEMORY),
            seed: o.seed,
            rng: pb::Rng::try_from(o.rng).unwrap_or(pb::Rng::Mergekit),
            base_dir: if o.base_dir.is_empty() {
                crate::paths::cwd()
            } else {
                PathBuf::from(&o.base_dir)
            },
            overwrite: o.overwrite,
            unsafe_truncate_embeddings: o.unsafe_truncate_embeddings,
            compute_float32: o.compute_float32,
            budget: None,
            points: o.points.max(1),
        }
    }

    /// What each worker slot may use for this plan's tasks: with `points` jobs sharing their
    /// reads, the process holds that many plans and a slot runs a task of each at once, so
    /// each job's tasks are cut to that share of the slot.
    pub fn slot_memory_for(&self, plan: &plan::Plan) -> Result<u64> {
        let k = u64::from(self.points.max(1));
        let slot = self.whole_slot(plan)? / k;
        crate::cut::check_fits(plan, slot)?;
        Ok(slot)
    }

    /// What one worker slot has, all the jobs that share reads together.
    pub fn whole_slot(&self, plan: &plan::Plan) -> Result<u64> {
        let k = u64::from(self.points.max(1));
        match self.budget {
            Some(b) => b.slot_memory(plan.memory().saturating_mul(k)),
            None => Ok(self.slot_memory),
        }
    }
}
