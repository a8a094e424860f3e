//! `JobState` driven on a made-up plan: no files, no workers, the time given by hand.

use std::time::{Duration, Instant};

use shardmerge_proto as pb;
use shardmerge_worker::format::safetensors::FileLayout;
use shardmerge_worker::kernels::{Reduced, Stats};

use super::lease::LeaseRules;
use super::state::{Holder, JobState, Recorded, Renewal, TaskFailed, MAX_ATTEMPTS};
use crate::cut::{Cut, StatsUnit, TaskDef};
use crate::error::Result;
use crate::journal::Item;
use crate::plan::{test_tensor, OutFile, Plan, TensorPlan};
use crate::recipe::Recipe;

pub(super) const TTL: Duration = Duration::from_secs(10);
const MAX_TIME: Duration = Duration::from_secs(60);
pub(super) const RULES: LeaseRules = LeaseRules {
    ttl: TTL,
    max_task_time: MAX_TIME,
};
/// The worker that polls in these tests.
const W: &str = "w0/0";

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
    // two f32 inputs: a row of 2 elements reads 16 bytes
    let tensor = |name: &str| test_tensor(name, "linear", &[4, 2], 2);
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
        tokenizer_files: Vec::new(),
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
fn fake_reduce(_: &TensorPlan, pass: u32, state: Stats, partials: Vec<Stats>) -> Result<Reduced> {
    let mut counts = state.counts;
    counts.push(partials.iter().flat_map(|p| &p.counts).sum::<u64>() + 100 * pass as u64);
    Ok(Reduced::More(Stats {
        counts,
        ..Default::default()
    }))
}

pub(super) fn job() -> JobState {
    let (plan, cut) = plan_and_cut();
    JobState::new("job-1".into(), plan, cut, "file:///out".into(), fake_reduce)
}

pub(super) fn stats_result(n: u64) -> pb::TaskResult {
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
        bytes_written: 8,
        ..Default::default()
    }
}

pub(super) fn items(g: &[super::state::Granted]) -> Vec<Item> {
    g.iter().map(|g| g.item).collect()
}

pub(super) const S0: Item = Item::Stats { unit: 0, range: 0 };
pub(super) const S1: Item = Item::Stats { unit: 0, range: 1 };

#[test]
fn a_new_job_queues_what_is_ready_and_blocks_what_waits() {
    let mut j = job();
    let now = Instant::now();
    let g = j.lease_next(10, W, now, RULES);
    assert_eq!(items(&g), [S0, S1, Item::Write(0), Item::Write(2)]);
    assert!(g.iter().all(|g| g.attempt == 1));
    assert_eq!(j.leases_active(), 4);
    assert_eq!(j.status.tasks_total, 5);
    assert!(
        j.lease_next(10, W, now, RULES).is_empty(),
        "task 1 waits for its statistics"
    );
}

/// Ready writes go out largest first (their bytes written and read), in task order among
/// equals: a large task left for last keeps one slot busy while the others wait for the end.
#[test]
fn the_largest_ready_writes_go_first() {
    let (plan, mut cut) = plan_and_cut();
    cut.tasks[2].length = 64;
    let mut j = JobState::new("job-1".into(), plan, cut, "file:///out".into(), fake_reduce);
    let g = j.lease_next(10, W, Instant::now(), RULES);
    assert_eq!(items(&g), [S0, S1, Item::Write(2), Item::Write(0)]);
}

