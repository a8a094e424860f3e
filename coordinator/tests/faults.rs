//! Nothing lost, nothing half-done: retried faults give the same bytes, a lost worker's lease
//! expires and its task runs again, a late completion of an expired lease is ignored, and a job
//! that fails leaves nothing that looks finished. Faults are injected by a storage wrapper.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use shardmerge::embedded::{self, RunOptions};
use shardmerge::job::{JobManager, SubmitOptions};
use shardmerge::journal::Journal;
use shardmerge_proto as pb;
use shardmerge_worker::exec::Executor;
use shardmerge_worker::pull::{self, LoopOptions};
use shardmerge_worker::storage::fault::{FaultPlan, FaultyStorage};
use shardmerge_worker::storage::Resolver;

fn recipe() -> String {
    std::fs::read_to_string(golden().join("cases/ties_multilingual/config.yml")).unwrap()
}

fn opts(task_size: u64) -> RunOptions {
    RunOptions {
        workers: 3,
        submit: SubmitOptions {
            task_size,
            slot_memory: 64 << 10,
            base_dir: golden(),
            ..Default::default()
        },
        quiet: true,
        cache: Some(row_cache()),
        tap: None,
    }
}

/// Two worker slots pulling from `mgr` in this process, until `stop` says so.
fn spawn_workers(
    mgr: &Arc<JobManager>,
    resolver: Resolver,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(pull::run(
        mgr.clone(),
        Executor::new(resolver),
        LoopOptions {
            worker_id: "w".into(),
            slots: 2,
            slot_memory: 64 << 10,
            max_idle: Duration::from_millis(20),
        },
        stop,
    ))
}

/// Waits (at most a minute) for the first status that `done` accepts.
async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<pb::JobStatus>,
    done: impl Fn(&pb::JobStatus) -> bool,
) -> pb::JobStatus {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let s = rx.borrow_and_update().clone();
            if done(&s) {
                break s;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_faults_give_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    run(&recipe(), &golden(), &clean, 2, 64 << 20, 512 << 20)
        .await
        .unwrap();
    let faulty = tmp.path().join("faulty");
    let resolver = Resolver::with_wrapper(|s| {
        FaultyStorage::wrap(
            s,
            FaultPlan {
                fail_every_nth_read: 13,
                fail_every_nth_write: 11,
                ..Default::default()
            },
        )
    });
    let s = embedded::run(&recipe(), faulty.to_str().unwrap(), &opts(8192), resolver)
        .await
        .unwrap();
    assert!(s.status.retries > 0, "no fault was injected");
    assert_eq!(file_bytes(&clean), file_bytes(&faulty));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_job_leaves_nothing_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let resolver = Resolver::with_wrapper(|s| {
        FaultyStorage::wrap(
            s,
            FaultPlan {
                break_writes_after: 60,
                ..Default::default()
            },
        )
    });
    // several output files: some are complete (renamed into place) when the job fails
    let mut o = opts(8192);
    o.submit.out_shard_size = 150_000;
    let e = embedded::run(&recipe(), out.to_str().unwrap(), &o, resolver)
        .await
        .err()
        .expect("the job must fail");
    assert!(
        e.to_string().contains("injected permanent write fault"),
        "{e}"
    );
    let left: Vec<String> = std::fs::read_dir(&out)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_worker_lease_expires_and_late_result_is_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    run(&recipe(), &golden(), &clean, 2, 64 << 20, 512 << 20)
        .await
        .unwrap();

    let mgr = JobManager::new(Resolver::new());
    let out = tmp.path().join("out");
    let so = SubmitOptions {
        task_size: 8192,
        slot_memory: 64 << 10,
        base_dir: golden(),
        ..Default::default()
    };
    let (jid, _) = mgr
        .submit(&recipe(), out.to_str().unwrap(), &so)
        .await
        .unwrap();
    // the lease TTL is the coordinator's one setting, not a job's
    mgr.set_lease_ttl(Duration::from_millis(300));
    // a worker takes a task and vanishes
    let lost = mgr.poll(&pb::PollWorkRequest {
        worker_id: "ghost".into(),
        free_slots: 1,
        slot_memory: 0,
    });
    assert_eq!(lost.leases.len(), 1);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = spawn_workers(&mgr, Resolver::new(), stop_rx);
    let mut rx = mgr.watch(&jid).unwrap();
    let st = wait_for(&mut rx, embedded::terminal).await;
    let _ = stop_tx.send(true);
    workers.await.unwrap();
    assert_eq!(st.state, pb::JobState::Succeeded as i32, "{}", st.error);
    assert!(st.retries >= 1);
    // the ghost comes back with a result for its expired lease: ignored
    let late = mgr
        .complete(&pb::CompleteTaskRequest {
            worker_id: "ghost".into(),
            lease_id: lost.leases[0].lease_id.clone(),
            result: Some(pb::TaskResult::default()),
        })
        .await;
    assert!(!late);
    assert_eq!(file_bytes(&clean), file_bytes(&out));
    let _ = Arc::clone(&mgr);
}

/// The index is written last even when one output file's completion is slow: a folder with an
/// index is always a finished checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_waits_for_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let resolver = Resolver::with_wrapper(|s| {
        FaultyStorage::wrap(
            s,
            FaultPlan {
                delay_first_finish_ms: 500,
                check_index_last: true,
                ..Default::default()
            },
        )
    });
    let mut o = opts(8192);
    o.submit.out_shard_size = 150_000; // several output files
    embedded::run(&recipe(), out.to_str().unwrap(), &o, resolver)
        .await
        .unwrap();
    assert!(out.join("model-00001-of-00006.safetensors").exists());
}

