//! Plan from headers: planning reads each file's 8-byte length and its header (plus the small
//! JSON files), never tensor data.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::golden;
use shardmerge::job::SubmitOptions;
use shardmerge::planinfo;
use shardmerge_worker::storage::fault::{FaultPlan, FaultyStorage};
use shardmerge_worker::storage::Resolver;

#[tokio::test]
async fn planning_reads_headers_only() {
    let read = Arc::new(AtomicU64::new(0));
    let r2 = read.clone();
    let resolver = Resolver::with_wrapper(move |s| {
        FaultyStorage::counting(s, FaultPlan::default(), r2.clone())
    });
    let text =
        std::fs::read_to_string(golden().join("cases/ties_multilingual/config.yml")).unwrap();
    let o = SubmitOptions {
        base_dir: golden(),
        ..Default::default()
    };
    let info = planinfo::describe(&text, &o, 2, &resolver).await.unwrap();
    let data: u64 = info.plan.models.iter().map(|m| m.bytes).sum();
    let got = read.load(Ordering::SeqCst);
    // five models: a ~3 KB header and a config.json each
    assert!(got < 40 * 1024, "planning read {got} bytes");
    assert!(data > 100 * got, "planning read {got} of {data} data bytes");
    assert_eq!(info.plan.tensors.len(), 39);
}
