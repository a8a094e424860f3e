//! Property tests of the job core: random sequences of polls, renewals, completions (some by a
//! worker that does not hold the lease), failures, time passing (leases expiring), file
//! completions, cancels and coordinator restarts (a new `JobState` replaying the journal) are
//! driven through `JobState` as `JobManager` drives it, checking after every step that
//! - a task's result is accepted (journaled) once: no journal key twice;
//! - a task is leased by one lease at most, every lease names one task, and a lease is held
//!   by one worker id at most;
//! - an ended job never changes state again, and only a committed job succeeds;
//! - the output commits only when every task is done and every file complete;
//!   and at the end that a job left running, driven honestly, commits.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use shardmerge_proto as pb;

use super::state::{Holder, JobState, Recorded, TaskFailed};
use super::tests::{job, stats_result, RULES, TTL};
use crate::journal::Item;

const WORKERS: [&str; 3] = ["a/0", "a/1", "b/0"];

#[derive(Clone, Debug)]
enum Op {
    Poll {
        worker: usize,
        want: usize,
    },
    Renew {
        lease: usize,
    },
    Complete {
        lease: usize,
        other: bool,
    },
    Fail {
        lease: usize,
        retryable: bool,
    },
    /// Time passes (milliseconds), then the expiry scan runs.
    Tick(u64),
    /// The oldest file completion waiting (`finish_file`) runs.
    Finish,
    Cancel,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..WORKERS.len(), 1..4usize).prop_map(|(worker, want)| Op::Poll { worker, want }),
        2 => any::<usize>().prop_map(|lease| Op::Renew { lease }),
        8 => (any::<usize>(), prop::bool::weighted(0.1))
            .prop_map(|(lease, other)| Op::Complete { lease, other }),
        2 => (any::<usize>(), prop::bool::weighted(0.9))
            .prop_map(|(lease, retryable)| Op::Fail { lease, retryable }),
        2 => (0..2 * TTL.as_millis() as u64).prop_map(Op::Tick),
        3 => Just(Op::Finish),
        1 => Just(Op::Cancel),
        1 => Just(Op::Restart),
    ]
}

/// The job and what its driver holds: the journal, the files complete, the leases handed
/// out (stale ones too: they are used again, and must be refused).
struct Sim {
    st: JobState,
    now: Instant,
    journal: Vec<(String, pb::TaskResult)>,
    files_finished: Vec<usize>,
    /// Files a result completed, waiting for their completion to run.
    pending: Vec<usize>,
    leases: Vec<(String, String, Item)>,
    committed: bool,
    /// The state the job ended in, once it did.
    ended: Option<i32>,
}

/// A result of `it` that checks out against the plan of `job()`.
fn result_of(st: &JobState, it: Item) -> pb::TaskResult {
    match it {
        Item::Write(i) => {
            let t = &st.cut.tasks[i];
            pb::TaskResult {
                part: Some(pb::PartReceipt {
                    part_index: t.part_index,
                    size: t.length,
                    ..Default::default()
                }),
                bytes_written: t.length,
                ..Default::default()
            }
        }
        _ => stats_result(1),
    }
}

impl Sim {
    fn new() -> Sim {
        Sim {
            st: job(),
            now: Instant::now(),
            journal: Vec::new(),
            files_finished: Vec::new(),
            pending: Vec::new(),
            leases: Vec::new(),
            committed: false,
            ended: None,
        }
    }

