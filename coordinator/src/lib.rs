//! The shardmerge coordinator: recipes, planning, cutting into tasks, job state, commit, and
//! the embedded runner. It schedules work and moves receipts; the arithmetic lives in the
//! worker's kernels.

pub mod arch;
pub mod auth;
pub mod cli;
pub mod commit;
pub mod cut;
pub mod embedded;
pub mod error;
pub mod job;
pub mod journal;
pub mod ops;
pub mod output;
pub mod paths;
pub mod plan;
pub mod planinfo;
pub mod policy;
pub mod progress;
pub mod recipe;
pub mod remote;
pub mod server;
pub mod size;
pub mod tls;
pub mod verify;
