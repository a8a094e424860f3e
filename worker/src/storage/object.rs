//! Object storage through `object_store` (S3 and S3-compatible: MinIO, Garage, Ceph, R2...).
//! Output files are multipart uploads; each task writes its reserved part.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use super::{Receipt, SResult, Storage, StorageError, Upload};

/// S3's smallest part, except a file's last.
pub(crate) const S3_MIN_PART: u64 = 5 * 1024 * 1024;

pub struct ObjectStorage {
    root: String,
    store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    min_part: u64,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectStorage({})", self.root)
    }
}

fn os_err(what: &str, e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { path, .. } => {
            StorageError::not_found(format!("{what}: {path}: not found"))
        }
        object_store::Error::InvalidPath { .. } | object_store::Error::NotSupported { .. } => {
            StorageError::new(format!("{what}: {e}"), false)
        }
        other => StorageError::new(format!("{what}: {other}"), true),
    }
}

impl ObjectStorage {
    /// An S3 bucket configured from the usual environment: `AWS_ENDPOINT_URL` (or
    /// `AWS_ENDPOINT`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ALLOW_HTTP`.
    pub(crate) fn s3_from_env(bucket: &str) -> SResult<Self> {
        let mut b = AmazonS3Builder::from_env();
        if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL") {
            b = b.with_endpoint(ep);
        }
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            b = b.with_region("us-east-1");
        }
        Self::s3(bucket, b)
    }

    /// An S3 bucket reached with the client settings of `builder` (endpoint, credentials,
    /// region), addressed path-style, which every S3-compatible server accepts.
    pub fn s3(bucket: &str, builder: AmazonS3Builder) -> SResult<Self> {
        let b = builder
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false);
        let s3 = Arc::new(b.build().map_err(|e| {
            StorageError::new(
                format!("s3://{bucket}: cannot configure S3 ({e}); set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION"),
                false,
            )
        })?);
        Ok(ObjectStorage {
            root: format!("s3://{bucket}"),
            store: s3.clone(),
            multipart: s3,
            min_part: S3_MIN_PART,
        })
    }
}

#[async_trait]
impl Storage for ObjectStorage {
    fn scheme_root(&self) -> String {
        self.root.clone()
    }

    fn min_part_size(&self) -> u64 {
        self.min_part
    }

    async fn size(&self, path: &str) -> SResult<u64> {
        let m = self
            .store
            .head(&Path::from(path))
            .await
            .map_err(|e| os_err(&format!("{}/{path}", self.root), e))?;
        Ok(m.size)
    }

    async fn exists(&self, path: &str) -> SResult<bool> {
        match self.store.head(&Path::from(path)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(os_err(path, e)),
        }
    }

    async fn read_range(&self, path: &str, range: Range<u64>) -> SResult<Bytes> {
        if range.start == range.end {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let b = self
            .store
            .get_range(&Path::from(path), range.clone())
            .await
            .map_err(|e| os_err(&format!("{}/{path}", self.root), e))?;
        if b.len() as u64 != want {
            return Err(StorageError::new(
                format!(
                    "{}/{path}: range {}..{} returned {} bytes (truncated object?)",
                    self.root,
                    range.start,
                    range.end,
                    b.len()
                ),
                false,
            ));
        }
        Ok(b)
    }

    async fn read_all(&self, path: &str) -> SResult<Bytes> {
        let r = self
            .store
            .get(&Path::from(path))
            .await
            .map_err(|e| os_err(&format!("{}/{path}", self.root), e))?;
        r.bytes().await.map_err(|e| os_err(path, e))
    }

    async fn put(&self, path: &str, data: Bytes) -> SResult<()> {
        self.store
            .put(&Path::from(path), PutPayload::from(data))
            .await
            .map_err(|e| os_err(&format!("{}/{path}", self.root), e))?;
        Ok(())
    }

    async fn list(&self, dir: &str) -> SResult<Vec<String>> {
        let prefix = Path::from(dir);
        let r = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| os_err(dir, e))?;
        let mut out: Vec<String> = r
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn delete(&self, path: &str) -> SResult<()> {
        match self.store.delete(&Path::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(os_err(path, e)),
        }
    }

    async fn begin_upload(&self, path: &str, _size: u64) -> SResult<Upload> {
        let id = self
            .multipart
            .create_multipart(&Path::from(path))
            .await
            .map_err(|e| os_err(&format!("{}/{path}: start upload", self.root), e))?;
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
        let size = data.len() as u64;
        let crc32c = crc32c::crc32c(&data);
        let part = self
            .multipart
            .put_part(
                &Path::from(upload.path.as_str()),
                &upload.id,
                part_index as usize,
                PutPayload::from(data),
            )
            .await
            .map_err(|e| {
                os_err(
                    &format!("{}/{}: part {part_index}", self.root, upload.path),
                    e,
                )
            })?;
        Ok(Receipt {
            part_index,
            etag: part.content_id,
            size,
            crc32c,
        })
    }

    async fn finish_upload(&self, upload: &Upload, parts: &[Receipt]) -> SResult<()> {
        let ids: Vec<PartId> = parts
            .iter()
            .map(|r| PartId {
                content_id: r.etag.clone(),
            })
            .collect();
        self.multipart
            .complete_multipart(&Path::from(upload.path.as_str()), &upload.id, ids)
            .await
            .map_err(|e| {
                os_err(
                    &format!("{}/{}: complete upload", self.root, upload.path),
                    e,
                )
            })?;
        Ok(())
    }

    async fn abort_upload(&self, upload: &Upload) -> SResult<()> {
        self.multipart
            .abort_multipart(&Path::from(upload.path.as_str()), &upload.id)
            .await
            .map_err(|e| os_err(&upload.path, e))
    }
}
