//! `null://BUCKET/PATH`: a **benchmark-only** discarding store. It exists to time merges whose
//! output does not fit anywhere (a 70B checkpoint is 131 GiB; docs/scaling.md), and must never
//! be a default or be used for anything that should keep its output: every byte of every
//! output data file is thrown away.
//!
//! What it keeps, in the memory of the process that holds it:
//! - small whole-file writes (`put`: `config.json`, the model card, the checksum manifest, the
//!   index, claims), so the commit and the claim protocol run as they do on S3;
//! - for each output file written in parts, its size and CRC-32C: each part's CRC-32C is
//!   computed here from the bytes given to `write_part` (in whichever process wrote it: a
//!   worker's store hands it back in the part's receipt), and the finished file's is combined
//!   from its parts' in order, so it equals the CRC-32C of the file a real store would hold.
//!
//! It counts the bytes given to `write_part` (`bytes_given`), logs a warning when the first
//! upload begins (nothing written will be kept) and one `info` line per finished file
//! (`RUST_LOG=shardmerge_worker::storage::null=info`) with its size and CRC-32C. A finished
//! file exists with its size, but reading it fails: its bytes were discarded. Output files are
//! cut in parts of at least S3's minimum, as an S3 output would be. A coordinator takes such an
//! output only with `--allow-any`: its `--allow` policy knows no `null://` prefix and refuses it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::object::S3_MIN_PART;
use super::{Receipt, SResult, Storage, StorageError, Upload};

/// The URI prefix.
pub const PREFIX: &str = "null://";

/// A file the store holds: the bytes of a small file, or what is left of a discarded one.
#[derive(Clone, Debug)]
enum Held {
    Kept(Bytes),
    Discarded { size: u64, crc32c: u32 },
}

impl Held {
    fn size(&self) -> u64 {
        match self {
            Held::Kept(b) => b.len() as u64,
            Held::Discarded { size, .. } => *size,
        }
    }
}

