//! `JobState` driven on a made-up plan: no files, no workers, the time given by hand.

use std::time::{Duration, Instant};

use shardmerge_proto as pb;
use shardmerge_worker::format::safetensors::FileLayout;
use shardmerge_worker::kernels::{Reduced, Stats};

use super::state::{JobState, Recorded, TaskFailed, MAX_ATTEMPTS};
use crate::cut::{Cut, StatsUnit, TaskDef};
use crate::error::Result;
use crate::journal::Item;
use crate::plan::{OutFile, Plan};
use crate::recipe::Recipe;

const TTL: Duration = Duration::from_secs(10);

/// Two output files. Tensor 1 is a statistics unit of two ranges and two passes; file 0 has
/// write task 0 (ready) and write task 1 (waits for the unit); file 1 has write task 2.
fn plan_and_cut() -> (Plan, Cut) {
    let file = |name: &str, tensors: Vec<usize>| OutFile {
        name: name.into(),
        tensors,
        layout: FileLayout {
            header: Vec::new(),
            spans: vec![(0, 8)],
            total_size: 16,
        },
    };
    let tensor = |name: &str| pb::TensorJob {
        name: name.into(),
        method: "made-up".into(),
        shape: vec![4, 2],
        ..Default::default()
    };
    let plan = Plan {
        recipe: Recipe::parse("merge_method: passthrough\nmodels:\n  - model: a\n")
            .expect("recipe"),
        models: Vec::new(),
        tensors: vec![tensor("t0"), tensor("t1"), tensor("t2")],
        files: vec![
            file("a.safetensors", vec![0, 1]),
            file("b.safetensors", vec![2]),
        ],
        config: None,
        tokenizer_from: None,
        seed: 0,
        out_layers: 0,
        arch: &crate::arch::FALLBACK,
    };
    let task = |file: usize, part_index: u32, deps: Vec<usize>| TaskDef {
        file,
        part_index,
        offset: 8 * part_index as u64,
        length: 8,
        segments: Vec::new(),
        deps,
    };
    let cut = Cut {
        tasks: vec![task(0, 0, vec![]), task(0, 1, vec![0]), task(1, 0, vec![])],
        units: vec![StatsUnit {
            tensor: 1,
            ranges: vec![(0, 2), (2, 4)],
            passes: 2,
        }],
    };
    (plan, cut)
}

/// Sums the partials' counts into the state, pass after pass.
fn fake_reduce(
    _: &pb::TensorJob,
    pass: u32,
    state: Stats,
    partials: Vec<Stats>,
) -> Result<Reduced> {
    let mut counts = state.counts;
    counts.push(partials.iter().flat_map(|p| &p.counts).sum::<u64>() + 100 * pass as u64);
    Ok(Reduced::More(Stats {
        counts,
        ..Default::default()
    }))
}

fn job() -> JobState {
    let (plan, cut) = plan_and_cut();
    JobState::new("job-1".into(), plan, cut, "file:///out".into(), fake_reduce)
}

fn stats_result(n: u64) -> pb::TaskResult {
    pb::TaskResult {
        stats: Some(
            Stats {
                counts: vec![n],
                ..Default::default()
            }
            .to_proto(),
        ),
        ..Default::default()
    }
}

