//! Result audits (`job/state/audit.rs`) driven on the made-up plan of `tests.rs`: worker
//! processes given by name, results by the CRC-32C they report, the time by hand.

use std::time::{Duration, Instant};

use shardmerge_proto as pb;

use super::state::sampled;
use super::state::{AuditEvent, AuditRules, JobState, Recorded};
use super::tests::{job, stats_result, RULES, S0, S1, TTL};
use crate::journal::Item;

/// A write result (or an audit's) of the test plan's 8-byte parts with CRC-32C `crc`.
fn part(crc: u32) -> pb::TaskResult {
    pb::TaskResult {
        part: Some(pb::PartReceipt {
            size: 8,
            crc32c: crc,
            ..Default::default()
        }),
        bytes_written: 8,
        ..Default::default()
    }
}

/// An audit's result: the part's size and CRC-32C, nothing written.
fn audit(crc: u32) -> pb::TaskResult {
    pb::TaskResult {
        bytes_written: 0,
        ..part(crc)
    }
}

/// An audit that says it wrote its bytes is refused (audits write nothing); a write result
/// that says it wrote none is refused too.
#[test]
fn an_audit_reports_nothing_written_and_a_write_its_bytes() {
    let mut j = audited(1.0);
    let now = Instant::now();
    let done = work(&mut j, "a", 5, now);
    let w = done
        .iter()
        .find_map(|(it, _)| matches!(it, Item::Write(_)).then_some(*it))
        .expect("a write task");
    let Item::Write(i) = w else { unreachable!() };
    assert!(j.check_result(Item::Audit(i), &audit(5), false).is_ok());
    let e = j.check_result(Item::Audit(i), &part(5), false).unwrap_err();
    assert!(e.contains("(written: 0)"), "{e}");
    assert!(j.check_result(w, &audit(5), false).is_err());
}

fn audited(fraction: f64) -> JobState {
    let mut j = job();
    j.set_audits(AuditRules { fraction, seed: 7 });
    j
}

/// Leases everything process `p` may take now, one task at a time, and completes it:
/// statistics honestly, write tasks and audits with a part of CRC-32C `crc`. Returns what was
/// leased and what its result did.
fn work(j: &mut JobState, p: &str, crc: u32, now: Instant) -> Vec<(Item, Recorded)> {
    let w = format!("{p}/0");
    let mut out = Vec::new();
    while let Some(g) = j.lease_next(1, &w, now, RULES).pop() {
        let r = match g.item {
            Item::Stats { .. } => stats_result(1),
            Item::Audit(_) => audit(crc),
            _ => part(crc),
        };
        let rec = j.record_by(g.item, r, Some(&w)).expect("record");
        out.push((g.item, rec));
    }
    out
}

