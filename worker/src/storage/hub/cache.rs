//! Reading the local Hugging Face cache: where it is, the cached copy of a file at the pinned
//! commit, and the files it marks as missing.

use std::path::PathBuf;

use super::{is_commit, safe_file, HubStorage};
use crate::storage::{Storage, StorageError};

/// The Hugging Face cache folder from the environment.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("HF_HUB_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = var("HF_HOME") {
        return Some(PathBuf::from(d).join("hub"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

impl HubStorage {
    /// The cached copy of `file`, if the cache has it at the pinned commit (or, before one is
    /// pinned, at the commit `refs/REVISION` names, which then becomes the pin).
    pub(super) fn cached(&self, file: &str) -> Option<PathBuf> {
        let cache = self.cache.as_ref()?;
        let commit = match self.pinned() {
            Some(c) => c,
            None => {
                let r =
                    std::fs::read_to_string(cache.join("refs").join(&self.repo.revision)).ok()?;
                let c = r.trim().to_string();
                if !is_commit(&c) {
                    return None;
                }
                // the cache's commit pins the job, so files missing from it are fetched at it
                self.pin(&c);
                c
            }
        };
        if !safe_file(file) {
            return None;
        }
        let p = cache.join("snapshots").join(&commit).join(file);
        if p.is_file() {
            self.pin(&commit);
            Some(p)
        } else {
            None
        }
    }

    /// When the cache lacks `file`: whether it is known not to exist (offline, or the cache's
    /// `.no_exist/COMMIT/FILE` marker), as a not-found error.
    pub(super) fn known_absent(&self, file: &str) -> Option<StorageError> {
        let what = || format!("{}/{file}", self.scheme_root());
        if self.offline {
            return Some(StorageError::not_found(format!(
                "{}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set (download it, or unset HF_HUB_OFFLINE)",
                what()
            )));
        }
        let cache = self.cache.as_ref()?;
        let commit = self.pinned()?;
        if safe_file(file) && cache.join(".no_exist").join(commit).join(file).exists() {
            return Some(StorageError::not_found(format!("{}: no such file", what())));
        }
        None
    }
}