/// A cancel that arrives while the checkpoint is being committed must not leave an index whose
/// files were removed (nor report success for a cancelled job): the commit runs to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_commit_leaves_a_whole_checkpoint_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let resolver = Resolver::with_wrapper(|s| {
        FaultyStorage::wrap(
            s,
            FaultPlan {
                delay_puts_ms: 200,
                ..Default::default()
            },
        )
    });
    let mgr = JobManager::new(resolver.clone());
    let (jid, _) = mgr
        .submit(&recipe(), out.to_str().unwrap(), &opts(8192).submit)
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = spawn_workers(&mgr, resolver, stop_rx);
    let mut rx = mgr.watch(&jid).unwrap();
    let s = wait_for(&mut rx, |s| {
        s.state == pb::JobState::Committing as i32 || embedded::terminal(s)
    })
    .await;
    assert_eq!(s.state, pb::JobState::Committing as i32, "{s:?}");
    let answer = mgr.cancel(&jid).await.unwrap();
    let st = wait_for(&mut rx, embedded::terminal).await;
    let _ = stop_tx.send(true);
    workers.await.unwrap();
    let index = out.join("model.safetensors.index.json").exists();
    let data = out.join("model.safetensors").exists();
    assert_eq!(
        st.state,
        pb::JobState::Succeeded as i32,
        "a committing job finishes: {st:?}"
    );
    assert!(index && data, "index {index}, data {data}");
    assert_ne!(
        answer.state,
        pb::JobState::Cancelled as i32,
        "the cancel should have been refused: {answer:?}"
    );
}

/// A job manager with its journal in `state`, and the ids of the jobs it resumed from it.
async fn manager_on(state: &std::path::Path) -> (Arc<JobManager>, Vec<String>) {
    let resolver = Resolver::new();
    let journal = Journal::open(state.to_str().unwrap(), &resolver)
        .await
        .unwrap();
    let mgr = JobManager::with_journal(resolver, journal);
    let resumed = mgr.recover().await.unwrap();
    (mgr, resumed)
}

