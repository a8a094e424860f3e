//! A worker's row cache: the input bytes a statistics pass read, kept on the worker's scratch
//! disk so the tensor's later passes and its write task read them from there instead of from
//! storage again. Entries are keyed by job, input file and byte range (the pieces a task reads
//! are the same for every pass over a row range), bounded in total by a byte limit, removed
//! once the write task that needed them last has written its part, and let go after `IDLE`
//! unused when space is wanted (a task retried on another worker leaves its rows behind here).
//! The cache only saves reads: a miss reads storage, so what a task computes never depends on it.
//!
//! Its folder is removed when the worker ends; a worker that was killed (SIGKILL, out of
//! memory, a node lost) cannot, so each folder holds a lock file its process keeps locked, and
//! a new cache removes the folders beside it whose lock nobody holds (their process is gone).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::storage::local::OwnedDir;

/// How long an unused entry is kept when its space is wanted.
const IDLE: Duration = Duration::from_secs(600);

/// The folder name's prefix.
const PREFIX: &str = "shardmerge-rows-";

/// A cached piece: the bytes `[from, to)` of input file `uri`, read for job `job`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub job: String,
    pub uri: String,
    pub from: u64,
    pub to: u64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    len: u64,
    /// Its file is written whole (a reader never sees a piece being written).
    ready: bool,
    touched: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    used: u64,
    next_id: u64,
}

/// The cache of one worker process, shared by its slots.
#[derive(Debug)]
pub struct RowCache {
    /// The folder, removed when the cache is dropped (and by a later cache if this process
    /// dies first).
    dir: OwnedDir,
    limit: u64,
    inner: Mutex<Inner>,
}

impl RowCache {
    /// A cache of at most `limit` bytes in a new folder under `parent` (the system's temporary
    /// folder when `None`).
    pub fn new(parent: Option<&Path>, limit: u64) -> std::io::Result<Self> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let (dir, removed) = OwnedDir::new(&parent, PREFIX)?;
        if removed > 0 {
            tracing::info!(
                "removed {removed} row cache folder(s) in {} left by workers that are gone",
                parent.display()
            );
        }
        Ok(RowCache {
            dir,
            limit,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // a panic while holding the lock leaves the map consistent (no step spans two fields
        // half-done that a reader trusts), so a poisoned lock is taken as it is
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("{id}"))
    }

