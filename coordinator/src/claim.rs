//! One owner per output: a job claims its output folder before it writes anything there, and
//! holds the claim until its commit or its end. A second job aimed at a claimed output is
//! refused at submit, with the owner named.
//!
//! - **Local output**: the lock file `OUT/.shardmerge-claim`, opened (created if missing) and
//!   locked with an exclusive `flock` held by the process that runs the job. The kernel drops
//!   the lock when that process dies, so a crashed `run` or coordinator never leaves a claim
//!   behind; the file names the job for the refusal message, and is removed at release.
//! - **S3 output**: a claim object `OUT/.shardmerge-claim.NONCE` (a fresh random nonce per job)
//!   naming the job, its coordinator and an expiry, refreshed every quarter of its time to live
//!   (`SHARDMERGE_CLAIM_TTL`, seconds, default 120). After writing its own claim, a job lists
//!   the folder's claims: another claim still in force means the output is taken (its own is
//!   removed again and the job refused); a lapsed one (a coordinator that stopped refreshing it
//!   for a whole time to live) is removed when the job asks to `--overwrite`, and refused
//!   otherwise. Why not a create-only conditional put of one claim key (`If-None-Match: *`,
//!   object_store's `PutMode::Create`): Garage (2.5) ignores that header on `PutObject` and
//!   overwrites, so two jobs would both "win". The write-then-list protocol needs only
//!   read-after-write consistent listing (AWS S3, MinIO, Garage): of two jobs that claim at
//!   once, the later writer always sees the earlier one's claim, so at most one proceeds (both
//!   may back off; the message says to submit again).
//!
//! A coordinator resuming from its journal takes its own claim back (S3: the same nonce, kept
//! in the journal; local: the lock file, free since the old process died). A job whose claim
//! is gone (taken over after it lapsed) stops before it completes a file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::json;
use shardmerge_worker::storage::{Location, Storage};

use crate::error::{Error, Result};

/// The name of a claim (the local lock file, or the prefix of an S3 claim object).
pub(crate) const CLAIM: &str = ".shardmerge-claim";

/// Whether a file name in an output folder is a claim (not part of any checkpoint).
pub(crate) fn is_claim(name: &str) -> bool {
    name == CLAIM || name.starts_with(".shardmerge-claim.")
}

/// How long an S3 claim stays in force without a refresh.
pub(crate) fn claim_ttl() -> Duration {
    let secs = std::env::var("SHARDMERGE_CLAIM_TTL")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.2)
        .unwrap_or(120.0);
    Duration::from_secs_f64(secs)
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Who runs this process, for the claim's text: `host HOST pid PID`.
fn this_process() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "?".into());
    format!("host {host} pid {}", std::process::id())
}

/// What a claim says about its owner.
#[derive(Debug, Clone)]
pub(crate) struct Owner {
    pub job: String,
    pub process: String,
    /// Unix seconds after which it no longer holds (S3 claims; 0 for local ones).
    pub expires: f64,
    /// When it was first written (S3 claims: who gives way when two claim at once).
    pub created: f64,
    pub nonce: String,
}

impl Owner {
    fn parse(text: &[u8]) -> Option<Owner> {
        let v: serde_json::Value = serde_json::from_slice(text).ok()?;
        Some(Owner {
            job: v.get("job")?.as_str()?.to_string(),
            process: v.get("process")?.as_str().unwrap_or("?").to_string(),
            expires: v
                .get("expires_unix")
                .and_then(|e| e.as_f64())
                .unwrap_or(0.0),
            created: v
                .get("created_unix")
                .and_then(|e| e.as_f64())
                .unwrap_or(0.0),
            nonce: v
                .get("nonce")
                .and_then(|e| e.as_str())
                .unwrap_or("")
                .to_string(),
        })
    }

    fn to_json(&self, out: &str) -> Bytes {
        Bytes::from(
            json!({
                "job": self.job,
                "process": self.process,
                "expires_unix": self.expires,
                "created_unix": self.created,
                "nonce": self.nonce,
                "output": out,
                "note": "shardmerge's claim on this output folder: one job writes it at a time",
            })
            .to_string(),
        )
    }

    fn describe(&self) -> String {
        format!("job {} ({})", self.job, self.process)
    }
}

/// A held claim. Released with `release`; dropped without it, a local claim's lock goes with
/// the file handle and an S3 claim stops being refreshed (it lapses after its time to live).
pub struct Claim {
    job: String,
    inner: Inner,
}

enum Inner {
    Local {
        path: PathBuf,
        file: Mutex<Option<std::fs::File>>,
    },
    Object(Arc<ObjectClaim>, tokio::task::JoinHandle<()>),
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Claim({}, {})", self.job, self.token())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Inner::Object(_, refresher) = &self.inner {
            refresher.abort();
        }
    }
}

