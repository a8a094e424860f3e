//! The shardmerge worker: checkpoint I/O, merge kernels, and the task executor.
//!
//! Dependency direction inside: `exec` uses `storage` (bytes in and out) and `kernels`
//! (arithmetic); `storage` knows nothing of methods and `kernels` nothing of I/O.

pub mod client;
pub mod crc;
pub mod exec;
pub mod format;
pub mod kernels;
pub mod metrics;
pub mod pull;
pub mod storage;
pub mod tensor;
