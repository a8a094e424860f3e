//! What a submitter chooses about a job, and its `JobOptions` message.

use std::path::PathBuf;

use shardmerge_proto as pb;

use crate::plan;

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
        }
    }
}
