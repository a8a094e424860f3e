//! Write-behind: a slot's group of tasks is written while the slot computes the next one.
//!
//! A slot that computed a group's bytes hands them to a writer task ([`Behind`]) and takes its
//! next lease at once; the writer writes the parts, then reports the results (the leases stay
//! renewed until it has). A slot has at most one group behind it, and waits for it before its
//! next group's own bytes go out, so it holds at most two groups' output buffers, and only
//! while the two fit the half of the slot the plan cuts a task's output to (`settle_for`).

use std::sync::Arc;

use shardmerge_proto as pb;
use tokio::sync::watch;

use super::{hand_back, report, stopped, WorkSource};
use crate::exec::{Executor, Scratch, Writes};

/// A group's writes in flight.
pub(super) struct Behind {
    handle: tokio::task::JoinHandle<Vec<Vec<u8>>>,
    /// The bytes its buffers hold.
    bytes: u64,
}

/// The leases of a group and when it started, for the reports.
pub(super) struct Group {
    pub worker_id: String,
    /// (lease id, task id) of the lease and its riders, in the order of the results.
    pub leases: Vec<(String, u64)>,
    pub started: std::time::Instant,
    pub renewer: tokio::task::JoinHandle<()>,
}

/// Waits for the writes behind the slot, if any, and keeps their buffers for its next tasks.
pub(super) async fn settle(behind: &mut Option<Behind>, scratch: &mut Scratch) {
    if let Some(b) = behind.take() {
        // (a writer that panicked gave nothing back: its leases expire and run again)
        if let Ok(bufs) = b.handle.await {
            scratch.keep_outputs(bufs);
        }
    }
}

/// Settles the writes behind the slot first when they and a group writing `out` bytes would
/// not both fit in half of `slot_memory`.
pub(super) async fn settle_for(
    behind: &mut Option<Behind>,
    scratch: &mut Scratch,
    out: u64,
    slot_memory: u64,
) {
    if behind
        .as_ref()
        .is_some_and(|b| must_settle(b.bytes, out, slot_memory))
    {
        settle(behind, scratch).await;
    }
}

/// Whether a group writing `out` bytes must wait for the writes behind its slot (`behind`
/// bytes): both would not fit in half of `slot_memory`.
fn must_settle(behind: u64, out: u64, slot_memory: u64) -> bool {
    behind.saturating_add(out) > slot_memory / 2
}

/// The output bytes of `tasks`' write tasks.
pub(super) fn out_bytes(tasks: &[&pb::Task]) -> u64 {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(pb::task::Kind::Write(w)) => w.output.as_ref().map(|o| o.length),
            _ => None,
        })
        .fold(0u64, u64::saturating_add)
}

/// Writes `w` behind the slot: the parts written, then each task's result reported (a stop
/// first hands the leases back, as a stop while computing does).
pub(super) fn spawn(
    source: &Arc<dyn WorkSource>,
    exec: &Executor,
    w: Writes,
    g: Group,
    mut stop: watch::Receiver<bool>,
) -> Behind {
    let bytes = w.bytes();
    let (source, exec) = (source.clone(), exec.clone());
    let handle = tokio::spawn(async move {
        let done = tokio::select! {
            r = exec.write_out(w) => Some(r),
            _ = stopped(&mut stop) => None,
        };
        g.renewer.abort();
        let Some((results, bufs)) = done else {
            hand_back(source.as_ref(), &g.worker_id, &g.leases).await;
            return Vec::new();
        };
        finish(source.as_ref(), &g, results).await;
        bufs
    });
    Behind { handle, bytes }
}