/// A coordinator stopped mid-job and started again on the same journal resumes the job where
/// it was: statistics passes (TIES, cut into many ranges) and writes already accepted stay
/// done, and the checkpoint is byte-identical to an uninterrupted run. A third start finds the
/// job ended and still reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_job_manager_resumes_from_its_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    run(&recipe(), &golden(), &clean, 2, 64 << 20, 512 << 20)
        .await
        .unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("resumed");
    let o = opts(8192).submit;

    let (first, resumed) = manager_on(&state).await;
    assert!(resumed.is_empty());
    let (id, _) = first
        .submit(&recipe(), out.to_str().unwrap(), &o)
        .await
        .unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let workers = spawn_workers(&first, Resolver::new(), stop_rx);
    let mut rx = first.watch(&id).unwrap();
    // stop once writes have begun: every statistics pass and some writes are done
    wait_for(&mut rx, |s| s.bytes_done > 0).await;
    stop.send(true).unwrap();
    workers.await.unwrap();
    let before = first.status(&id).unwrap();
    assert!(
        before.tasks_done < before.tasks_total && before.state == pb::JobState::Running as i32,
        "the job must be stopped midway: {before:?}"
    );
    drop(first);
    let records: Vec<String> = std::fs::read_dir(state.join(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let stats = records.iter().filter(|n| n.starts_with('s')).count();
    let writes = records.iter().filter(|n| n.starts_with('w')).count();
    assert!(stats > 0 && writes > 0, "replay both kinds: {records:?}");
    assert_eq!((stats + writes) as u64, before.tasks_done);

    let (second, resumed) = manager_on(&state).await;
    assert_eq!(resumed, vec![id.clone()]);
    let st = second.status(&id).unwrap();
    assert_eq!(st.tasks_done, before.tasks_done, "{st:?} vs {before:?}");
    assert_eq!(st.tasks_total, before.tasks_total);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let workers = spawn_workers(&second, Resolver::new(), stop_rx);
    let mut rx = second.watch(&id).unwrap();
    let st = wait_for(&mut rx, |s| {
        s.state == pb::JobState::Succeeded as i32 || s.state == pb::JobState::Failed as i32
    })
    .await;
    stop.send(true).unwrap();
    workers.await.unwrap();
    assert_eq!(st.state, pb::JobState::Succeeded as i32, "{}", st.error);
    assert_eq!(file_bytes(&clean), file_bytes(&out));
    // an ended job's task records go (in the background); its .job and .end records stay
    let records = || std::fs::read_dir(state.join(&id)).map_or(0, |d| d.count());
    let start = std::time::Instant::now();
    while records() > 0 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(records(), 0, "task records left after the job ended");

    let (third, resumed) = manager_on(&state).await;
    assert!(resumed.is_empty());
    let st = third.status(&id).expect("an ended job is remembered");
    assert_eq!(st.state, pb::JobState::Succeeded as i32);
}

/// A journaled job whose inputs changed layout while the coordinator was down fails on restart
/// with the reason, and leaves no output files behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_refuses_a_job_whose_inputs_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("in");
    for m in ["base", "instruct", "lang_eu", "lang_ca", "lang_gl"] {
        let (from, to) = (golden().join("models").join(m), base.join("models").join(m));
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let state = tmp.path().join("state");
    let out = tmp.path().join("out");
    let mut o = opts(8192).submit;
    o.base_dir = base.clone();
    let (first, _) = manager_on(&state).await;
    let (id, _) = first
        .submit(&recipe(), out.to_str().unwrap(), &o)
        .await
        .unwrap();
    drop(first);
    // pad one input's header: same tensors, every data offset moves
    let f = base.join("models/lang_gl/model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut padded = ((n + 8) as u64).to_le_bytes().to_vec();
    padded.extend_from_slice(&bytes[8..8 + n]);
    padded.extend_from_slice(b"        ");
    padded.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&f, padded).unwrap();

    let (second, resumed) = manager_on(&state).await;
    assert!(resumed.is_empty());
    let st = second.status(&id).expect("the job is still known");
    assert_eq!(st.state, pb::JobState::Failed as i32);
    assert!(
        st.error.contains("plan to a different output"),
        "{}",
        st.error
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// A job cancelled before the restart stays cancelled: the journal records its end before its
/// uploads are aborted, and a restart neither resumes nor forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_job_is_not_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out");
    let (first, _) = manager_on(&state).await;
    let (id, _) = first
        .submit(&recipe(), out.to_str().unwrap(), &opts(8192).submit)
        .await
        .unwrap();
    let st = first.cancel(&id).await.unwrap();
    assert_eq!(st.state, pb::JobState::Cancelled as i32);
    drop(first);
    let (second, resumed) = manager_on(&state).await;
    assert!(resumed.is_empty(), "{resumed:?}");
    let st = second.status(&id).expect("remembered");
    assert_eq!(st.state, pb::JobState::Cancelled as i32);
    assert!(second.list().iter().any(|s| s.job_id == id));
    // and its id is not handed out again
    let (again, _) = second
        .submit(&recipe(), out.to_str().unwrap(), &opts(8192).submit)
        .await
        .unwrap();
    assert_ne!(again, id);
}