fn write_result(part: u32) -> pb::TaskResult {
    pb::TaskResult {
        part: Some(pb::PartReceipt {
            part_index: part,
            etag: format!("etag-{part}"),
            size: 8,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn items(g: &[super::state::Granted]) -> Vec<Item> {
    g.iter().map(|g| g.item).collect()
}

const S0: Item = Item::Stats { unit: 0, range: 0 };
const S1: Item = Item::Stats { unit: 0, range: 1 };

#[test]
fn a_new_job_queues_what_is_ready_and_blocks_what_waits() {
    let mut j = job();
    let now = Instant::now();
    let g = j.lease_next(10, now, TTL);
    assert_eq!(items(&g), [S0, S1, Item::Write(0), Item::Write(2)]);
    assert!(g.iter().all(|g| g.attempt == 1));
    assert_eq!(j.leases_active(), 4);
    assert_eq!(j.status.tasks_total, 5);
    assert!(
        j.lease_next(10, now, TTL).is_empty(),
        "task 1 waits for its statistics"
    );
}

#[test]
fn an_expired_lease_is_queued_again_under_a_new_lease() {
    let mut j = job();
    let now = Instant::now();
    let first = j.lease_next(1, now, TTL);
    assert!(j.expire(now + TTL - Duration::from_millis(1)).is_empty());
    assert!(j.renew(S0, &first[0].lease, now + Duration::from_secs(5), TTL));
    // renewed at +5 s: not expired at +10 s, expired at +15 s
    assert!(j.expire(now + TTL).is_empty());
    assert_eq!(
        j.expire(now + TTL + Duration::from_secs(5)),
        [first[0].lease.clone()]
    );
    assert_eq!(j.status.retries, 1);
    assert!(!j.holds(S0, &first[0].lease));
    assert!(
        !j.renew(S0, &first[0].lease, now, TTL),
        "an expired lease cannot be renewed"
    );
    // S0 went to the back of the queue
    let again = j.lease_next(10, now + TTL * 2, TTL);
    assert_eq!(items(&again), [S1, Item::Write(0), Item::Write(2), S0]);
    let s0 = &again[3];
    assert_eq!(s0.attempt, 2);
    assert_ne!(s0.lease, first[0].lease);
    assert!(j.holds(S0, &s0.lease));
}

#[test]
fn a_late_result_after_expiry_stands_and_the_task_is_not_run_again() {
    let mut j = job();
    let now = Instant::now();
    j.lease_next(3, now, TTL);
    let w0 = j.lease_next(1, now, TTL);
    assert_eq!(items(&w0), [Item::Write(2)]);
    assert_eq!(j.expire(now + TTL).len(), 4);
    assert_eq!(
        j.record(Item::Write(2), write_result(0)).ok(),
        Some(Recorded::FileComplete(1))
    );
    assert_eq!(j.receipts_of(1).len(), 1);
    // (expired leases are queued in no particular order)
    let again = items(&j.lease_next(10, now + TTL, TTL));
    assert_eq!(again.len(), 3, "{again:?}");
    assert!(!again.contains(&Item::Write(2)), "task 2 is done");
}

#[test]
fn a_duplicate_completion_is_ignored() {
    let mut j = job();
    let g = j.lease_next(4, Instant::now(), TTL);
    assert_eq!(g[2].item, Item::Write(0));
    assert_eq!(
        j.record(Item::Write(0), write_result(0)).ok(),
        Some(Recorded::Accepted)
    );
    assert_eq!(
        j.record(Item::Write(0), write_result(0)).ok(),
        Some(Recorded::Ignored)
    );
    assert_eq!(j.status.tasks_done, 1);
    assert_eq!(j.status.bytes_done, 8);
    assert_eq!(j.receipts_of(0).len(), 1);
    assert_eq!(
        j.record(Item::Write(2), write_result(0)).ok(),
        Some(Recorded::FileComplete(1))
    );
    assert_eq!(
        j.record(Item::Write(2), write_result(0)).ok(),
        Some(Recorded::Ignored)
    );
    assert!(!j.file_finished(), "one of two files");
}

#[test]
fn statistics_passes_run_in_order_before_the_writes_that_wait() {
    let mut j = job();
    let now = Instant::now();
    j.lease_next(10, now, TTL);
    assert_eq!(j.task_key(S0), "s0.0.0");
    assert_eq!(j.record(S1, stats_result(2)).ok(), Some(Recorded::Accepted));
    assert!(
        j.lease_next(10, now, TTL).is_empty(),
        "pass 1 waits for all of pass 0"
    );
    assert_eq!(j.unit_pass(0), 0);
    assert_eq!(j.record(S0, stats_result(3)).ok(), Some(Recorded::Accepted));
    // pass 0 folded: 2 + 3
    assert_eq!(j.unit_pass(0), 1);
    assert_eq!(j.unit_stats(1).map(|s| s.counts.clone()), Some(vec![5]));
    assert_eq!(j.unit_stats(0), None, "tensor 0 has no unit");
    assert_eq!(j.status.tasks_total, 7);
    let pass1 = j.lease_next(10, now, TTL);
    assert_eq!(items(&pass1), [S0, S1]);
    assert_eq!(j.task_key(S1), "s0.1.1");
    assert_eq!(j.record(S0, stats_result(1)).ok(), Some(Recorded::Accepted));
    assert!(
        j.lease_next(10, now, TTL).is_empty(),
        "task 1 waits for pass 1"
    );
    assert_eq!(j.record(S1, stats_result(1)).ok(), Some(Recorded::Accepted));
    // pass 1 folded (1 + 1 + 100): the unit has run its two passes and task 1 is released
    assert_eq!(
        j.unit_stats(1).map(|s| s.counts.clone()),
        Some(vec![5, 102])
    );
    assert_eq!(items(&j.lease_next(10, now, TTL)), [Item::Write(1)]);
}

#[test]
fn cancel_mid_pass_stops_handing_out_and_ignores_results() {
    let mut j = job();
    let now = Instant::now();
    let g = j.lease_next(2, now, TTL);
    assert_eq!(j.record(S0, stats_result(1)).ok(), Some(Recorded::Accepted));
    assert!(j.end(pb::JobState::Cancelled, "cancelled"));
    assert_eq!(j.status.state, pb::JobState::Cancelled as i32);
    assert_eq!(j.status.error, "cancelled");
    assert!(j.lease_next(10, now, TTL).is_empty());
    assert!(!j.renew(S1, &g[1].lease, now, TTL));
    assert_eq!(j.record(S1, stats_result(1)).ok(), Some(Recorded::Ignored));
    assert_eq!(j.unit_pass(0), 0, "the pass was not folded");
    assert!(
        !j.end(pb::JobState::Failed, "late"),
        "an ended job stays as it ended"
    );
    assert_eq!(j.status.error, "cancelled");
}

#[test]
fn a_committing_job_refuses_cancel_but_not_failure() {
    let mut j = job();
    let now = Instant::now();
    j.lease_next(10, now, TTL);
    for it in [S0, S1] {
        j.record(it, stats_result(1)).expect("pass 0");
    }
    j.lease_next(10, now, TTL);
    for it in [S0, S1] {
        j.record(it, stats_result(1)).expect("pass 1");
    }
    j.lease_next(10, now, TTL);
    let mut files = Vec::new();
    for (i, part) in [(0, 0), (1, 1), (2, 0)] {
        if let Ok(Recorded::FileComplete(f)) = j.record(Item::Write(i), write_result(part)) {
            files.push(f);
        }
    }
    assert_eq!(files, [0, 1]);
    assert_eq!(j.receipts_of(0).len(), 2);
    assert!(!j.file_finished());
    assert!(j.file_finished(), "the last file commits");
    assert_eq!(j.status.state, pb::JobState::Committing as i32);
    assert!(!j.end(pb::JobState::Cancelled, "cancelled"));
    assert!(j.end(pb::JobState::Failed, "commit: disk full"));
}

#[test]
fn a_failed_task_is_retried_until_its_attempts_run_out() {
    let mut j = job();
    let now = Instant::now();
    let all = j.lease_next(10, now, TTL);
    assert_eq!(items(&all), [S0, S1, Item::Write(0), Item::Write(2)]);
    let (mut lease, w2) = (all[2].clone(), all[3].clone());
    assert_eq!(
        j.fail_task(Item::Write(0), "not-the-lease", true, "x"),
        TaskFailed::Ignored
    );
    for attempt in 1..MAX_ATTEMPTS {
        assert_eq!(
            j.fail_task(Item::Write(0), &lease.lease, true, "read timed out"),
            TaskFailed::Retried(attempt)
        );
        lease = j
            .lease_next(10, now, TTL)
            .into_iter()
            .find(|g| g.item == Item::Write(0))
            .expect("queued again");
    }
    assert_eq!(
        j.fail_task(Item::Write(0), &lease.lease, true, "read timed out"),
        TaskFailed::Fatal(format!(
            "read timed out (gave up after {MAX_ATTEMPTS} attempts)"
        ))
    );
    assert_eq!(
        j.fail_task(Item::Write(2), &w2.lease, false, "bad dtype"),
        TaskFailed::Fatal("bad dtype".into())
    );
}

#[test]
fn a_job_resumes_from_its_replayed_records() {
    // The first coordinator: records each accepted result under its key, as the journal does.
    let mut first = job();
    let now = Instant::now();
    let mut records = Vec::new();
    let mut accept = |j: &mut JobState, it: Item, r: pb::TaskResult| {
        records.push((j.task_key(it), r.clone()));
        j.record(it, r).expect("record")
    };
    first.lease_next(10, now, TTL);
    accept(&mut first, S0, stats_result(2));
    accept(&mut first, S1, stats_result(3));
    first.lease_next(10, now, TTL);
    accept(&mut first, S1, stats_result(7));
    assert_eq!(
        accept(&mut first, Item::Write(2), write_result(0)),
        Recorded::FileComplete(1)
    );
    // what a journal may also hold: a key of another version, and a pass-1 result of a range
    // whose pass 0 was never recorded (ignored: it runs again)
    records.push(("x9".into(), pb::TaskResult::default()));
    records.reverse();

    let mut resumed = job();
    assert_eq!(resumed.replay(records).expect("replay"), [1]);
    assert_eq!(resumed.status.tasks_done, first.status.tasks_done);
    assert_eq!(resumed.status.tasks_total, first.status.tasks_total);
    assert_eq!(resumed.unit_pass(0), 1);
    assert_eq!(
        resumed.unit_stats(1).map(|s| s.counts.clone()),
        Some(vec![5])
    );
    // what is left to run: pass 1 range 0 (its queue entry of pass 0 is reused), and task 0;
    // task 1 still waits
    let left = resumed.lease_next(10, now, TTL);
    assert_eq!(items(&left), [S0, Item::Write(0)]);
    assert_eq!(
        resumed.record(S0, stats_result(1)).ok(),
        Some(Recorded::Accepted)
    );
    assert_eq!(items(&resumed.lease_next(10, now, TTL)), [Item::Write(1)]);
}