#[test]
fn an_expired_lease_is_queued_again_under_a_new_lease() {
    let mut j = job();
    let now = Instant::now();
    let first = j.lease_next(1, W, now, RULES);
    assert!(j.expire(now + TTL - Duration::from_millis(1)).is_empty());
    assert_eq!(
        j.renew(S0, &first[0].lease, W, now + Duration::from_secs(5), TTL),
        Renewal::Renewed
    );
    // renewed at +5 s: not expired at +10 s, expired at +15 s
    assert!(j.expire(now + TTL).is_empty());
    assert_eq!(
        j.expire(now + TTL + Duration::from_secs(5)),
        [(S0, first[0].lease.clone())]
    );
    assert_eq!(j.status.retries, 1);
    assert!(!j.holds(S0, &first[0].lease));
    assert_eq!(
        j.renew(S0, &first[0].lease, W, now, TTL),
        Renewal::NotHeld,
        "an expired lease cannot be renewed"
    );
    // S0 went to the back of the queue
    let again = j.lease_next(10, W, now + TTL * 2, RULES);
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
    j.lease_next(3, W, now, RULES);
    let w0 = j.lease_next(1, W, now, RULES);
    assert_eq!(items(&w0), [Item::Write(2)]);
    assert_eq!(j.expire(now + TTL).len(), 4);
    assert_eq!(
        j.record(Item::Write(2), write_result(0)).ok(),
        Some(Recorded::FileComplete(1))
    );
    assert_eq!(j.receipts_of(1).len(), 1);
    // (expired leases are queued in no particular order)
    let again = items(&j.lease_next(10, W, now + TTL, RULES));
    assert_eq!(again.len(), 3, "{again:?}");
    assert!(!again.contains(&Item::Write(2)), "task 2 is done");
}

#[test]
fn a_duplicate_completion_is_ignored() {
    let mut j = job();
    let g = j.lease_next(4, W, Instant::now(), RULES);
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
    j.lease_next(10, W, now, RULES);
    assert_eq!(j.task_key(S0), "s0.0.0");
    assert_eq!(j.record(S1, stats_result(2)).ok(), Some(Recorded::Accepted));
    assert!(
        j.lease_next(10, W, now, RULES).is_empty(),
        "pass 1 waits for all of pass 0"
    );
    assert_eq!(j.unit_pass(0), 0);
    assert_eq!(j.record(S0, stats_result(3)).ok(), Some(Recorded::Accepted));
    // pass 0 folded: 2 + 3
    assert_eq!(j.unit_pass(0), 1);
    assert_eq!(j.unit_stats(1).map(|s| s.counts.clone()), Some(vec![5]));
    assert_eq!(j.unit_stats(0), None, "tensor 0 has no unit");
    assert_eq!(j.status.tasks_total, 7);
    let pass1 = j.lease_next(10, W, now, RULES);
    assert_eq!(items(&pass1), [S0, S1]);
    assert_eq!(j.task_key(S1), "s0.1.1");
    assert_eq!(j.record(S0, stats_result(1)).ok(), Some(Recorded::Accepted));
    assert!(
        j.lease_next(10, W, now, RULES).is_empty(),
        "task 1 waits for pass 1"
    );
    assert_eq!(j.record(S1, stats_result(1)).ok(), Some(Recorded::Accepted));
    // pass 1 folded (1 + 1 + 100): the unit has run its two passes and task 1 is released
    assert_eq!(
        j.unit_stats(1).map(|s| s.counts.clone()),
        Some(vec![5, 102])
    );
    assert_eq!(items(&j.lease_next(10, W, now, RULES)), [Item::Write(1)]);
}