/// Refused: the output is `owner`'s.
fn taken(out: &Location, owner: &Owner) -> Error {
    Error::AlreadyExists {
        path: out.uri(),
        reason: format!(
            "{} is claimed by {}, which is writing it: one job writes an output at a time. Wait \
             for that job to end (`shardmerge status {}`), cancel it (`shardmerge cancel {}`), or \
             pick another output",
            out.uri(),
            owner.describe(),
            owner.job,
            owner.job
        ),
    }
}

impl Claim {
    /// Claims `out` for job `job`. `overwrite`: a lapsed S3 claim may be taken over. `resume`:
    /// the claim's token from the journal (a restarted coordinator taking its own claim back).
    pub async fn take(
        out: &Location,
        job: &str,
        overwrite: bool,
        resume: Option<&str>,
    ) -> Result<Claim> {
        if out.store.is_local() {
            return local::take(out, job, resume.is_some());
        }
        let oc = ObjectClaim::take(out, job, overwrite, resume).await?;
        let oc = Arc::new(oc);
        let refresher = tokio::spawn(refresh_loop(oc.clone()));
        Ok(Claim {
            job: job.to_string(),
            inner: Inner::Object(oc, refresher),
        })
    }

    /// What the journal keeps to take this claim back after a restart (S3: the nonce; local:
    /// empty).
    pub fn token(&self) -> String {
        match &self.inner {
            Inner::Local { .. } => String::new(),
            Inner::Object(oc, _) => oc.nonce.clone(),
        }
    }

    /// Checks the claim still holds before the job makes a file visible. `Err` says why not.
    pub async fn confirm(&self) -> Result<()> {
        match &self.inner {
            Inner::Local { .. } => Ok(()),
            Inner::Object(oc, _) => oc.confirm().await,
        }
    }

    /// Gives the output up (at the commit, or when the job ends otherwise).
    pub async fn release(&self) {
        match &self.inner {
            Inner::Local { path, file } => {
                let held = file.lock().unwrap_or_else(|p| p.into_inner()).take();
                if held.is_some() {
                    // removed while still locked, so no other process locks the old file
                    if let Err(e) = std::fs::remove_file(path) {
                        tracing::warn!("releasing the claim {}: {e}", path.display());
                    }
                }
                drop(held);
            }
            Inner::Object(oc, refresher) => {
                refresher.abort();
                oc.lost.store(true, Ordering::SeqCst);
                let key = oc.key();
                if let Err(e) = key.store.delete(&key.path).await {
                    tracing::warn!("releasing the claim {}: {e}", key.uri());
                }
            }
        }
    }
}

/// An S3 claim object and its refresh state.
struct ObjectClaim {
    out: Location,
    job: String,
    nonce: String,
    ttl: Duration,
    created: f64,
    /// Set when the claim is found gone or lapsed (a job then stops before completing files).
    lost: AtomicBool,
}

impl ObjectClaim {
    fn key(&self) -> Location {
        self.out.join(&format!("{CLAIM}.{}", self.nonce))
    }

    fn owner(&self) -> Owner {
        Owner {
            job: self.job.clone(),
            process: this_process(),
            expires: now_unix() + self.ttl.as_secs_f64(),
            created: self.created,
            nonce: self.nonce.clone(),
        }
    }

    async fn write(&self) -> Result<()> {
        let key = self.key();
        let body = self.owner().to_json(&self.out.uri());
        key.store.put(&key.path, body).await?;
        Ok(())
    }

