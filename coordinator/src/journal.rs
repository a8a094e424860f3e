//! The coordinator's journal (`--state URI`): what a restarted coordinator needs to resume its
//! jobs, as small records in a folder of any store (a local folder or an S3 prefix). The
//! records are the `Journal*` messages of `merge.proto`; this module only stores and lists
//! them. What they mean for a job is the job manager's business.

use bytes::Bytes;
use prost::Message;
use shardmerge_proto as pb;
use shardmerge_worker::storage::{Location, Resolver};

use crate::error::{Error, Result};

/// Written when a journal is opened: proves the folder is writable before any job depends on
/// it, and marks what the folder is.
const MARKER: &str = "shardmerge-journal";

/// A journal folder.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: Location,
}

/// A job the journal says was started and not ended.
#[derive(Debug)]
pub struct Unfinished {
    pub job: pb::JournalJob,
    /// The task results the coordinator accepted, by task key (see `JobManager`).
    pub tasks: Vec<(String, pb::TaskResult)>,
    /// Output files whose upload was completed.
    pub files_finished: Vec<usize>,
}

/// Everything in a journal.
#[derive(Debug, Default)]
pub struct Contents {
    pub unfinished: Vec<Unfinished>,
    /// The last status of each job that ended.
    pub ended: Vec<pb::JobStatus>,
}

impl Journal {
    /// Opens (creating if need be) the journal folder `uri`; relative paths resolve against
    /// the working directory.
    pub async fn open(uri: &str, resolver: &Resolver) -> Result<Journal> {
        let dir = resolver.resolve(uri, &crate::embedded::cwd())?;
        let j = Journal { dir };
        let marker = j.dir.join(MARKER);
        marker
            .store
            .put(
                &marker.path,
                Bytes::from_static(b"shardmerge coordinator journal v1\n"),
            )
            .await
            .map_err(|e| {
                Error::Other(format!(
                    "--state {uri}: cannot write the journal there ({e}); pick a folder or \
                     bucket prefix the coordinator may write, or `--state memory`"
                ))
            })?;
        Ok(j)
    }

    pub fn uri(&self) -> String {
        self.dir.uri()
    }

    async fn put(&self, loc: Location, data: Vec<u8>) -> Result<()> {
        loc.store.put(&loc.path, Bytes::from(data)).await?;
        Ok(())
    }

    async fn get<M: Message + Default>(&self, loc: &Location) -> Result<M> {
        let b = loc.store.read_all(&loc.path).await?;
        M::decode(b).map_err(|e| {
            Error::Other(format!(
                "journal record {} is corrupt ({e}); move it away to start without it",
                loc.uri()
            ))
        })
    }

    pub async fn job_started(&self, rec: &pb::JournalJob) -> Result<()> {
        let loc = self.dir.join(&format!("{}.job", rec.job_id));
        self.put(loc, rec.encode_to_vec()).await
    }

    /// Records a task result the coordinator is about to act on; `key` names the task.
    pub async fn task_done(&self, job: &str, key: &str, r: &pb::TaskResult) -> Result<()> {
        let loc = self.dir.join(job).join(key);
        self.put(loc, r.encode_to_vec()).await
    }

    pub async fn file_finished(&self, job: &str, file: usize) -> Result<()> {
        let loc = self.dir.join(job).join(&format!("f{file}"));
        self.put(loc, Vec::new()).await
    }

    pub async fn job_ended(&self, status: &pb::JobStatus) -> Result<()> {
        let loc = self.dir.join(&format!("{}.end", status.job_id));
        let rec = pb::JournalEnd {
            status: Some(status.clone()),
        };
        self.put(loc, rec.encode_to_vec()).await
    }

    /// Removes the task and file records of a job that has ended (its `.end` record says all a
    /// restart needs); returns how many there were.
    pub async fn forget_tasks(&self, job: &str) -> Result<usize> {
        let folder = self.dir.join(job);
        let records = match folder.store.list(&folder.path).await {
            Ok(r) => r,
            Err(e) if e.not_found => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for r in &records {
            let loc = folder.join(r);
            loc.store.delete(&loc.path).await?;
        }
        Ok(records.len())
    }

    /// Reads the whole journal.
    pub async fn load(&self) -> Result<Contents> {
        let names = self.dir.store.list(&self.dir.path).await?;
        let mut out = Contents::default();
        let ended: std::collections::HashSet<&str> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".end"))
            .collect();
        for n in &names {
            if let Some(id) = n.strip_suffix(".end") {
                let rec: pb::JournalEnd = self.get(&self.dir.join(n)).await?;
                let mut st = rec.status.unwrap_or_default();
                st.job_id = id.to_string();
                out.ended.push(st);
                continue;
            }
            let Some(id) = n.strip_suffix(".job") else {
                continue;
            };
            if ended.contains(id) {
                continue;
            }
            let job: pb::JournalJob = self.get(&self.dir.join(n)).await?;
            let folder = self.dir.join(id);
            // a job with no task done yet has no folder
            let records = match folder.store.list(&folder.path).await {
                Ok(r) => r,
                Err(e) if e.not_found => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let mut tasks = Vec::new();
            let mut files_finished = Vec::new();
            for r in records {
                if let Some(f) = r.strip_prefix('f').and_then(|f| f.parse().ok()) {
                    files_finished.push(f);
                } else {
                    let result: pb::TaskResult = self.get(&folder.join(&r)).await?;
                    tasks.push((r, result));
                }
            }
            out.unfinished.push(Unfinished {
                job,
                tasks,
                files_finished,
            });
        }
        Ok(out)
    }
}