#[test]
fn cancel_mid_pass_stops_handing_out_and_ignores_results() {
    let mut j = job();
    let now = Instant::now();
    let g = j.lease_next(2, W, now, RULES);
    assert_eq!(j.record(S0, stats_result(1)).ok(), Some(Recorded::Accepted));
    assert!(j.end(pb::JobState::Cancelled, "cancelled"));
    assert_eq!(j.status.state, pb::JobState::Cancelled as i32);
    assert_eq!(j.status.error, "cancelled");
    assert!(j.lease_next(10, W, now, RULES).is_empty());
    assert_eq!(j.renew(S1, &g[1].lease, W, now, TTL), Renewal::NotHeld);
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
    j.lease_next(10, W, now, RULES);
    for it in [S0, S1] {
        j.record(it, stats_result(1)).expect("pass 0");
    }
    j.lease_next(10, W, now, RULES);
    for it in [S0, S1] {
        j.record(it, stats_result(1)).expect("pass 1");
    }
    j.lease_next(10, W, now, RULES);
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
    let all = j.lease_next(10, W, now, RULES);
    assert_eq!(items(&all), [S0, S1, Item::Write(0), Item::Write(2)]);
    let (mut lease, w2) = (all[2].clone(), all[3].clone());
    assert_eq!(
        j.fail_task(Item::Write(0), "not-the-lease", W, true, "x"),
        TaskFailed::Ignored
    );
    for attempt in 1..MAX_ATTEMPTS {
        assert_eq!(
            j.fail_task(Item::Write(0), &lease.lease, W, true, "read timed out"),
            TaskFailed::Retried(attempt)
        );
        lease = j
            .lease_next(10, W, now, RULES)
            .into_iter()
            .find(|g| g.item == Item::Write(0))
            .expect("queued again");
    }
    assert_eq!(
        j.fail_task(Item::Write(0), &lease.lease, W, true, "read timed out"),
        TaskFailed::Fatal(format!(
            "read timed out (gave up after {MAX_ATTEMPTS} attempts)"
        ))
    );
    assert_eq!(
        j.fail_task(Item::Write(2), &w2.lease, W, false, "bad dtype"),
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
    first.lease_next(10, W, now, RULES);
    accept(&mut first, S0, stats_result(2));
    accept(&mut first, S1, stats_result(3));
    first.lease_next(10, W, now, RULES);
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
    let left = resumed.lease_next(10, W, now, RULES);
    assert_eq!(items(&left), [S0, Item::Write(0)]);
    assert_eq!(
        resumed.record(S0, stats_result(1)).ok(),
        Some(Recorded::Accepted)
    );
    assert_eq!(
        items(&resumed.lease_next(10, W, now, RULES)),
        [Item::Write(1)]
    );
}

#[test]
fn lease_ids_are_random_128_bit_hex_and_never_repeat() {
    let mut j = job();
    let now = Instant::now();
    let g = j.lease_next(10, W, now, RULES);
    let mut seen = std::collections::HashSet::new();
    for l in &g {
        assert_eq!(l.lease.len(), 32, "{}", l.lease);
        assert!(
            l.lease.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}",
            l.lease
        );
        assert!(!l.lease.contains(&j.id), "the id says nothing of the job");
        assert!(seen.insert(l.lease.clone()));
    }
    // a task leased again gets an unrelated id
    j.expire(now + TTL);
    for l in j.lease_next(10, W, now + TTL, RULES) {
        assert!(seen.insert(l.lease.clone()), "lease id reused");
    }
}

#[test]
fn a_lease_used_by_another_worker_is_refused_and_stays_with_its_holder() {
    let mut j = job();
    let now = Instant::now();
    let g = j.lease_next(4, W, now, RULES);
    let w0 = g.iter().find(|g| g.item == Item::Write(0)).expect("task 0");
    assert_eq!(j.holder(Item::Write(0), &w0.lease, W), Holder::Held);
    assert_eq!(
        j.holder(Item::Write(0), &w0.lease, "evil"),
        Holder::OtherWorker
    );
    assert_eq!(j.holder(Item::Write(0), "guess", W), Holder::NotHeld);
    assert_eq!(
        j.renew(Item::Write(0), &w0.lease, "evil", now, TTL),
        Renewal::OtherWorker
    );
    assert_eq!(
        j.fail_task(Item::Write(0), &w0.lease, "evil", false, "x"),
        TaskFailed::OtherWorker
    );
    assert_eq!(j.status.state, pb::JobState::Running as i32);
    // the holder still holds it, renews it, and completes it
    assert_eq!(
        j.renew(
            Item::Write(0),
            &w0.lease,
            W,
            now + Duration::from_secs(5),
            TTL
        ),
        Renewal::Renewed
    );
    let expired = j.expire(now + TTL);
    assert!(
        !expired.iter().any(|(it, _)| *it == Item::Write(0)),
        "renewed by its holder"
    );
    assert_eq!(
        j.check_result(Item::Write(0), &write_result(0), true),
        Ok(())
    );
}