/// Reports a group's results, the riders' first: when the lead task's result unblocks its
/// job's next tasks (a statistics unit's last pass), the riders' are unblocked already and go
/// with them.
pub(super) async fn finish(
    source: &dyn WorkSource,
    g: &Group,
    results: Vec<Result<pb::TaskResult, crate::exec::TaskError>>,
) {
    for ((id, task), result) in g.leases.iter().zip(results).rev() {
        report(source, &g.worker_id, id, *task, g.started, result).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::pull::{run, LoopOptions, SourceError};
    use crate::storage::fault::{FaultPlan, FaultyStorage};
    use crate::storage::Resolver;

    /// Hands out its leases one poll at a time and records what was reported.
    #[derive(Default)]
    struct Queue {
        leases: Mutex<VecDeque<pb::Lease>>,
        handed: Mutex<usize>,
        reported: Mutex<Vec<String>>,
    }

    impl Queue {
        fn handed(&self) -> usize {
            *self.handed.lock().unwrap()
        }
        fn reported(&self) -> Vec<String> {
            self.reported.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl WorkSource for Queue {
        async fn poll(&self, _: pb::PollWorkRequest) -> Result<pb::PollWorkResponse, SourceError> {
            let lease = self.leases.lock().unwrap().pop_front();
            *self.handed.lock().unwrap() += usize::from(lease.is_some());
            Ok(pb::PollWorkResponse {
                leases: lease.into_iter().collect(),
                retry_after_ms: 5,
            })
        }
        async fn renew(
            &self,
            _: pb::RenewLeaseRequest,
        ) -> Result<pb::RenewLeaseResponse, SourceError> {
            Ok(Default::default())
        }
        async fn complete(
            &self,
            req: pb::CompleteTaskRequest,
        ) -> Result<pb::CompleteTaskResponse, SourceError> {
            self.reported.lock().unwrap().push(req.lease_id);
            Ok(Default::default())
        }
        async fn fail(&self, req: pb::FailTaskRequest) -> Result<(), SourceError> {
            let line = format!("{} failed: {}", req.lease_id, req.error);
            self.reported.lock().unwrap().push(line);
            Ok(())
        }
    }

    /// A write task of `k` repeated 8 times, into file `path` (which exists, 8 bytes long).
    fn lease(k: u8, path: &str) -> pb::Lease {
        let task = pb::Task {
            task_id: u64::from(k),
            job_id: "j".into(),
            kind: Some(pb::task::Kind::Write(pb::WriteTask {
                output: Some(pb::OutputTarget {
                    uri: path.into(),
                    length: 8,
                    sink: Some(pb::output_target::Sink::Local(pb::LocalSink {
                        path: path.into(),
                    })),
                    ..Default::default()
                }),
                segments: vec![pb::Segment {
                    kind: Some(pb::segment::Kind::Literal(vec![k; 8])),
                }],
                ..Default::default()
            })),
            ..Default::default()
        };
        pb::Lease {
            lease_id: format!("l{k}"),
            task: Some(task),
            ttl_ms: 60_000,
            ..Default::default()
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// A slot takes and computes its next lease while the last one's part is still being
    /// written, never more than one ahead, and reports each task once its part is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_computes_the_next_group_while_the_last_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<String> = (0..3u8)
            .map(|k| {
                let p = dir.path().join(format!("out{k}"));
                std::fs::write(&p, [0u8; 8]).unwrap();
                p.to_string_lossy().into_owned()
            })
            .collect();
        let source = Arc::new(Queue::default());
        let leases = paths.iter().zip(0u8..).map(|(p, k)| lease(k, p));
        source.leases.lock().unwrap().extend(leases);
        // every part write waits for a permit
        let gate = Arc::new(Semaphore::new(0));
        let plan = FaultPlan {
            write_gate: Some(gate.clone()),
            ..Default::default()
        };
        let exec = Executor {
            resolver: Resolver::with_wrapper(move |s| FaultyStorage::wrap(s, plan.clone())),
            ..Default::default()
        };
        let opts = LoopOptions {
            worker_id: "w".into(),
            slots: 1,
            slot_memory: 1 << 20,
            max_idle: Duration::from_millis(5),
        };
        let (stop, stopped) = watch::channel(false);
        let src: Arc<dyn WorkSource> = source.clone();
        let slot = tokio::spawn(run(src, exec, opts, stopped));

        // lease 0 is being written: lease 1 is taken and computed meanwhile, lease 2 is not
        until("the second lease", || source.handed() == 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            source.handed(),
            2,
            "more than one group ahead of its writes"
        );
        assert!(source.reported().is_empty(), "reported before written");
        gate.add_permits(1);
        until("lease 0's report", || source.reported().len() == 1).await;
        until("the third lease", || source.handed() == 3).await;
        assert_eq!(source.reported(), ["l0"]);
        gate.add_permits(2);
        until("every report", || source.reported().len() == 3).await;
        assert_eq!(source.reported(), ["l0", "l1", "l2"]);
        for (k, p) in (0u8..).zip(&paths) {
            assert_eq!(std::fs::read(p).unwrap(), [k; 8]);
        }
        stop.send(true).unwrap();
        slot.await.unwrap();
    }

    /// Two groups' buffers are held at once only while they fit the half of the slot a
    /// task's output is cut to.
    #[test]
    fn a_slot_waits_for_its_writes_when_two_groups_would_not_fit() {
        assert!(!must_settle(100, 100, 400));
        assert!(must_settle(101, 100, 400));
        assert!(must_settle(u64::MAX, 1, 400));
    }
}