/// The discarding store of one `null://BUCKET` (see the module's comment: benchmarks only).
#[derive(Debug)]
pub struct NullStorage {
    root: String,
    files: Mutex<BTreeMap<String, Held>>,
    /// Uploads begun here that are neither finished nor aborted: id -> path.
    uploads: Mutex<HashMap<String, String>>,
    next_upload: AtomicU64,
    given: AtomicU64,
    warned: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NullStorage {
    /// The store of `null://BUCKET`.
    pub fn new(bucket: &str) -> Self {
        NullStorage {
            root: format!("{PREFIX}{bucket}"),
            files: Mutex::default(),
            uploads: Mutex::default(),
            next_upload: AtomicU64::new(0),
            given: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// Bytes given to `write_part` in this process (retried parts counted each time).
    pub fn bytes_given(&self) -> u64 {
        self.given.load(Ordering::Relaxed)
    }

    /// A finished output file's (size, CRC-32C), or `None` if none was finished at `path`.
    pub fn discarded(&self, path: &str) -> Option<(u64, u32)> {
        match lock(&self.files).get(path)? {
            Held::Discarded { size, crc32c } => Some((*size, *crc32c)),
            Held::Kept(_) => None,
        }
    }

    fn held(&self, path: &str) -> SResult<Held> {
        lock(&self.files)
            .get(path)
            .cloned()
            .ok_or_else(|| StorageError::not_found(format!("{}/{path}: no such file", self.root)))
    }

    fn kept(&self, path: &str) -> SResult<Bytes> {
        match self.held(path)? {
            Held::Kept(b) => Ok(b),
            Held::Discarded { .. } => Err(StorageError::new(
                format!(
                    "{}/{path}: cannot be read: null:// is a benchmark-only store that discarded \
                     this file's bytes",
                    self.root
                ),
                false,
            )),
        }
    }
}

#[async_trait]
impl Storage for NullStorage {
    fn scheme_root(&self) -> String {
        self.root.clone()
    }

    fn min_part_size(&self) -> u64 {
        S3_MIN_PART
    }

    async fn size(&self, path: &str) -> SResult<u64> {
        Ok(self.held(path)?.size())
    }

    async fn exists(&self, path: &str) -> SResult<bool> {
        Ok(lock(&self.files).contains_key(path))
    }

    async fn read_range(&self, path: &str, range: Range<u64>) -> SResult<Bytes> {
        let b = self.kept(path)?;
        if range.start > range.end || range.end > b.len() as u64 {
            return Err(StorageError::new(
                format!(
                    "{}/{path}: range {}..{} is past the end ({} bytes)",
                    self.root,
                    range.start,
                    range.end,
                    b.len()
                ),
                false,
            ));
        }
        Ok(b.slice(range.start as usize..range.end as usize))
    }

    async fn read_all(&self, path: &str) -> SResult<Bytes> {
        self.kept(path)
    }

    async fn put(&self, path: &str, data: Bytes) -> SResult<()> {
        lock(&self.files).insert(path.to_string(), Held::Kept(data));
        Ok(())
    }

    async fn list(&self, dir: &str) -> SResult<Vec<String>> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let files = lock(&self.files);
        Ok(files
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|n| !n.contains('/'))
            .map(String::from)
            .collect())
    }

    async fn delete(&self, path: &str) -> SResult<()> {
        lock(&self.files).remove(path);
        Ok(())
    }

    async fn begin_upload(&self, path: &str, _size: u64) -> SResult<Upload> {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{}: benchmark-only store: the output's data files are discarded (counted and \
                 checksummed, never kept)",
                self.root
            );
        }
        let id = format!("null-{}", self.next_upload.fetch_add(1, Ordering::Relaxed));
        lock(&self.uploads).insert(id.clone(), path.to_string());
        Ok(Upload {
            path: path.to_string(),
            id,
        })
    }

    /// Counts and checksums the part, and drops it. Any upload id is taken: the upload may
    /// have been begun by another process (the coordinator) than the one writing (a worker).
    async fn write_part(
        &self,
        _upload: &Upload,
        part_index: u32,
        _offset: u64,
        data: Bytes,
    ) -> SResult<Receipt> {
        let size = data.len() as u64;
        self.given.fetch_add(size, Ordering::Relaxed);
        let crc32c = crc32c::crc32c(&data);
        Ok(Receipt {
            part_index,
            etag: format!("null-{part_index}-{crc32c:08x}"),
            size,
            crc32c,
        })
    }

    /// Records the file's size and the CRC-32C combined from its parts' receipts, in order.
    async fn finish_upload(&self, upload: &Upload, parts: &[Receipt]) -> SResult<()> {
        if lock(&self.uploads).remove(&upload.id).is_none() {
            return Err(StorageError::not_found(format!(
                "{}/{}: no upload {}",
                self.root, upload.path, upload.id
            )));
        }
        let (mut size, mut crc) = (0u64, 0u32);
        for r in parts {
            crc = crate::crc::combine(crc, r.crc32c, r.size);
            size += r.size;
        }
        tracing::info!(
            "{}/{}: discarded {size} bytes in {} parts, CRC-32C {crc:08x}",
            self.root,
            upload.path,
            parts.len()
        );
        let held = Held::Discarded { size, crc32c: crc };
        lock(&self.files).insert(upload.path.clone(), held);
        Ok(())
    }

    async fn abort_upload(&self, upload: &Upload) -> SResult<()> {
        lock(&self.uploads).remove(&upload.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn null_uris_resolve_to_one_store_per_bucket() {
        let r = crate::storage::Resolver::new();
        let base = std::path::Path::new("/");
        let a = r.resolve("null://bench/out/x/", base).unwrap();
        assert_eq!(
            (a.store.scheme_root(), a.path.as_str()),
            ("null://bench".into(), "out/x")
        );
        assert_eq!(a.uri(), "null://bench/out/x");
        let b = r.resolve("null://bench/other", base).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.store, &b.store));
        let e = r.resolve("null:///out", base).unwrap_err();
        assert!(
            e.message.contains("no bucket") && e.message.contains("null:///out"),
            "{e}"
        );
    }

    #[test]
    fn parts_are_counted_checksummed_and_discarded() {
        block_on(async {
            let s = NullStorage::new("b");
            let (a, b) = (vec![7u8; 6 << 20], b"tail".to_vec());
            let up = s.begin_upload("out/x.safetensors", 0).await.unwrap();
            let r1 = s.write_part(&up, 1, 6 << 20, Bytes::from(b.clone())).await;
            let r0 = s.write_part(&up, 0, 0, Bytes::from(a.clone())).await;
            let parts = [r0.unwrap(), r1.unwrap()];
            assert!(!s.exists("out/x.safetensors").await.unwrap());
            s.finish_upload(&up, &parts).await.unwrap();
            let whole = [a, b].concat();
            let want = (whole.len() as u64, crc32c::crc32c(&whole));
            assert_eq!(s.discarded("out/x.safetensors"), Some(want));
            assert_eq!(s.size("out/x.safetensors").await.unwrap(), want.0);
            assert_eq!(s.bytes_given(), want.0);
            let e = s.read_range("out/x.safetensors", 0..1).await.unwrap_err();
            assert!(e.message.contains("benchmark-only") && !e.retryable, "{e}");
            assert!(s.read_all("out/x.safetensors").await.is_err());
            // finishing an upload twice, or one never begun, is an error
            assert!(s.finish_upload(&up, &parts).await.unwrap_err().not_found);
            assert_eq!(s.scheme_root(), "null://b");
            assert_eq!(s.min_part_size(), S3_MIN_PART);
        });
    }
}