#[test]
fn a_task_past_its_maximum_run_time_is_not_renewed_and_expires() {
    let mut j = job();
    let now = Instant::now();
    let rules = LeaseRules {
        ttl: TTL,
        max_task_time: Duration::from_secs(25),
    };
    let g = j.lease_next(1, W, now, rules);
    let l = &g[0].lease;
    // renewed every 8 s: the deadline never reaches past the 25 s run time
    for t in [8, 16, 24] {
        let at = now + Duration::from_secs(t);
        assert_eq!(j.renew(S0, l, W, at, TTL), Renewal::Renewed, "at {t} s");
        assert!(j.expire(at).is_empty());
    }
    let at = now + Duration::from_secs(25);
    assert_eq!(j.renew(S0, l, W, at, TTL), Renewal::OverTime);
    assert_eq!(
        j.expire(at),
        [(S0, l.clone())],
        "expired at its maximum run time"
    );
    assert_eq!(j.renew(S0, l, W, at, TTL), Renewal::NotHeld);
    let again = j.lease_next(10, "w1/0", at, rules);
    assert_eq!(again[again.len() - 1].item, S0, "runs again elsewhere");
    assert_eq!(again[again.len() - 1].attempt, 2);
}

#[test]
fn a_result_that_does_not_match_the_plan_is_refused() {
    let mut j = job();
    let now = Instant::now();
    let g = j.lease_next(4, W, now, RULES);
    let bad = |f: &dyn Fn(&mut pb::TaskResult)| {
        let mut r = write_result(0);
        f(&mut r);
        r
    };
    let checks: Vec<(pb::TaskResult, &str)> = vec![
        (bad(&|r| r.part = None), "no part receipt"),
        (
            bad(&|r| r.part.as_mut().unwrap().part_index = 1),
            "names part 1, the plan part 0",
        ),
        (
            bad(&|r| r.part.as_mut().unwrap().size = 7),
            "7 bytes (receipt)",
        ),
        (bad(&|r| r.bytes_written = 0), "0 bytes (written)"),
        (
            bad(&|r| r.stats = stats_result(1).stats),
            "carries statistics",
        ),
    ];
    for (r, want) in checks {
        let e = j.check_result(Item::Write(0), &r, true).expect_err(want);
        assert!(e.contains(want) && e.contains("a.safetensors"), "{e}");
    }
    // a local file's positioned writes carry no part number; their size is still checked
    let other_part = bad(&|r| r.part.as_mut().unwrap().part_index = 1);
    assert_eq!(j.check_result(Item::Write(0), &other_part, false), Ok(()));
    let short = bad(&|r| r.part.as_mut().unwrap().size = 7);
    assert!(j.check_result(Item::Write(0), &short, false).is_err());
    assert_eq!(j.check_result(S0, &stats_result(1), true), Ok(()));
    let e = j
        .check_result(S0, &pb::TaskResult::default(), true)
        .expect_err("no stats");
    assert!(e.contains("no statistics") && e.contains("t1"), "{e}");
    let both = pb::TaskResult {
        stats: stats_result(1).stats,
        ..write_result(0)
    };
    let e = j.check_result(S0, &both, true).expect_err("a receipt");
    assert!(e.contains("part receipt"), "{e}");
    // refused results count as attempts, as failures do
    let w0 = g.iter().find(|g| g.item == Item::Write(0)).expect("task 0");
    let mut lease = w0.lease.clone();
    for attempt in 1..MAX_ATTEMPTS {
        assert_eq!(
            j.fail_task(Item::Write(0), &lease, W, true, "result refused"),
            TaskFailed::Retried(attempt)
        );
        lease = j
            .lease_next(10, W, now, RULES)
            .into_iter()
            .find(|g| g.item == Item::Write(0))
            .expect("queued again")
            .lease;
    }
    assert!(matches!(
        j.fail_task(Item::Write(0), &lease, W, true, "result refused"),
        TaskFailed::Fatal(_)
    ));
}