    async fn read(store: &Arc<dyn Storage>, path: &str) -> Result<Option<Owner>> {
        match store.read_all(path).await {
            Ok(b) => Ok(Some(Owner::parse(&b).unwrap_or(Owner {
                job: "?".into(),
                process: format!("unreadable claim {path}"),
                expires: 0.0,
                created: 0.0,
                nonce: String::new(),
            }))),
            Err(e) if e.not_found => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn take(
        out: &Location,
        job: &str,
        overwrite: bool,
        resume: Option<&str>,
    ) -> Result<ObjectClaim> {
        // (a journal written before claims existed has no token: claimed afresh)
        let resume = resume.filter(|n| !n.is_empty());
        let nonce = match resume {
            Some(n) => n.to_string(),
            None => crate::random::hex128("output claims"),
        };
        let oc = ObjectClaim {
            out: out.clone(),
            job: job.to_string(),
            nonce,
            ttl: claim_ttl(),
            created: now_unix(),
            lost: AtomicBool::new(false),
        };
        if resume.is_some() {
            let key = oc.key();
            match Self::read(&key.store, &key.path).await? {
                Some(o) if o.job == job => {}
                _ => {
                    return Err(Error::AlreadyExists {
                        path: out.uri(),
                        reason: format!(
                            "{}: this job's claim on its output is gone (it lapsed while the \
                             coordinator was down, and another job may have taken the output \
                             over)",
                            out.uri()
                        ),
                    });
                }
            }
        }
        oc.write().await?;
        if let Err(e) = oc.others(overwrite).await {
            let key = oc.key();
            let _ = key.store.delete(&key.path).await;
            return Err(e);
        }
        Ok(oc)
    }

    /// Checks the folder's other claims once ours is written. A lapsed one is removed with
    /// `overwrite`, refused without. The job owns the output when a listing made after its own
    /// claim was written shows no other claim in force: of two claimants, the one written
    /// second always sees the first. Who gives way when both see each other: the younger claim
    /// (by creation time, then nonce) withdraws at once; the older waits a little for it to go.
    async fn others(&self, overwrite: bool) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let live = self.live_others(overwrite).await?;
            // (named in a refusal: the oldest claim, the one the others give way to)
            let oldest = live.iter().min_by(|a, b| {
                (a.created, &a.nonce)
                    .partial_cmp(&(b.created, &b.nonce))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let Some(first) = oldest else {
                return Ok(());
            };
            let older = live
                .iter()
                .any(|o| (o.created, &o.nonce) < (self.created, &self.nonce));
            if older || std::time::Instant::now() >= deadline {
                return Err(taken(&self.out, first));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The other claims in force (lapsed ones removed with `overwrite`, refused without).
    async fn live_others(&self, overwrite: bool) -> Result<Vec<Owner>> {
        let names = match self.out.store.list(&self.out.path).await {
            Ok(n) => n,
            Err(e) if e.not_found => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mine = format!("{CLAIM}.{}", self.nonce);
        let mut live = Vec::new();
        // (claim objects are named by a hex nonce; anything else, e.g. a local store's
        // temporary file of a put in flight, is not one)
        let object = |n: &str| {
            n.strip_prefix(".shardmerge-claim.")
                .is_some_and(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        for name in names.iter().filter(|n| object(n) && **n != mine) {
            let l = self.out.join(name);
            let Some(owner) = Self::read(&l.store, &l.path).await? else {
                continue;
            };
            if owner.expires > now_unix() {
                live.push(owner);
                continue;
            }
            if !overwrite {
                return Err(Error::AlreadyExists {
                    path: self.out.uri(),
                    reason: format!(
                        "{} holds the lapsed claim of {} (its coordinator stopped refreshing it, \
                         probably ended without cleaning up): pass --overwrite to take the \
                         output over",
                        self.out.uri(),
                        owner.describe()
                    ),
                });
            }
            tracing::warn!(
                "{}: taking over the lapsed claim of {}",
                self.out.uri(),
                owner.describe()
            );
            l.store.delete(&l.path).await?;
        }
        Ok(live)
    }

    async fn confirm(&self) -> Result<()> {
        let key = self.key();
        let lost = |why: &str| {
            self.lost.store(true, Ordering::SeqCst);
            Err(Error::job(
                &self.job,
                format!(
                    "{}: this job no longer holds its claim on the output ({why}); stopped \
                     before writing anything visible",
                    self.out.uri()
                ),
            ))
        };
        if self.lost.load(Ordering::SeqCst) {
            return lost("it lapsed or was taken over");
        }
        match Self::read(&key.store, &key.path).await? {
            Some(o) if o.job == self.job && o.expires > now_unix() => Ok(()),
            Some(_) => lost("it lapsed"),
            None => lost("it was removed: another job took the output over"),
        }
    }

    /// One refresh: the claim must still be ours and in force (a lapsed claim may have been
    /// taken over, and must not come back to life).
    async fn refresh(&self) -> Result<()> {
        let key = self.key();
        match Self::read(&key.store, &key.path).await? {
            Some(o) if o.job == self.job && o.expires > now_unix() => {}
            _ => {
                self.lost.store(true, Ordering::SeqCst);
                return Err(Error::job(&self.job, "the claim is gone or lapsed"));
            }
        }
        self.write().await
    }
}

async fn refresh_loop(oc: Arc<ObjectClaim>) {
    let every = oc.ttl / 4;
    loop {
        tokio::time::sleep(every).await;
        if oc.lost.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = oc.refresh().await {
            if oc.lost.load(Ordering::SeqCst) {
                tracing::error!(
                    job = %oc.job,
                    "{}: lost the claim on the output ({e}); the job stops before completing \
                     any file",
                    oc.out.uri()
                );
                return;
            }
            tracing::warn!(job = %oc.job, "refreshing the claim on {}: {e}", oc.out.uri());
        }
    }
}

mod local;
#[cfg(test)]
mod tests;
