//! The coordinator's journal (`--state URI`): what a restarted coordinator needs to resume its
//! jobs, as small records in a folder of any store (a local folder or an S3 prefix). The
//! records are the `Journal*` messages of `merge.proto`; this module stores and lists them,
//! names tasks (`task_key`) and fingerprints a plan (`layout_crc`). What the records mean for a
//! job is the job state's business (`job::state::JobState::replay`).
//!
//! The job manager talks to a `JobJournal`: `Journal` (a folder) or `NoJournal`
//! (`--state memory`, the embedded runner), so the job code has no "is there a journal" branches.

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message;
use shardmerge_proto as pb;
use shardmerge_worker::storage::{Location, Resolver};

use crate::cut::Cut;
use crate::error::{Error, Result};
use crate::plan::Plan;

/// A task of a job: a write task (by index in the cut), one range of a statistics unit, or
/// the audit of a write task (`job/state/audit.rs`: computed again by another worker, written
/// nowhere, never journaled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Item {
    Write(usize),
    Stats { unit: usize, range: usize },
    Audit(usize),
}

/// The journal's name of a task: `w<task>`, or `s<unit>.<pass>.<range>` for a statistics task
/// (a unit's ranges run once per pass).
pub(crate) fn task_key(it: Item, pass: u32) -> String {
    match it {
        Item::Write(i) => format!("w{i}"),
        Item::Stats { unit, range } => format!("s{unit}.{pass}.{range}"),
        // (not journaled: a restarted coordinator does not resume audits)
        Item::Audit(i) => format!("a{i}"),
    }
}

/// The task (and pass) a journal key names; None for a key this version does not write.
pub(crate) fn parse_task_key(k: &str) -> Option<(Item, u32)> {
    if let Some(i) = k.strip_prefix('w') {
        return Some((Item::Write(i.parse().ok()?), 0));
    }
    let mut it = k.strip_prefix('s')?.split('.');
    let (unit, pass, range) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    Some((
        Item::Stats {
            unit: unit.parse().ok()?,
            range: range.parse().ok()?,
        },
        pass.parse().ok()?,
    ))
}

/// CRC-32 of a job's plan: each tensor's method and shape, where each input tensor lies (file,
/// offset, dtype, shape), the output files' headers and every task's place. A job is resumed
/// only when its inputs still plan to exactly this. (An input replaced by another checkpoint
/// of the very same layout is not noticed.)
pub(crate) fn layout_crc(plan: &Plan, cut: &Cut) -> u32 {
    let mut h = crc32fast::Hasher::new();
    fn num(h: &mut crc32fast::Hasher, v: u64) {
        h.update(&v.to_le_bytes());
    }
    for t in &plan.tensors {
        h.update(t.name.as_bytes());
        h.update(t.method_name().as_bytes());
        t.shape.iter().for_each(|&d| num(&mut h, d));
        for src in &t.inputs {
            h.update(src.uri.as_bytes());
            num(&mut h, src.data_offset);
            num(&mut h, src.dtype.to_proto() as u64);
            src.shape.iter().for_each(|&d| num(&mut h, d));
        }
    }
    for f in &plan.files {
        h.update(f.name.as_bytes());
        h.update(&(f.layout.header.len() as u64).to_le_bytes());
        h.update(&f.layout.header);
    }
    for t in &cut.tasks {
        for v in [t.file as u64, t.offset, t.length, t.segments.len() as u64] {
            h.update(&v.to_le_bytes());
        }
    }
    for u in &cut.units {
        h.update(&(u.tensor as u64).to_le_bytes());
        h.update(&(u.ranges.len() as u64).to_le_bytes());
    }
    h.finalize()
}

/// Where the job manager records what a restart needs. Each call returns once the fact is
/// durable (or fails, and the caller acts as if it had not happened).
#[async_trait]
pub(crate) trait JobJournal: Send + Sync {
    /// Where the records go, for messages.
    fn uri(&self) -> String;
    async fn job_started(&self, rec: &pb::JournalJob) -> Result<()>;
    /// Records a task result the coordinator is about to act on; `key` names the task.
    async fn task_done(&self, job: &str, key: &str, r: &pb::TaskResult) -> Result<()>;
    async fn file_finished(&self, job: &str, file: usize) -> Result<()>;
    async fn job_ended(&self, status: &pb::JobStatus) -> Result<()>;
    /// Removes the task and file records of a job that has ended; returns how many there were.
    async fn forget_tasks(&self, job: &str) -> Result<usize>;
    /// Everything recorded.
    async fn load(&self) -> Result<Contents>;
}

