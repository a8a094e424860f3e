//! The shardmerge coordinator: recipes, planning, cutting into tasks, job state, commit, and
//! the embedded runner. It schedules work and moves receipts; the arithmetic lives in the
//! worker's kernels.

pub(crate) mod arch;
pub mod auth;
pub(crate) mod claim;
pub mod cli;
pub mod commit;
pub(crate) mod cut;
pub mod embedded;
pub mod error;
pub mod extract;
pub mod job;
pub mod journal;
pub(crate) mod ops;
pub(crate) mod output;
pub(crate) mod paths;
pub mod plan;
pub mod planinfo;
pub(crate) mod policy;
pub(crate) mod progress;
pub(crate) mod random;
pub(crate) mod reads;
pub mod recipe;
pub(crate) mod remote;
pub mod report;
pub mod server;
pub(crate) mod size;
pub(crate) mod tls;
pub(crate) mod verify;
