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
            StorageError::new(format!("{what}: {}", without_xml(&e.to_string())), false)
        }
        other => StorageError::new(format!("{what}: {}", without_xml(&other.to_string())), true),
    }
}

/// An S3 server's error message with the XML body it returned (`<?xml …><Error><Code>
/// AccessDenied</Code><Message>Access Denied.</Message>…</Error>`) replaced by what it says:
/// `S3 error AccessDenied: Access Denied.`.
pub(crate) fn without_xml(msg: &str) -> String {
    let Some(start) = msg.find("<?xml").or_else(|| msg.find("<Error>")) else {
        return msg.to_string();
    };
    let body = &msg[start..];
    let end = body
        .find("</Error>")
        .map_or(body.len(), |e| e + "</Error>".len());
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let from = body[..end].find(&open)? + open.len();
        let to = body[from..end].find(&format!("</{name}>"))? + from;
        let text = body[from..to]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&");
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    };
    let said = match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("S3 error {c}: {m}"),
        (Some(c), None) => format!("S3 error {c}"),
        (None, Some(m)) => format!("S3 error: {m}"),
        (None, None) => "an S3 error without a code".to_string(),
    };
    format!("{}{said}{}", &msg[..start], &body[end..])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_xml_bodies_become_their_code_and_message() {
        let raw = r#"Generic S3 error: Error performing GET http://127.0.0.1:3900/b/m/model.safetensors in 2ms - Server returned non-2xx status code: 403 Forbidden: <?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Forbidden: no such key &quot;GK1&quot; &amp; more</Message><Resource>/b/m</Resource><Region>garage</Region></Error>"#;
        let clean = without_xml(raw);
        assert_eq!(
            clean,
            r#"Generic S3 error: Error performing GET http://127.0.0.1:3900/b/m/model.safetensors in 2ms - Server returned non-2xx status code: 403 Forbidden: S3 error AccessDenied: Forbidden: no such key "GK1" & more"#
        );
        assert!(!without_xml("x: <Error><Code>SlowDown</Code></Error> (retried)").contains('<'));
        assert_eq!(without_xml("no xml here"), "no xml here");
        assert_eq!(
            without_xml("cut: <?xml version=\"1.0\"?><Err"),
            "cut: an S3 error without a code"
        );
    }

    /// A server that answers every request `403` with an S3 XML error body.
    async fn refusing_server() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = r#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied.</Message><RequestId>1</RequestId></Error>"#;
                    let head = format!("HTTP/1.1 403 Forbidden\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_s3_refusal_is_reported_without_its_xml() {
        let addr = refusing_server().await;
        let b = AmazonS3Builder::new()
            .with_endpoint(format!("http://{addr}"))
            .with_allow_http(true)
            .with_access_key_id("key")
            .with_secret_access_key("secret")
            .with_region("us-east-1");
        let st = ObjectStorage::s3("bucket", b).unwrap();
        let e = st
            .read_range("m/model.safetensors", 0..8)
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("s3://bucket/m/model.safetensors"), "{msg}");
        assert!(msg.contains("AccessDenied: Access Denied."), "{msg}");
        assert!(!msg.contains('<'), "{msg}");
        let e = st.put("m/x", Bytes::from_static(b"x")).await.unwrap_err();
        assert!(!e.to_string().contains('<'), "{e}");
    }
}