#[test]
fn a_file_storage_does_not_hold_is_written_again() {
    let mut j = job();
    let now = Instant::now();
    j.lease_next(10, W, now, RULES);
    assert_eq!(
        j.record(Item::Write(2), write_result(0)).ok(),
        Some(Recorded::FileComplete(1))
    );
    assert_eq!((j.status.tasks_done, j.status.bytes_done), (1, 8));
    assert_eq!(j.reopen_file(1), Ok(()));
    assert_eq!((j.status.tasks_done, j.status.bytes_done), (0, 0));
    assert!(j.receipts_of(1).is_empty());
    let again = j.lease_next(10, W, now, RULES);
    assert_eq!(items(&again), [Item::Write(2)]);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(
        j.record(Item::Write(2), write_result(0)).ok(),
        Some(Recorded::FileComplete(1))
    );
    // until its attempts run out
    for _ in 2..MAX_ATTEMPTS {
        j.reopen_file(1).expect("attempts left");
        j.lease_next(10, W, now, RULES);
        j.record(Item::Write(2), write_result(0)).expect("record");
    }
    let e = j.reopen_file(1).expect_err("no attempts left");
    assert!(e.contains("b.safetensors"), "{e}");
}

/// A job manager holding `ids` (the made-up job, writing nowhere) under `limits`.
fn manager(ids: &[&str], limits: super::Limits) -> std::sync::Arc<super::JobManager> {
    let mgr = super::JobManager::new(shardmerge_worker::storage::Resolver::new());
    mgr.set_limits(limits);
    let out = mgr
        .resolver()
        .resolve("/nonexistent/out", std::path::Path::new("/"))
        .expect("location");
    for id in ids {
        let (plan, cut) = plan_and_cut();
        let st = JobState::new(id.to_string(), plan, cut, out.uri(), fake_reduce);
        let uploads: Vec<_> = st
            .plan
            .files
            .iter()
            .map(|f| shardmerge_worker::storage::Upload {
                path: out.join(&f.name).path,
                id: "tmp".into(),
            })
            .collect();
        let job = super::Job::new(st, out.clone(), uploads, false);
        super::lock(&mgr.jobs).insert(id.to_string(), job);
    }
    mgr
}

fn end(mgr: &super::JobManager, id: &str) {
    let mut jobs = super::lock(&mgr.jobs);
    let j = jobs.get_mut(id).expect("job");
    assert!(j.state.end(pb::JobState::Failed, "it failed"));
}

#[test]
fn ended_jobs_leave_memory_after_their_retention_and_status_still_answers() {
    let retention = Duration::from_secs(60);
    let mgr = manager(
        &["a", "b"],
        super::Limits {
            job_retention: retention,
            ..Default::default()
        },
    );
    let now = Instant::now();
    end(&mgr, "a");
    mgr.sweep(now);
    assert_eq!(super::lock(&mgr.jobs).len(), 2, "within its retention");
    mgr.sweep(now + retention);
    assert!(!super::lock(&mgr.jobs).contains_key("a"), "dropped");
    assert!(
        super::lock(&mgr.jobs).contains_key("b"),
        "running jobs stay"
    );
    let st = mgr.status("a").expect("status from history");
    assert_eq!(st.state, pb::JobState::Failed as i32);
    assert_eq!(st.error, "it failed");
    assert_eq!(mgr.list().len(), 2);
    assert!(mgr.watch("a").is_none());
}