    /// The piece `key` into `buf` (`Ok`), or `buf` back when it is not here (`Err`).
    pub async fn get(&self, key: &Key, buf: Vec<u8>) -> Result<Vec<u8>, Vec<u8>> {
        let (id, len) = {
            let mut g = self.lock();
            match g.entries.get_mut(key) {
                Some(e) if e.ready => {
                    e.touched = Instant::now();
                    (e.id, e.len)
                }
                _ => return Err(buf),
            }
        };
        let path = self.path(id);
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = buf;
            buf.clear();
            let ok = std::fs::File::open(&path)
                .and_then(|f| f.take(len).read_to_end(&mut buf))
                .is_ok_and(|n| n as u64 == len);
            (ok, buf)
        })
        .await;
        match read {
            Ok((true, buf)) => Ok(buf),
            Ok((false, buf)) => {
                // unreadable (scratch disk trouble): forget it, storage has the bytes
                self.remove(key);
                Err(buf)
            }
            Err(_) => Err(Vec::new()),
        }
    }

    /// Keeps `data` as piece `key` if it fits (after letting idle entries go); gives `data`
    /// back either way.
    pub async fn put(&self, key: Key, data: Vec<u8>) -> Vec<u8> {
        let len = data.len() as u64;
        let id = {
            let mut g = self.lock();
            if g.entries.contains_key(&key) || !self.make_room(&mut g, len) {
                return data;
            }
            let id = g.next_id;
            g.next_id += 1;
            g.used += len;
            let touched = Instant::now();
            let e = Entry {
                id,
                len,
                ready: false,
                touched,
            };
            g.entries.insert(key.clone(), e);
            id
        };
        let path = self.path(id);
        let written = tokio::task::spawn_blocking(move || {
            let ok = std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(&data))
                .is_ok();
            (ok, data)
        })
        .await;
        let mut g = self.lock();
        match written {
            Ok((true, data)) => {
                if let Some(e) = g.entries.get_mut(&key).filter(|e| e.id == id) {
                    e.ready = true;
                }
                data
            }
            Ok((false, data)) => {
                drop(g);
                self.remove(&key);
                data
            }
            Err(_) => Vec::new(),
        }
    }

    /// Forgets piece `key` and frees its space.
    pub fn remove(&self, key: &Key) {
        let gone = {
            let mut g = self.lock();
            let e = g.entries.remove(key);
            if let Some(e) = &e {
                g.used -= e.len;
            }
            e
        };
        if let Some(e) = gone {
            let _ = std::fs::remove_file(self.path(e.id));
        }
    }

    /// Whether `len` more bytes fit, after letting entries unused for `IDLE` go.
    fn make_room(&self, g: &mut Inner, len: u64) -> bool {
        if g.used + len <= self.limit {
            return true;
        }
        let now = Instant::now();
        let idle: Vec<Key> = g
            .entries
            .iter()
            .filter(|(_, e)| e.ready && now.duration_since(e.touched) >= IDLE)
            .map(|(k, _)| k.clone())
            .collect();
        for k in idle {
            if let Some(e) = g.entries.remove(&k) {
                g.used -= e.len;
                let _ = std::fs::remove_file(self.path(e.id));
            }
        }
        g.used + len <= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(from: u64) -> Key {
        Key {
            job: "j".into(),
            uri: "file:///m/model.safetensors".into(),
            from,
            to: from + 3,
        }
    }

    #[tokio::test]
    async fn keeps_gives_back_and_forgets_within_its_limit() {
        let c = RowCache::new(None, 5).unwrap();
        assert_eq!(c.get(&key(0), vec![9]).await, Err(vec![9]));
        assert_eq!(c.put(key(0), vec![1, 2, 3]).await, vec![1, 2, 3]);
        assert_eq!(c.get(&key(0), Vec::new()).await, Ok(vec![1, 2, 3]));
        // over the limit: not kept
        c.put(key(10), vec![4, 5, 6]).await;
        assert!(c.get(&key(10), Vec::new()).await.is_err());
        assert_eq!(c.used(), 3);
        c.remove(&key(0));
        assert_eq!(c.used(), 0);
        assert!(c.get(&key(0), Vec::new()).await.is_err());
        c.put(key(10), vec![4, 5, 6]).await;
        assert_eq!(c.get(&key(10), Vec::new()).await, Ok(vec![4, 5, 6]));
        let dir = c.dir.path().to_path_buf();
        assert!(dir.exists());
        drop(c);
        assert!(!dir.exists(), "the scratch folder goes with the cache");
    }

    /// A killed worker's folder (its lock file unlocked) is removed by the next cache made
    /// beside it; a live cache's folder and a fresh folder without a lock file stay.
    #[tokio::test]
    async fn a_new_cache_removes_the_folders_of_workers_that_are_gone() {
        let parent = tempfile::tempdir().unwrap();
        let live = RowCache::new(Some(parent.path()), 5).unwrap();
        live.put(key(0), vec![1, 2, 3]).await;
        let dead = parent.path().join(format!("{PREFIX}dead"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("owner.lock"), b"").unwrap();
        std::fs::write(dead.join("0"), [0u8; 64]).unwrap();
        let unlocked_young = parent.path().join(format!("{PREFIX}young"));
        std::fs::create_dir(&unlocked_young).unwrap();
        let other = parent.path().join("someone-elses");
        std::fs::create_dir(&other).unwrap();
        let next = RowCache::new(Some(parent.path()), 5).unwrap();
        assert!(!dead.exists(), "a gone worker's folder stays");
        assert!(live.dir.path().exists() && next.dir.path().exists());
        assert_eq!(live.get(&key(0), Vec::new()).await, Ok(vec![1, 2, 3]));
        assert!(unlocked_young.exists() && other.exists());
    }
}
