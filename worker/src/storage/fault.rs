//! Fault injection and I/O accounting around any store: fail chosen operations and count the
//! bytes read, to test retries, cleanup and read volumes without special cases in the code
//! under test.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Receipt, SResult, Storage, StorageError, Upload};

/// Which operations fail, and how.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Every n-th range read fails with a retryable error (0: never).
    pub fail_every_nth_read: u64,
    /// Every n-th part write fails with a retryable error (0: never).
    pub fail_every_nth_write: u64,
    /// After this many successful part writes, every write fails permanently (0: never).
    pub break_writes_after: u64,
    /// The first file completed is held back this long (a slow multipart completion).
    pub delay_first_finish_ms: u64,
    /// Writing `model.safetensors.index.json` fails unless every file it names exists: the
    /// index must be written last.
    pub check_index_last: bool,
    /// Every small-file write (config, model card, index: the commit) waits this long first.
    pub delay_puts_ms: u64,
    /// Every part write first takes a permit of this semaphore (and keeps it): a test lets
    /// writes through one at a time.
    pub write_gate: Option<Arc<tokio::sync::Semaphore>>,
}

#[derive(Debug)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    plan: FaultPlan,
    reads: AtomicU64,
    writes: AtomicU64,
    finishes: AtomicU64,
    bytes_read: Arc<AtomicU64>,
}

impl FaultyStorage {
    pub fn wrap(inner: Arc<dyn Storage>, plan: FaultPlan) -> Arc<dyn Storage> {
        Self::counting(inner, plan, Arc::new(AtomicU64::new(0)))
    }

    /// Like `wrap`, adding every byte read (ranges and whole files) to `bytes_read`.
    pub fn counting(
        inner: Arc<dyn Storage>,
        plan: FaultPlan,
        bytes_read: Arc<AtomicU64>,
    ) -> Arc<dyn Storage> {
        Arc::new(FaultyStorage {
            inner,
            plan,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            finishes: AtomicU64::new(0),
            bytes_read,
        })
    }

    /// Counts a range read and fails it when the plan says so.
    fn read_fault(&self, path: &str) -> SResult<()> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        if self.plan.fail_every_nth_read > 0 && n.is_multiple_of(self.plan.fail_every_nth_read) {
            return Err(StorageError::new(
                format!("{path}: injected read fault #{n}"),
                true,
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for FaultyStorage {
    fn scheme_root(&self) -> String {
        self.inner.scheme_root()
    }
    fn is_local(&self) -> bool {
        self.inner.is_local()
    }
    fn min_part_size(&self) -> u64 {
        self.inner.min_part_size()
    }
    async fn size(&self, path: &str) -> SResult<u64> {
        self.inner.size(path).await
    }
    async fn exists(&self, path: &str) -> SResult<bool> {
        self.inner.exists(path).await
    }
    async fn read_range(&self, path: &str, range: Range<u64>) -> SResult<Bytes> {
        self.read_fault(path)?;
        let b = self.inner.read_range(path, range).await?;
        self.bytes_read.fetch_add(b.len() as u64, Ordering::SeqCst);
        Ok(b)
    }
    async fn read_range_into(
        &self,
        path: &str,
        range: Range<u64>,
        buf: Vec<u8>,
    ) -> SResult<Vec<u8>> {
        self.read_fault(path)?;
        let b = self.inner.read_range_into(path, range, buf).await?;
        self.bytes_read.fetch_add(b.len() as u64, Ordering::SeqCst);
        Ok(b)
    }
    async fn read_all(&self, path: &str) -> SResult<Bytes> {
        let b = self.inner.read_all(path).await?;
        self.bytes_read.fetch_add(b.len() as u64, Ordering::SeqCst);
        Ok(b)
    }
    async fn put(&self, path: &str, data: Bytes) -> SResult<()> {
        if self.plan.delay_puts_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(self.plan.delay_puts_ms)).await;
        }
        if self.plan.check_index_last && path.ends_with(crate::format::names::INDEX) {
            let dir = path.trim_end_matches(crate::format::names::INDEX);
            let idx: serde_json::Value = serde_json::from_slice(&data)
                .map_err(|e| StorageError::new(format!("{path}: bad index: {e}"), false))?;
            let files: std::collections::BTreeSet<&str> = idx["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            for f in files {
                if !self.inner.exists(&format!("{dir}{f}")).await? {
                    return Err(StorageError::new(
                        format!("{path}: written before {f} was complete"),
                        false,
                    ));
                }
            }
        }
        self.inner.put(path, data).await
    }
    async fn list(&self, dir: &str) -> SResult<Vec<String>> {
        self.inner.list(dir).await
    }
    async fn delete(&self, path: &str) -> SResult<()> {
        self.inner.delete(path).await
    }
    async fn begin_upload(&self, path: &str, size: u64) -> SResult<Upload> {
        self.inner.begin_upload(path, size).await
    }
    async fn write_part(
        &self,
        upload: &Upload,
        part_index: u32,
        offset: u64,
        data: Bytes,
    ) -> SResult<Receipt> {
        if let Some(gate) = &self.plan.write_gate {
            let permit = gate.acquire().await;
            permit
                .map_err(|_| StorageError::new("write gate closed", false))?
                .forget();
        }
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.plan.break_writes_after > 0 && n > self.plan.break_writes_after {
            return Err(StorageError::new(
                format!("{}: injected permanent write fault", upload.path),
                false,
            ));
        }
        if self.plan.fail_every_nth_write > 0 && n.is_multiple_of(self.plan.fail_every_nth_write) {
            return Err(StorageError::new(
                format!("{}: injected write fault #{n}", upload.path),
                true,
            ));
        }
        self.inner
            .write_part(upload, part_index, offset, data)
            .await
    }
    async fn check_upload(&self, upload: &Upload, parts: &[Receipt], size: u64) -> SResult<()> {
        self.inner.check_upload(upload, parts, size).await
    }
    async fn finish_upload(&self, upload: &Upload, parts: &[Receipt]) -> SResult<()> {
        if self.finishes.fetch_add(1, Ordering::SeqCst) == 0 && self.plan.delay_first_finish_ms > 0
        {
            tokio::time::sleep(std::time::Duration::from_millis(
                self.plan.delay_first_finish_ms,
            ))
            .await;
        }
        self.inner.finish_upload(upload, parts).await
    }
    async fn abort_upload(&self, upload: &Upload) -> SResult<()> {
        self.inner.abort_upload(upload).await
    }
}