#[test]
fn a_sweep_counts_each_point_against_max_jobs() {
    // one job runs under --max-jobs 3: a sweep of 3 points would make 4 jobs
    let mgr = manager(
        &["a"],
        super::Limits {
            max_jobs: 3,
            ..Default::default()
        },
    );
    let e = mgr.admit(3).expect_err("1 + 3 jobs").to_string();
    assert!(e.contains("--max-jobs 3") && e.contains("3 points"), "{e}");
    mgr.admit(2).expect("1 + 2 jobs fit");
    // the ended job makes room for the whole sweep
    end(&mgr, "a");
    mgr.admit(3).expect("room for 3 points");
}

#[test]
fn submissions_past_max_jobs_are_refused() {
    let mgr = manager(
        &["a", "b"],
        super::Limits {
            max_jobs: 2,
            ..Default::default()
        },
    );
    let e = mgr.admit(1).expect_err("two jobs run").to_string();
    assert!(e.contains("--max-jobs 2"), "{e}");
    assert!(matches!(
        mgr.admit(1),
        Err(crate::error::Error::Exhausted { .. })
    ));
    // an ended job makes room, retention or not; it still answers status
    end(&mgr, "a");
    mgr.admit(1).expect("room");
    assert!(!super::lock(&mgr.jobs).contains_key("a"));
    assert_eq!(
        mgr.status("a").map(|s| s.state),
        Some(pb::JobState::Failed as i32)
    );
}

#[test]
fn one_worker_holds_at_most_max_slots_per_worker_leases() {
    let mgr = manager(
        &["a"],
        super::Limits {
            max_slots_per_worker: 2,
            ..Default::default()
        },
    );
    let poll = |w: &str, n: u32| {
        mgr.poll(&pb::PollWorkRequest {
            worker_id: w.into(),
            free_slots: n,
            slot_memory: 0,
        })
        .leases
    };
    let first = poll("greedy", 100);
    assert_eq!(first.len(), 2, "one poll is capped");
    assert!(poll("greedy", 100).is_empty(), "so are the leases held");
    assert_eq!(poll("other", 100).len(), 2, "another worker gets the rest");
    // a lease reported done frees a slot of its holder
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(mgr.fail(&pb::FailTaskRequest {
        worker_id: "greedy".into(),
        lease_id: first[0].lease_id.clone(),
        error: "read timed out".into(),
        retryable: true,
    }));
    assert_eq!(poll("greedy", 100).len(), 1);
}

/// `free_slots` is what a worker can start now: a worker id that holds leases (a slot
/// writing its last group behind it) gets that many more, up to `--max-slots-per-worker`.
#[test]
fn a_worker_holding_leases_gets_what_its_free_slots_ask_up_to_the_cap() {
    let mgr = manager(
        &["a"],
        super::Limits {
            max_slots_per_worker: 2,
            ..Default::default()
        },
    );
    let poll = |n: u32| {
        mgr.poll(&pb::PollWorkRequest {
            worker_id: "slot".into(),
            free_slots: n,
            slot_memory: 0,
        })
        .leases
        .len()
    };
    assert_eq!(poll(1), 1);
    assert_eq!(poll(1), 1, "the lease it holds kept it from the next");
    assert_eq!(poll(1), 0, "past the cap");
}

#[test]
fn progress_counts_statistics_passes_and_ends_at_the_total() {
    let mut j = job();
    let now = Instant::now();
    // unit: 2 passes over 4 rows of 16 input bytes; writes: 8 bytes each, no row segments
    assert_eq!(j.status.work_total, 2 * 4 * 16 + 3 * 8);
    j.lease_next(10, W, now, RULES);
    assert_eq!(j.record(S0, stats_result(1)).ok(), Some(Recorded::Accepted));
    assert_eq!(j.status.work_done, 2 * 16, "a statistics task is work done");
    assert_eq!(j.status.bytes_done, 0, "but writes nothing");
    j.record(S1, stats_result(1)).ok();
    j.lease_next(10, W, now, RULES);
    j.record(S0, stats_result(1)).ok();
    j.record(S1, stats_result(1)).ok();
    for (w, part) in [(Item::Write(0), 0), (Item::Write(2), 0)] {
        j.record(w, write_result(part)).ok();
    }
    j.lease_next(10, W, now, RULES);
    j.record(Item::Write(1), write_result(1)).ok();
    assert_eq!(j.status.work_done, j.status.work_total);
}