    fn lease(&self, i: usize) -> Option<(String, String, Item)> {
        (!self.leases.is_empty()).then(|| self.leases[i % self.leases.len()].clone())
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Poll { worker, want } => {
                let w = WORKERS[worker];
                if !self.st.terminal() {
                    for g in self.st.lease_next(want, w, self.now, RULES) {
                        self.leases.push((g.lease, w.to_string(), g.item));
                    }
                }
            }
            Op::Renew { lease } => {
                if let Some((l, w, it)) = self.lease(lease) {
                    self.st.renew(it, &l, &w, self.now, TTL);
                }
            }
            Op::Complete { lease, other } => {
                if let Some((l, w, it)) = self.lease(lease) {
                    let w = if other { "intruder/0".to_string() } else { w };
                    self.complete(&l, &w, it);
                }
            }
            Op::Fail { lease, retryable } => {
                if let Some((l, w, it)) = self.lease(lease) {
                    if let TaskFailed::Fatal(msg) = self.st.fail_task(it, &l, &w, retryable, "x") {
                        self.st.end(pb::JobState::Failed, &msg);
                    }
                }
            }
            Op::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                self.st.expire(self.now);
            }
            Op::Finish => {
                if !self.pending.is_empty() {
                    let fi = self.pending.remove(0);
                    self.finish(fi);
                }
            }
            Op::Cancel => {
                self.st.end(pb::JobState::Cancelled, "cancelled");
            }
            Op::Restart => self.restart(),
        }
    }

    /// `JobManager::complete`: the holder's result, refused when late, checked, journaled,
    /// then recorded.
    fn complete(&mut self, lease: &str, worker: &str, it: Item) {
        if self.st.terminal() || self.st.holder(it, lease, worker) != Holder::Held {
            return;
        }
        if self.st.lease_ran_out(it, lease, self.now) {
            self.st.expire(self.now);
            return;
        }
        let result = result_of(&self.st, it);
        assert_eq!(self.st.check_result(it, &result, true), Ok(()));
        let key = self.st.task_key(it);
        assert!(
            self.journal.iter().all(|(k, _)| *k != key),
            "task {key} accepted twice"
        );
        self.journal.push((key, result.clone()));
        match self.st.record_by(it, result, Some(worker)).expect("record") {
            Recorded::Ignored => panic!("a held task's result was ignored"),
            Recorded::Accepted => {}
            Recorded::FileComplete(fi) => self.pending.push(fi),
            Recorded::FilesComplete(fs) => self.pending.extend(fs),
        }
    }

    /// `finish_file` then `file_done`: the last file commits the checkpoint.
    fn finish(&mut self, fi: usize) {
        if !self.files_finished.contains(&fi) {
            self.files_finished.push(fi);
        }
        if self.st.file_finished() {
            assert!(
                self.all_done(),
                "the output commits with tasks not done: {} of {}",
                self.st.status.tasks_done,
                self.st.status.tasks_total
            );
            assert_eq!(self.files_finished.len(), self.st.plan.files.len());
            self.committed = true;
            self.st.succeed();
        }
    }

    /// `recover`: a job that ended is not resumed; a running one is rebuilt from the journal,
    /// and the files its replay completes are completed (or counted, when already recorded).
    fn restart(&mut self) {
        if self.st.terminal() {
            return;
        }
        self.st = job();
        self.pending.clear();
        let complete = self.st.replay(self.journal.clone()).expect("replay");
        for f in complete {
            if self.files_finished.contains(&f) {
                self.finish(f);
            } else {
                self.pending.push(f);
            }
        }
    }

    fn all_done(&self) -> bool {
        self.st.all_done() && self.st.status.tasks_done == self.st.status.tasks_total
    }

    fn check(&mut self) {
        let mut leases = HashSet::new();
        let held = self.st.leased_now();
        for (it, lease, worker) in &held {
            assert!(leases.insert(*lease), "one lease on two tasks");
            assert_eq!(self.st.holder(*it, lease, worker), Holder::Held);
        }
        assert_eq!(self.st.leases_active() as usize, held.len());
        let mut holders: HashMap<&str, usize> = HashMap::new();
        for (l, _, it) in &self.leases {
            for w in WORKERS.iter().chain(["intruder/0"].iter()) {
                if self.st.holder(*it, l, w) == Holder::Held {
                    *holders.entry(l.as_str()).or_default() += 1;
                }
            }
        }
        assert!(holders.values().all(|&n| n == 1), "a lease held twice");
        let s = &self.st.status;
        assert!(s.tasks_done <= s.tasks_total);
        match self.ended {
            Some(e) => assert_eq!(s.state, e, "an ended job changed state"),
            None if self.st.terminal() => self.ended = Some(s.state),
            None => {}
        }
        if s.state == pb::JobState::Succeeded as i32 {
            assert!(self.committed);
        }
        if self.committed {
            assert!(self.all_done());
        }
    }

    /// Honest workers until the job ends (it must, within a bound).
    fn run_out(&mut self) {
        for _ in 0..200 {
            if self.st.terminal() {
                return;
            }
            self.now += 2 * TTL;
            self.st.expire(self.now);
            let granted = self.st.lease_next(8, WORKERS[0], self.now, RULES);
            for g in granted {
                self.complete(&g.lease, WORKERS[0], g.item);
                self.check();
            }
            while !self.pending.is_empty() {
                let fi = self.pending.remove(0);
                self.finish(fi);
                self.check();
            }
        }
        panic!("the job did not end: {:?}", self.st.status);
    }
}

proptest! {
    // a failing case is printed, shrunk, not written to a file under the source tree
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_job_core_keeps_its_invariants(ops in prop::collection::vec(op(), 1..120)) {
        let mut sim = Sim::new();
        for op in &ops {
            sim.step(op);
            sim.check();
        }
        let cancelled = sim.ended == Some(pb::JobState::Cancelled as i32);
        sim.run_out();
        let state = sim.st.status.state;
        prop_assert!(
            sim.committed || state == pb::JobState::Failed as i32 || cancelled,
            "ended as {state} without a commit"
        );
    }
}
