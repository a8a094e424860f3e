//! Local output claims: a lock file held with `flock` by the process running the job.

use std::path::PathBuf;
use std::sync::Mutex;

use shardmerge_worker::storage::Location;

use super::{now_unix, taken, this_process, Claim, Inner, Owner, CLAIM};
use crate::error::{Error, Result};

/// Local: lock `OUT/.shardmerge-claim` (creating the folder and the file as needed).
pub(super) fn take(out: &Location, job: &str, resume: bool) -> Result<Claim> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::MetadataExt;
    let dir = PathBuf::from(&out.path);
    let path = dir.join(CLAIM);
    let io = |e: std::io::Error| Error::job(job, format!("claiming {}: {e}", path.display()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    for _ in 0..10 {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut text = Vec::new();
        if let Err(e) = shardmerge_worker::storage::local::try_lock(&f) {
            let _ = f.read_to_end(&mut text);
            let owner = Owner::parse(&text).unwrap_or(Owner {
                job: "?".into(),
                process: format!("lock file {} busy: {e}", path.display()),
                expires: 0.0,
                created: 0.0,
                nonce: String::new(),
            });
            return Err(taken(out, &owner));
        }
        // The file may have been removed (released) between our open and our lock: then the
        // lock is on a file no one else will see; open the path again.
        let same = std::fs::metadata(&path)
            .ok()
            .zip(f.metadata().ok())
            .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
        if !same {
            continue;
        }
        f.read_to_end(&mut text).map_err(io)?;
        if let Some(prev) = Owner::parse(&text) {
            if resume && prev.job != job {
                return Err(taken_over(out, &prev));
            }
            if prev.job != job {
                tracing::info!(
                    "{}: the claim of {} was left by a process that ended; taking it",
                    out.uri(),
                    prev.describe()
                );
            }
        }
        let me = Owner {
            job: job.to_string(),
            process: this_process(),
            expires: 0.0,
            created: now_unix(),
            nonce: String::new(),
        };
        f.set_len(0).map_err(io)?;
        f.rewind().map_err(io)?;
        f.write_all(&me.to_json(&out.uri())).map_err(io)?;
        return Ok(Claim {
            job: job.to_string(),
            inner: Inner::Local {
                path,
                file: Mutex::new(Some(f)),
            },
        });
    }
    Err(Error::job(
        job,
        format!(
            "claiming {}: the lock file kept changing under this process",
            path.display()
        ),
    ))
}

/// Refused on resume: `prev` took the output's claim over while this coordinator was down.
fn taken_over(out: &Location, prev: &Owner) -> Error {
    Error::AlreadyExists {
        path: out.uri(),
        reason: format!(
            "{}: its claim was taken over by {} while this coordinator was down",
            out.uri(),
            prev.describe()
        ),
    }
}