#[test]
fn a_unit_done_early_takes_its_unrun_passes_off_the_total() {
    let (plan, cut) = plan_and_cut();
    let done_at_once = |_: &TensorPlan, _: u32, s: Stats, _: Vec<Stats>| Ok(Reduced::Done(s));
    let mut j = JobState::new(
        "job-1".into(),
        plan,
        cut,
        "file:///out".into(),
        done_at_once,
    );
    let now = Instant::now();
    j.lease_next(10, W, now, RULES);
    j.record(S0, stats_result(1)).ok();
    j.record(S1, stats_result(1)).ok();
    assert_eq!(
        j.status.work_total,
        4 * 16 + 3 * 8,
        "the second pass never runs"
    );
    assert_eq!(j.status.work_done, 4 * 16);
}

#[test]
fn a_status_published_with_no_watcher_is_what_a_later_watcher_sees() {
    let mgr = manager(&["a"], super::Limits::default());
    {
        let mut jobs = super::lock(&mgr.jobs);
        let j = jobs.get_mut("a").expect("job");
        assert!(j.state.end(pb::JobState::Failed, "it failed"));
        // nobody watches the job at this moment
        j.publish();
    }
    let rx = mgr.watch("a").expect("watch");
    assert_eq!(rx.borrow().state, pb::JobState::Failed as i32);
}

/// A failed job once showed 500.0%: each rewrite of a file that did not check out in storage
/// counted the file's work again.
#[test]
fn a_file_written_again_does_not_count_its_work_twice() {
    let mut j = job();
    let now = Instant::now();
    j.lease_next(10, W, now, RULES);
    j.record(Item::Write(2), write_result(0)).expect("record");
    let once = j.status.work_done;
    for _ in 1..MAX_ATTEMPTS {
        j.reopen_file(1).expect("attempts left");
        assert_eq!(j.status.work_done, once - 8, "its work is to do again");
        j.lease_next(10, W, now, RULES);
        j.record(Item::Write(2), write_result(0)).expect("record");
        assert_eq!(j.status.work_done, once);
    }
    assert!(j.status.work_done <= j.status.work_total);
}

