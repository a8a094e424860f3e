//! The contract between the shardmerge coordinator and its workers (`merge.proto`).
//!
//! Workers pull work (`PollWork`), renew leases while they compute, and report completion with
//! their part receipts. A task carries everything a worker needs: input byte locations, the
//! method and its parameters already resolved for each tensor, and where its output bytes go.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod v1 {
    tonic::include_proto!("shardmerge.v1");
}

pub use v1::*;

/// Largest gRPC message either side accepts (tasks carry header literals and statistics).
pub const MAX_MESSAGE: usize = 256 << 20;