fn files_released(done: &[(Item, Recorded)]) -> Vec<usize> {
    done.iter()
        .flat_map(|(_, r)| match r {
            Recorded::FilesComplete(f) => f.clone(),
            Recorded::FileComplete(f) => vec![*f],
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn files_complete_only_once_every_audit_passed() {
    let mut j = audited(1.0);
    let now = Instant::now();
    let a = work(&mut j, "a", 5, now);
    let writes = a.iter().filter(|(it, _)| matches!(it, Item::Write(_)));
    assert_eq!(writes.count(), 3, "{a:?}");
    assert!(
        files_released(&a).is_empty(),
        "no file before its audits: {a:?}"
    );
    assert!(
        work(&mut j, "a", 5, now).is_empty(),
        "a does not audit itself"
    );
    let b = work(&mut j, "b", 5, now);
    let audits: Vec<Item> = b.iter().map(|(it, _)| *it).collect();
    assert_eq!(audits.len(), 3);
    assert!(
        audits.iter().all(|it| matches!(it, Item::Audit(_))),
        "{b:?}"
    );
    assert_eq!(
        files_released(&b),
        [0, 1],
        "every file, once, at the last audit"
    );
    assert_eq!(j.status.audits_passed, 3);
    assert_eq!(j.status.tasks_done, 7, "audits are not tasks");
    assert!(j.take_audit_events().is_empty());
}

#[test]
fn a_worker_that_writes_zeros_is_caught_quarantined_and_its_tasks_run_again() {
    let mut j = audited(1.0);
    let now = Instant::now();
    work(&mut j, "liar", 0, now);
    // an honest process disagrees with every result: both are suspects, nobody is blamed yet
    let h = work(&mut j, "h", 5, now);
    assert_eq!(h.len(), 3, "{h:?}");
    assert!(j.status.quarantined.is_empty() && j.take_audit_events().is_empty());
    // a third breaks the tie: the liar is quarantined, the other audits of its results are
    // dropped, and its write tasks run again (here on the tie-breaker)
    let t = work(&mut j, "t", 5, now);
    assert!(
        matches!(t[0].0, Item::Audit(_)),
        "the tie-break first: {t:?}"
    );
    assert_eq!(j.status.quarantined, ["liar"]);
    assert_eq!(j.status.audits_failed, 1);
    let events = j.take_audit_events();
    assert!(
        matches!(&events[..], [AuditEvent::Quarantined { process, .. }] if process == "liar"),
        "{events:?}"
    );
    let reruns: Vec<Item> = t[1..].iter().map(|(it, _)| *it).collect();
    assert_eq!(reruns.len(), 3, "{t:?}");
    assert!(reruns.iter().all(|it| matches!(it, Item::Write(_))));
    assert!(j.is_quarantined("liar/1"), "by process, every slot");
    assert!(j.lease_next(10, "liar/0", now, RULES).is_empty());
    // the re-runs are audited too (by h), and then the files complete with the honest parts
    let h = work(&mut j, "h", 5, now);
    assert_eq!(files_released(&h), [0, 1], "{h:?}");
    assert!(j.receipts_of(0).iter().all(|r| r.crc32c == 5));
    assert!(j.receipts_of(1).iter().all(|r| r.crc32c == 5));
    assert_eq!(j.status.tasks_done, 7);
}

#[test]
fn a_lying_auditor_is_the_one_quarantined() {
    let mut j = audited(1.0);
    let now = Instant::now();
    work(&mut j, "h", 5, now);
    work(&mut j, "liar", 0, now);
    let t = work(&mut j, "t", 5, now);
    assert_eq!(j.status.quarantined, ["liar"], "{t:?}");
    assert!(
        t.iter().all(|(it, _)| matches!(it, Item::Audit(_))),
        "h's results stand: {t:?}"
    );
    assert_eq!(files_released(&t), [0, 1]);
}

#[test]
fn what_waited_for_a_quarantined_process_goes_to_the_others_at_once() {
    let mut j = audited(1.0);
    let now = Instant::now();
    let one = |j: &mut JobState, p: &str, crc: u32| {
        let w = format!("{p}/0");
        let g = j.lease_next(1, &w, now, RULES).pop().expect("a task");
        let r = match g.item {
            Item::Stats { .. } => stats_result(1),
            Item::Audit(_) => audit(crc),
            _ => part(crc),
        };
        j.record_by(g.item, r, Some(&w)).expect("record");
        g.item
    };
    // the liar runs the statistics unit's first pass: its next pass waits for the liar's
    // row cache; then it lies auditing h's write, and t's tie-break quarantines it
    assert_eq!(one(&mut j, "liar", 0), S0);
    assert_eq!(one(&mut j, "liar", 0), S1);
    assert_eq!(one(&mut j, "h", 5), Item::Write(0));
    assert_eq!(one(&mut j, "liar", 0), Item::Audit(0));
    assert_eq!(one(&mut j, "t", 5), Item::Audit(0));
    assert_eq!(j.status.quarantined, ["liar"]);
    let rest: Vec<Item> = work(&mut j, "t", 5, now)
        .iter()
        .map(|(it, _)| *it)
        .collect();
    assert!(
        rest.contains(&S0) && rest.contains(&S1) && rest.contains(&Item::Write(1)),
        "the unit's next pass and its write run now: {rest:?}"
    );
}

#[test]
fn one_worker_process_skips_its_audits_two_ttls_after_the_first_poll_and_says_so_once() {
    let mut j = audited(1.0);
    let now = Instant::now();
    assert!(files_released(&work(&mut j, "solo", 5, now)).is_empty());
    // (another process may be on its way: just after a coordinator restart, the first to poll
    // again is not alone for being first)
    assert_eq!(j.audit_tick(now, TTL * 2), Recorded::Accepted);
    assert_eq!(j.audit_tick(now + TTL, TTL * 2), Recorded::Accepted);
    assert_eq!(j.status.audits_skipped, 0);
    let r = j.audit_tick(now + TTL * 2, TTL * 2);
    assert_eq!(r, Recorded::FilesComplete(vec![0, 1]));
    assert_eq!(j.status.audits_skipped, 3);
    let events = j.take_audit_events();
    assert!(matches!(&events[..], [AuditEvent::Alone(_)]), "{events:?}");
}

#[test]
fn an_auditor_that_went_away_gets_two_ttls_to_come_back() {
    let mut j = audited(1.0);
    let now = Instant::now();
    // b polled once, long ago; a does everything
    assert!(j.lease_next(1, "b/0", now, RULES).len() == 1);
    j.expire(now + TTL * 3);
    let later = now + TTL * 3;
    work(&mut j, "a", 5, later);
    assert_eq!(j.audit_tick(later, TTL * 2), Recorded::Accepted, "waits");
    assert_eq!(
        j.audit_tick(later + TTL, TTL * 2),
        Recorded::Accepted,
        "still"
    );
    let r = j.audit_tick(later + TTL * 2 + Duration::from_millis(1), TTL * 2);
    assert_eq!(r, Recorded::FilesComplete(vec![0, 1]));
    assert_eq!(j.status.audits_skipped, 3);
}

#[test]
fn a_disagreement_between_two_processes_and_no_third_fails_the_job() {
    let mut j = audited(1.0);
    let now = Instant::now();
    work(&mut j, "a", 0, now);
    work(&mut j, "b", 5, now);
    assert_eq!(j.audit_tick(now, TTL * 2), Recorded::Accepted);
    assert!(
        j.take_audit_events().is_empty(),
        "a third may be on its way"
    );
    assert_eq!(j.audit_tick(now + TTL * 2, TTL * 2), Recorded::Accepted);
    let events = j.take_audit_events();
    assert!(
        matches!(&events[..], [AuditEvent::Undecided(m)] if m.contains("\"a\"") && m.contains("\"b\"")),
        "{events:?}"
    );
    assert!(j.status.quarantined.is_empty(), "nobody is blamed");
}

#[test]
fn without_audits_files_complete_as_they_finish() {
    let mut j = audited(0.0);
    let done = work(&mut j, "a", 5, Instant::now());
    assert_eq!(files_released(&done).len(), 2);
    assert!(done.iter().all(|(it, _)| !matches!(it, Item::Audit(_))));
}

#[test]
fn the_sample_is_the_fraction_asked_and_follows_the_seed() {
    let rules = |fraction, seed| AuditRules { fraction, seed };
    let n = 100_000;
    let count = |r| (0..n).filter(|&i| sampled(r, i)).count();
    let one = count(rules(0.01, 1));
    assert!((800..1200).contains(&one), "{one} of {n}");
    assert_eq!(count(rules(0.0, 1)), 0);
    assert_eq!(count(rules(1.0, 1)), n);
    let picks = |seed| {
        (0..n)
            .filter(|&i| sampled(rules(0.01, seed), i))
            .collect::<Vec<_>>()
    };
    assert_eq!(picks(1), picks(1));
    assert_ne!(picks(1), picks(2));
}

/// After a coordinator restart, a journaled write result in the audit sample whose file was
/// not completed is not believed (its audit was not journaled): the task runs again. Results
/// outside the sample, of completed files, and statistics are replayed as before.
#[test]
fn a_resumed_job_runs_unverified_sampled_writes_again() {
    let j = job();
    let n = j.cut.tasks.len();
    let records: Vec<(String, pb::TaskResult)> = (0..n)
        .map(|i| (format!("w{i}"), part(1)))
        .chain([("s0.0.0".to_string(), stats_result(1))])
        .collect();
    let keys = |rules, finished: &[usize]| {
        j.believable(records.clone(), rules, finished)
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    };
    let all = AuditRules {
        fraction: 1.0,
        seed: 7,
    };
    assert_eq!(keys(all, &[]), ["s0.0.0"], "every write runs again");
    let file0: Vec<String> = (0..n)
        .filter(|&i| j.cut.tasks[i].file == 0)
        .map(|i| format!("w{i}"))
        .chain(["s0.0.0".to_string()])
        .collect();
    assert_eq!(keys(all, &[0]), file0, "a completed file's writes stand");
    let off = AuditRules::default();
    assert_eq!(keys(off, &[]).len(), n + 1, "no audits: all replayed");
    let some = AuditRules {
        fraction: 0.5,
        seed: 7,
    };
    let kept = keys(some, &[]);
    for i in 0..n {
        assert_eq!(
            kept.contains(&format!("w{i}")),
            !sampled(some, i),
            "task {i}"
        );
    }
}
