//! The storage conformance suite (`shardmerge_tests::storage_suite`) run against every store:
//! local files, the fault-injection wrapper around them (injecting nothing, so it must be
//! transparent), the in-memory store of the unit tests, S3 on a real server on loopback, and
//! the benchmark-only `null://` store (the contract less reading back what it discarded).

use std::sync::Arc;

use shardmerge_tests::memory::MemoryStorage;
use shardmerge_tests::storage_suite::{conformance, conformance_discarding};
use shardmerge_tests::{block_on, S3Server};
use shardmerge_worker::storage::fault::{FaultPlan, FaultyStorage};
use shardmerge_worker::storage::local::LocalStorage;
use shardmerge_worker::storage::null::NullStorage;

#[test]
fn local_files() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().to_str().unwrap().to_string();
    block_on(conformance(Arc::new(LocalStorage::new()), &root));
}

#[test]
fn fault_wrapper_injecting_nothing_is_transparent() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().to_str().unwrap().to_string();
    let store = FaultyStorage::wrap(Arc::new(LocalStorage::new()), FaultPlan::default());
    block_on(conformance(store, &root));
}

#[test]
fn in_memory() {
    block_on(conformance(Arc::new(MemoryStorage::new()), "mem"));
}

#[test]
fn null_discarding_store() {
    block_on(conformance_discarding(
        Arc::new(NullStorage::new("b")),
        "suite",
    ));
}

#[test]
fn s3() {
    let s3 = S3Server::shared();
    s3.create_bucket("conformance", true);
    block_on(conformance(s3.storage("conformance"), "suite"));
}
