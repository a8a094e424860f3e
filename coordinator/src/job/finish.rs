//! Ending jobs and completing their output: checking and completing each output file, the
//! commit of the checkpoint once every file is complete, and removing the outputs of a job that
//! ends without succeeding.

use std::sync::Arc;

use shardmerge_proto as pb;
use shardmerge_worker::storage::{Storage, Upload};

use super::{lock, JobManager};
use crate::commit;

/// Aborts a job's uploads in flight and removes its files already completed: a job that ends
/// without succeeding leaves nothing that looks like part of a finished checkpoint. `replace`
/// (an `--overwrite` job): its files complete only at the commit, and a file at a final path
/// belongs to the checkpoint it replaces: those stay.
pub(super) async fn remove_outputs(store: &Arc<dyn Storage>, uploads: &[Upload], replace: bool) {
    for u in uploads {
        if let Err(e) = store.abort_upload(u).await {
            tracing::warn!("aborting {}: {e}", u.path);
        }
        if replace {
            continue;
        }
        if let Err(e) = store.delete(&u.path).await {
            tracing::warn!("removing {}: {e}", u.path);
        }
    }
}

impl JobManager {
    pub(super) async fn end_job(&self, jid: &str, state: pb::JobState, msg: &str) {
        let (store, uploads, replace, status, claim) = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(jid) else { return };
            if !j.state.end(state, msg) {
                return;
            }
            lock(&self.leases).forget_job(jid);
            j.publish();
            (
                j.out.store.clone(),
                j.uploads.clone(),
                j.replace,
                j.state.status.clone(),
                j.claim.clone(),
            )
        };
        // Recorded before the cleanup: a restart must not resume a job that was ending.
        self.journal_end(&status).await;
        // A job that lost its claim leaves what is at final paths alone: it is another job's.
        let lost = match &claim {
            Some(c) => c.confirm().await.is_err(),
            None => false,
        };
        remove_outputs(&store, &uploads, replace || lost).await;
        if let Some(c) = claim {
            c.release().await;
        }
    }

    /// The job's claim on its output still holds (checked before a file becomes visible).
    async fn claim_holds(&self, jid: &str) -> std::result::Result<(), String> {
        let claim = lock(&self.jobs).get(jid).and_then(|j| j.claim.clone());
        match claim {
            Some(c) => c.confirm().await.map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    pub(super) async fn journal_end(&self, status: &pb::JobStatus) {
        if let Err(e) = self.journal.job_ended(status).await {
            tracing::warn!(job = %status.job_id, "journal: {e}");
            return;
        }
        // Its task records are no longer needed: removed in the background (one delete per
        // task; whoever reported the last task need not wait for them).
        let (journal, id) = (self.journal.clone(), status.job_id.clone());
        tokio::spawn(async move {
            match journal.forget_tasks(&id).await {
                Ok(n) => tracing::debug!(job = %id, "journal: removed {n} task records"),
                Err(e) => tracing::warn!(job = %id, "journal: removing task records: {e}"),
            }
        });
    }

    pub(super) async fn finish_file(&self, jid: &str, fi: usize) {
        self.finish_file_as(jid, fi, false).await
    }

    /// Completes output file `fi`. `resumed`: the previous coordinator may have completed it
    /// already without recording so; a file at its final path with its full size counts.
    pub(super) async fn finish_file_as(&self, jid: &str, fi: usize, resumed: bool) {
        let (store, upload, receipts, size, replace) = {
            let jobs = lock(&self.jobs);
            let Some(j) = jobs.get(jid) else { return };
            let size = j.state.plan.files[fi].layout.total_size;
            let receipts = j.state.receipts_of(fi);
            (
                j.out.store.clone(),
                j.uploads[fi].clone(),
                receipts,
                size,
                j.replace,
            )
        };
        // What storage holds must match the plan before the file is completed (local: the
        // written length; backends that can list parts: each part's size). An --overwrite job
        // completes its files at the commit, so the old checkpoint stays whole until then.
        if !replace {
            if let Err(e) = self.claim_holds(jid).await {
                self.fail_job(jid, &e).await;
                return;
            }
        }
        let outcome = match store.check_upload(&upload, &receipts, size).await {
            Err(e) => Err((true, e)),
            Ok(()) if replace => Ok(()),
            Ok(()) => store
                .finish_upload(&upload, &receipts)
                .await
                .map_err(|e| (false, e)),
        };
        if let Err((in_check, e)) = outcome {
            // A resumed job: the previous coordinator may have completed the file already
            // without recording so; the file at its final path with its full size counts.
            let already = resumed && store.size(&upload.path).await.is_ok_and(|n| n == size);
            if !already {
                // (a retryable check failure: a part storage does not hold as reported,
                // e.g. a worker that completed its task without writing: its tasks run again)
                if in_check && !e.retryable {
                    let msg = format!("checking {} before completing it: {e}", upload.path);
                    self.fail_job(jid, &msg).await;
                } else {
                    self.redo_file(jid, fi, &upload.path, &e.to_string()).await;
                }
                return;
            }
        }
        // Read back: the completed file has exactly the planned size (an --overwrite job's
        // file is completed, and checked by size and CRC-32C, at the commit).
        match store.size(&upload.path).await {
            _ if replace => {}
            Ok(n) if n == size => {}
            Ok(n) => {
                let msg = format!(
                    "{}: completed with {n} bytes where the plan has {size}; a part was not \
                     what its worker reported",
                    upload.path
                );
                self.fail_job(jid, &msg).await;
                return;
            }
            Err(e) => {
                self.fail_job(jid, &format!("{} after completing it: {e}", upload.path))
                    .await;
                return;
            }
        }
        if let Err(e) = self.journal.file_finished(jid, fi).await {
            tracing::warn!(job = %jid, "journal: {e}");
        }
        self.file_done(jid).await;
    }

    /// An output file could not be completed from its parts (one missing, or not what its
    /// receipt said): its write tasks run again, within their attempts.
    async fn redo_file(&self, jid: &str, fi: usize, path: &str, why: &str) {
        let reopened = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(jid) else { return };
            let r = j.state.reopen_file(fi);
            j.publish();
            r
        };
        match reopened {
            Ok(()) => tracing::warn!(
                job = %jid,
                "completing {path}: {why}; storage does not hold the parts its workers reported: \
                 its tasks run again"
            ),
            Err(msg) => {
                self.fail_job(jid, &format!("completing {path}: {why}; {msg}"))
                    .await
            }
        }
    }

    /// Counts a completed output file; the last one commits the checkpoint (whoever completes
    /// it, so the index is written after every file exists).
    pub(super) async fn file_done(&self, jid: &str) {
        let commit_now = {
            let mut jobs = lock(&self.jobs);
            let Some(j) = jobs.get_mut(jid) else { return };
            let last = j.state.file_finished();
            if last {
                j.publish();
            }
            last
        };
        if commit_now {
            self.commit(jid).await;
        }
    }

    async fn commit(&self, jid: &str) {
        let (plan, out, files, replace) = {
            let jobs = lock(&self.jobs);
            let Some(j) = jobs.get(jid) else { return };
            let files: Vec<(Upload, Vec<shardmerge_worker::storage::Receipt>)> = j
                .uploads
                .iter()
                .enumerate()
                .map(|(fi, u)| (u.clone(), j.state.receipts_of(fi)))
                .collect();
            (j.state.plan.clone(), j.out.clone(), files, j.replace)
        };
        if let Err(e) = self.claim_holds(jid).await {
            self.fail_job(jid, &format!("commit: {e}")).await;
            return;
        }
        match commit::commit_checkpoint(&plan, &out, &files, replace).await {
            Ok(()) => {
                let (status, claim) = {
                    let mut jobs = lock(&self.jobs);
                    let Some(j) = jobs.get_mut(jid) else { return };
                    j.state.succeed();
                    j.publish();
                    (j.state.status.clone(), j.claim.clone())
                };
                self.journal_end(&status).await;
                if let Some(c) = claim {
                    c.release().await;
                }
            }
            Err(e) => self.fail_job(jid, &format!("commit: {e}")).await,
        }
    }
}