/// No journal (`--state memory`): records nothing and finds nothing to resume.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NoJournal;

#[async_trait]
impl JobJournal for NoJournal {
    fn uri(&self) -> String {
        "memory".into()
    }
    async fn job_started(&self, _: &pb::JournalJob) -> Result<()> {
        Ok(())
    }
    async fn task_done(&self, _: &str, _: &str, _: &pb::TaskResult) -> Result<()> {
        Ok(())
    }
    async fn file_finished(&self, _: &str, _: usize) -> Result<()> {
        Ok(())
    }
    async fn job_ended(&self, _: &pb::JobStatus) -> Result<()> {
        Ok(())
    }
    async fn forget_tasks(&self, _: &str) -> Result<usize> {
        Ok(0)
    }
    async fn load(&self) -> Result<Contents> {
        Ok(Contents::default())
    }
}

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
pub(crate) struct Unfinished {
    pub job: pb::JournalJob,
    /// The task results the coordinator accepted, by task key (see `JobManager`).
    pub tasks: Vec<(String, pb::TaskResult)>,
    /// Output files whose upload was completed.
    pub files_finished: Vec<usize>,
}

/// Everything in a journal.
#[derive(Debug, Default)]
pub(crate) struct Contents {
    pub unfinished: Vec<Unfinished>,
    /// The last status of each job that ended.
    pub ended: Vec<pb::JobStatus>,
}

impl Journal {
    /// Opens (creating if need be) the journal folder `uri`; relative paths resolve against
    /// the working directory.
    pub async fn open(uri: &str, resolver: &Resolver) -> Result<Journal> {
        let dir = resolver.resolve(uri, &crate::paths::cwd())?;
        let j = Journal { dir };
        let marker = j.dir.join(MARKER);
        marker
            .store
            .put(
                &marker.path,
                Bytes::from_static(b"shardmerge coordinator journal v1\n"),
            )
            .await
            .map_err(|e| Error::Journal {
                uri: uri.to_string(),
                reason: format!(
                    "--state {uri}: cannot write the journal there ({e}); pick a folder or \
                         bucket prefix the coordinator may write, or `--state memory`"
                ),
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
        M::decode(b).map_err(|e| Error::Journal {
            uri: loc.uri(),
            reason: format!(
                "journal record {} is corrupt ({e}); move it away to start without it",
                loc.uri()
            ),
        })
    }
}

#[async_trait]
impl JobJournal for Journal {
    fn uri(&self) -> String {
        Journal::uri(self)
    }

    async fn job_started(&self, rec: &pb::JournalJob) -> Result<()> {
        let loc = self.dir.join(&format!("{}.job", rec.job_id));
        self.put(loc, rec.encode_to_vec()).await
    }

    async fn task_done(&self, job: &str, key: &str, r: &pb::TaskResult) -> Result<()> {
        let loc = self.dir.join(job).join(key);
        self.put(loc, r.encode_to_vec()).await
    }

    async fn file_finished(&self, job: &str, file: usize) -> Result<()> {
        let loc = self.dir.join(job).join(&format!("f{file}"));
        self.put(loc, Vec::new()).await
    }

    async fn job_ended(&self, status: &pb::JobStatus) -> Result<()> {
        let loc = self.dir.join(&format!("{}.end", status.job_id));
        let rec = pb::JournalEnd {
            status: Some(status.clone()),
        };
        self.put(loc, rec.encode_to_vec()).await
    }

    /// (its `.end` record says all a restart needs)
    async fn forget_tasks(&self, job: &str) -> Result<usize> {
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

    async fn load(&self) -> Result<Contents> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_keys_round_trip() {
        for (it, pass) in [
            (Item::Write(0), 0),
            (Item::Write(17_493), 0),
            (Item::Stats { unit: 3, range: 9 }, 2),
        ] {
            assert_eq!(parse_task_key(&task_key(it, pass)), Some((it, pass)));
        }
        for bad in ["", "w", "wx", "s1.2", "s1.2.3.4", "f0", "x1"] {
            assert_eq!(parse_task_key(bad), None, "{bad}");
        }
    }
}
