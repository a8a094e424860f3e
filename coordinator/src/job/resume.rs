//! Resuming after a coordinator restart: the journal's unfinished jobs are rebuilt from their
//! records and their recorded task results replayed.

use shardmerge_proto as pb;
use shardmerge_worker::storage::Upload;

use super::finish::remove_outputs;
use super::{lock, state, Job, JobManager, JobState, SubmitOptions};
use crate::claim::Claim;
use crate::error::{Error, Result};
use crate::journal::{layout_crc, Unfinished};

/// The output uploads a job record names.
fn uploads_of(rec: &pb::JournalJob) -> Vec<Upload> {
    rec.uploads
        .iter()
        .map(|x| Upload {
            path: x.path.clone(),
            id: x.id.clone(),
        })
        .collect()
}

impl JobManager {
    /// Resumes the journal's unfinished jobs and remembers its ended ones; returns the ids
    /// resumed. A job that cannot resume (its inputs are gone or changed) fails, with the
    /// reason in its status.
    pub async fn recover(&self) -> Result<Vec<String>> {
        let contents = self.journal.load().await?;
        {
            let mut h = lock(&self.history);
            for st in contents.ended {
                h.insert(st.job_id.clone(), st);
            }
        }
        let mut resumed = Vec::new();
        // the points of grids, by their first point: linked again once all are back
        let mut grids: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for u in contents.unfinished {
            let id = u.job.job_id.clone();
            if !u.job.grid_leader.is_empty() {
                grids
                    .entry(u.job.grid_leader.clone())
                    .or_default()
                    .push(id.clone());
            }
            let out = u.job.output_uri.clone();
            let uploads = uploads_of(&u.job);
            let replace = u.job.options.as_ref().is_some_and(|o| o.overwrite);
            let token = u.job.claim.clone();
            match self.resume(u).await {
                Ok(()) => resumed.push(id),
                Err(e) => {
                    // the output is another job's now: its files at final paths stay
                    let taken = matches!(e, Error::AlreadyExists { .. });
                    let msg = format!("cannot resume after a coordinator restart: {e}");
                    tracing::error!(job = %id, "{msg}");
                    let status = pb::JobStatus {
                        job_id: id.clone(),
                        state: pb::JobState::Failed as i32,
                        output_uri: out.clone(),
                        error: msg,
                        ..Default::default()
                    };
                    self.journal_end(&status).await;
                    lock(&self.history).insert(id.clone(), status);
                    if let Ok(loc) = self.resolver.resolve(&out, std::path::Path::new("/")) {
                        remove_outputs(&loc.store, &uploads, replace || taken).await;
                        // its claim, if it is still this job's, is given up
                        if let Ok(c) = Claim::take(&loc, &id, false, Some(&token)).await {
                            c.release().await;
                        }
                    }
                }
            }
        }
        for (leader, points) in grids {
            let linked = self.link(&leader, &points);
            tracing::info!(
                job = %leader,
                "grid resumed: {linked} of {} other point(s) ride on an earlier point with the same cut",
                points.len()
            );
        }
        Ok(resumed)
    }

    /// Rebuilds one job from its record, replays the task results it holds, and finishes what
    /// they complete.
    async fn resume(&self, u: Unfinished) -> Result<()> {
        let o = SubmitOptions::from_proto(&u.job.options.clone().unwrap_or_default());
        // (each point of a grid of methods plans them again: a restart is rare)
        let like = super::prepare::CutLike::new(u.job.cut_like.clone());
        let (plan, cut, out) = self
            .prepare(&u.job.recipe_yaml, &u.job.output_uri, &o, &like)
            .await?;
        if layout_crc(&plan, &cut) != u.job.layout_crc || u.job.uploads.len() != plan.files.len() {
            return Err(Error::InputChanged {
                job: u.job.job_id.clone(),
                reason: "its inputs now plan to a different output than when it started \
                         (changed or replaced?); submit it again"
                    .into(),
            });
        }
        let uploads = uploads_of(&u.job);
        let id = u.job.job_id.clone();
        let mut state = JobState::new(id.clone(), plan, cut, out.uri(), state::kernel_reduce);
        // audits are not journaled: a sampled write result of a file not yet completed is not
        // believed after a restart, its task runs again (and is audited)
        let rules = self.limits().audit;
        let records = state.believable(u.tasks, rules, &u.files_finished);
        let complete = state.replay(records)?;
        state.set_audits(rules);
        tracing::info!(
            job = %id,
            "resumed from the journal: {} of {} tasks done",
            state.status.tasks_done,
            state.status.tasks_total
        );
        // its own claim back (refused if the claim lapsed and another job took the output)
        let claim = Claim::take(&out, &id, o.overwrite, Some(&u.job.claim)).await?;
        let mut job = Job::new(state, out, uploads, o.overwrite);
        job.claim = Some(std::sync::Arc::new(claim));
        // a later point of a grid waits for `recover` to link it to the first point
        job.held = !u.job.grid_leader.is_empty();
        lock(&self.jobs).insert(id.clone(), job);
        for f in complete {
            if u.files_finished.contains(&f) {
                self.file_done(&id).await;
            } else {
                self.finish_file_as(&id, f, true).await;
            }
        }
        Ok(())
    }
}