/// `status` of an ended job once kept counting (2.1 s, 4.1 s, 6.1 s on successive calls) and
/// showed the leases its tasks held when it ended (`leases 1` on a failed job).
#[test]
fn an_ended_job_stops_its_clock_and_holds_no_leases() {
    let mgr = manager(&["a"], super::Limits::default());
    let leases = mgr
        .poll(&pb::PollWorkRequest {
            worker_id: "w".into(),
            free_slots: 2,
            slot_memory: 0,
        })
        .leases;
    assert!(!leases.is_empty());
    assert_eq!(
        mgr.status("a").expect("status").leases_active as usize,
        leases.len()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ended = rt.block_on(mgr.cancel("a")).expect("status");
    assert_eq!(ended.state, pb::JobState::Cancelled as i32);
    assert_eq!(ended.leases_active, 0, "an ended job holds no leases");
    std::thread::sleep(Duration::from_millis(30));
    for later in [
        mgr.status("a").expect("status"),
        mgr.list().remove(0),
        mgr.watch("a").expect("watch").borrow().clone(),
    ] {
        assert_eq!(
            later.elapsed_seconds, ended.elapsed_seconds,
            "the clock stopped"
        );
        assert_eq!(later.leases_active, 0);
    }
}

/// The leased count the status reports is kept as tasks change state (not counted by walking
/// every task per call): it follows leases, expiry, failure, requeue, results and reopening.
/// (`leases_active` also checks it against a walk in debug builds.)
#[test]
fn the_count_of_active_leases_follows_every_change_of_state() {
    let mut j = job();
    let now = Instant::now();
    assert_eq!(j.leases_active(), 0);
    let g = j.lease_next(2, W, now, RULES);
    assert_eq!((items(&g), j.leases_active()), (vec![S0, S1], 2));
    assert_eq!(j.expire(now + TTL).len(), 2);
    assert_eq!(j.leases_active(), 0);
    let g = j.lease_next(10, W, now + TTL, RULES);
    assert_eq!(j.leases_active(), 4);
    let lease_of = |it: Item| {
        g.iter()
            .find(|x| x.item == it)
            .expect("leased")
            .lease
            .clone()
    };
    assert_eq!(
        j.fail_task(Item::Write(0), &lease_of(Item::Write(0)), W, true, "x"),
        TaskFailed::Retried(1)
    );
    assert_eq!(j.leases_active(), 3);
    j.requeue(Item::Write(2), &lease_of(Item::Write(2)));
    assert_eq!(j.leases_active(), 2);
    // a result for a task queued again stands, and counts no lease
    assert_eq!(
        j.record(Item::Write(2), write_result(0)).ok(),
        Some(Recorded::FileComplete(1))
    );
    assert_eq!(j.leases_active(), 2);
    assert_eq!(j.record(S0, stats_result(1)).ok(), Some(Recorded::Accepted));
    assert_eq!(j.leases_active(), 1);
    j.reopen_file(1).expect("attempts left");
    assert_eq!(j.leases_active(), 1);
    let g = j.lease_next(10, W, now + TTL, RULES);
    assert_eq!(j.leases_active(), 1 + g.len() as u32);
}

/// Issue 18: a `CompleteTask` arriving after its lease ran out was accepted whenever no poll had
/// run the expiry scan in between. Refused now, and the task is handed to the next poll.
#[test]
fn a_completion_after_the_lease_ran_out_is_refused_and_the_task_runs_again() {
    let mgr = manager(&["a"], super::Limits::default());
    mgr.set_lease_ttl(Duration::from_millis(200));
    let poll = |w: &str, n: u32| {
        mgr.poll(&pb::PollWorkRequest {
            worker_id: w.into(),
            free_slots: n,
            slot_memory: 0,
        })
        .leases
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let complete = |lease: &str| {
        rt.block_on(mgr.complete(&pb::CompleteTaskRequest {
            worker_id: "slow".into(),
            lease_id: lease.into(),
            result: Some(stats_result(1)),
        }))
    };
    let both = poll("slow", 2);
    assert_eq!(both.len(), 2);
    let (late, on_time) = (&both[..1], &both[1..]);
    // in time: accepted
    assert!(complete(&on_time[0].lease_id), "a result within the lease");
    // no poll in between, so no expiry scan: only the completion sees the lease ran out
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !complete(&late[0].lease_id),
        "a result 200 ms after its lease ran out was accepted"
    );
    let renewed = mgr.renew(&pb::RenewLeaseRequest {
        worker_id: "slow".into(),
        lease_ids: vec![late[0].lease_id.clone()],
    });
    assert_eq!(renewed.lost, [late[0].lease_id.clone()]);
    let again = poll("other", 3);
    assert_eq!(again.len(), 3, "the task is queued again");
    let id = |l: &pb::Lease| l.task.as_ref().map(|t| t.task_id);
    assert!(again.iter().any(|l| id(l) == id(&late[0])), "the same task");
    assert_eq!(mgr.status("a").map(|s| s.tasks_done), Some(1));
}

#[test]
fn a_renewal_after_the_deadline_is_refused_even_before_the_expiry_scan() {
    let mut j = job();
    let now = Instant::now();
    let g = j.lease_next(1, W, now, RULES);
    assert!(!j.lease_ran_out(S0, &g[0].lease, now + TTL - Duration::from_millis(1)));
    assert!(j.lease_ran_out(S0, &g[0].lease, now + TTL));
    assert_eq!(
        j.renew(S0, &g[0].lease, W, now + TTL, TTL),
        Renewal::NotHeld
    );
}
