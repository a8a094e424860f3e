//! An in-memory store for fast tests: files in a map, output files assembled from their parts
//! on finish (as a multipart upload is). It passes the storage conformance suite
//! (`storage_suite::conformance`), so a test on it sees the contract every backend keeps.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use shardmerge_worker::storage::{Receipt, SResult, Storage, StorageError, Upload};

#[derive(Debug, Default)]
pub struct MemoryStorage {
    files: Mutex<BTreeMap<String, Bytes>>,
    /// Uploads in progress: their parts by index.
    uploads: Mutex<HashMap<String, BTreeMap<u32, Bytes>>>,
    next_upload: AtomicU64,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn file(&self, path: &str) -> SResult<Bytes> {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files
            .get(path)
            .cloned()
            .ok_or_else(|| StorageError::not_found(format!("{path}: no such file")))
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    fn scheme_root(&self) -> String {
        "mem://test".into()
    }

    async fn size(&self, path: &str) -> SResult<u64> {
        Ok(self.file(path)?.len() as u64)
    }

    async fn exists(&self, path: &str) -> SResult<bool> {
        Ok(self.file(path).is_ok())
    }

    async fn read_range(&self, path: &str, range: Range<u64>) -> SResult<Bytes> {
        let f = self.file(path)?;
        if range.start > range.end || range.end > f.len() as u64 {
            return Err(StorageError::new(
                format!(
                    "{path}: range {range:?} is past the end ({} bytes)",
                    f.len()
                ),
                false,
            ));
        }
        Ok(f.slice(range.start as usize..range.end as usize))
    }

    async fn read_all(&self, path: &str) -> SResult<Bytes> {
        self.file(path)
    }

    async fn put(&self, path: &str, data: Bytes) -> SResult<()> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.insert(path.to_string(), data);
        Ok(())
    }

    async fn list(&self, dir: &str) -> SResult<Vec<String>> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let names = files.keys().filter_map(|k| k.strip_prefix(&prefix));
        Ok(names
            .filter(|n| !n.contains('/'))
            .map(String::from)
            .collect())
    }

    async fn delete(&self, path: &str) -> SResult<()> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.remove(path);
        Ok(())
    }

    async fn begin_upload(&self, path: &str, _size: u64) -> SResult<Upload> {
        let id = format!("upload-{}", self.next_upload.fetch_add(1, Ordering::SeqCst));
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        uploads.insert(id.clone(), BTreeMap::new());
        Ok(Upload {
            path: path.to_string(),
            id,
        })
    }

    async fn write_part(
        &self,
        upload: &Upload,
        part_index: u32,
        _offset: u64,
        data: Bytes,
    ) -> SResult<Receipt> {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        let parts = uploads.get_mut(&upload.id).ok_or_else(|| {
            StorageError::not_found(format!("{}: no upload {}", upload.path, upload.id))
        })?;
        let size = data.len() as u64;
        let crc32c = crc32c::crc32c(&data);
        parts.insert(part_index, data);
        Ok(Receipt {
            part_index,
            etag: format!("{part_index}"),
            size,
            crc32c,
        })
    }

    async fn finish_upload(&self, upload: &Upload, parts: &[Receipt]) -> SResult<()> {
        let written = {
            let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
            uploads.remove(&upload.id).ok_or_else(|| {
                StorageError::not_found(format!("{}: no upload {}", upload.path, upload.id))
            })?
        };
        let mut whole = Vec::new();
        for r in parts {
            let part = written.get(&r.part_index).ok_or_else(|| {
                let msg = format!("{}: part {} was never written", upload.path, r.part_index);
                StorageError::new(msg, false)
            })?;
            whole.extend_from_slice(part);
        }
        self.put(&upload.path, Bytes::from(whole)).await
    }

    async fn abort_upload(&self, upload: &Upload) -> SResult<()> {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        uploads.remove(&upload.id);
        Ok(())
    }
}
