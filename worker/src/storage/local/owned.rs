//! A temporary folder owned by this process, which a later process removes if this one dies
//! without removing it (SIGKILL, out of memory, a lost node, or a test binary whose shared
//! fixtures live in statics, which are never dropped).
//!
//! Each folder holds a lock file that its process keeps locked; making a new folder removes
//! the folders of the same prefix beside it whose lock nobody holds (their process is gone).

use std::fs::File;
use std::path::Path;
use std::time::Duration;

/// The lock file inside each folder that says its owner still runs.
const OWNER: &str = "owner.lock";

/// A folder without a lock file is left alone this long (one being set up has its lock within
/// microseconds).
const YOUNG: Duration = Duration::from_secs(600);

/// A fresh folder `PREFIX...` under a parent, removed when dropped.
#[derive(Debug)]
pub struct OwnedDir {
    tmp: tempfile::TempDir,
    /// Locked for the folder's life: its owner runs.
    _owner: File,
}

impl OwnedDir {
    /// A new folder named `prefix` and a random suffix under `parent`, locked as ours before
    /// it takes its name (no sweep ever sees it unlocked); then the folders of the same prefix
    /// beside it whose owner is gone are removed. Returns the folder and how many went.
    pub fn new(parent: &Path, prefix: &str) -> std::io::Result<(Self, usize)> {
        std::fs::create_dir_all(parent)?;
        let tmp = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
        let fresh = tmp.path().join("owner.new");
        let owner = File::create(&fresh)?;
        super::try_lock(&owner)?;
        std::fs::rename(&fresh, tmp.path().join(OWNER))?;
        let removed = remove_abandoned(parent, prefix, tmp.path());
        Ok((OwnedDir { tmp, _owner: owner }, removed))
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }
}

/// Removes the folders `prefix*` in `parent` (other than `mine`) whose owner is gone: their
/// lock file can be locked, or they have none and were last changed over [`YOUNG`] ago.
/// Returns how many went.
fn remove_abandoned(parent: &Path, prefix: &str, mine: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let ours = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix));
        if !ours || path == mine || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let gone = match File::open(path.join(OWNER)) {
            // held by a live process: the lock fails; ours now, released as `f` drops
            Ok(f) => super::try_lock(&f).is_ok(),
            Err(_) => e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= YOUNG)),
        };
        if gone && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gone owner's folder (its lock file unlocked) is removed by the next folder made
    /// beside it; a live one, a fresh one without a lock file and other names stay; a dropped
    /// folder goes.
    #[test]
    fn a_new_folder_removes_those_whose_owner_is_gone() {
        let parent = tempfile::tempdir().unwrap();
        let (live, _) = OwnedDir::new(parent.path(), "p-").unwrap();
        let dead = parent.path().join("p-dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(OWNER), b"").unwrap();
        std::fs::write(dead.join("0"), [0u8; 64]).unwrap();
        let young = parent.path().join("p-young");
        std::fs::create_dir(&young).unwrap();
        let other = parent.path().join("q-dead");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join(OWNER), b"").unwrap();
        let (next, removed) = OwnedDir::new(parent.path(), "p-").unwrap();
        assert_eq!(removed, 1);
        assert!(!dead.exists(), "a gone owner's folder stays");
        assert!(live.path().exists() && next.path().exists());
        assert!(young.exists() && other.exists());
        let gone = next.path().to_path_buf();
        drop(next);
        assert!(!gone.exists(), "a dropped folder goes");
    }
}
