//! Byte storage for checkpoints: range reads of inputs, small whole-file puts, and output files
//! written in parts by many tasks. One trait, one module per backend (`local`, `object`, `hub`,
//! and `null`, a benchmark-only store that discards its output), and cross-cutting behaviour as
//! wrappers around any store (`fault`). Storage knows nothing of
//! tensors or merge methods.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

pub mod fault;
pub mod hub;
pub mod local;
pub mod null;
pub mod object;

pub use local::Mapped;

/// A storage failure. `retryable` failures (I/O hiccups, throttling) may succeed on retry;
/// the others (missing file, bad request) will not.
#[derive(Debug, Clone)]
pub struct StorageError {
    pub message: String,
    pub retryable: bool,
    pub not_found: bool,
}

impl StorageError {
    pub fn new(message: impl Into<String>, retryable: bool) -> Self {
        StorageError {
            message: message.into(),
            retryable,
            not_found: false,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        StorageError {
            message: message.into(),
            retryable: false,
            not_found: true,
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StorageError {}

pub type SResult<T> = Result<T, StorageError>;

/// An output file being written in parts: the temporary file or the multipart upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    /// The file's final path in its store.
    pub path: String,
    /// Local: the temporary file's path. S3: the multipart upload id.
    pub id: String,
}

/// What a written part left behind; the commit needs every part's receipt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub part_index: u32,
    pub etag: String,
    pub size: u64,
    /// CRC-32C of the part's bytes, as the writer computed them before writing.
    pub crc32c: u32,
}

/// Positioned reads of one file on the calling thread, for a caller that reads small pieces
/// as it computes, each while the previous one is still in the core's cache
/// ([`Storage::positioned`]).
pub trait PositionedRead: Send + Sync {
    /// Fills `buf` from byte `offset` of the file (an error if it ends first).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> SResult<()>;

    /// Bytes `range` of the file mapped into memory instead of read (for a whole tensor that a
    /// method walks several times: no copy, and page cache instead of the slot's memory); None
    /// where the store does not map, or the range is empty: read it instead.
    fn map(&self, _range: Range<u64>) -> SResult<Option<Mapped>> {
        Ok(None)
    }

    /// Says that bytes `range` are about to be read: a local file starts reading them into
    /// the page cache in the background, so that reads a block at a time (computed as they
    /// come) do not each wait for the disk. Best effort, no error.
    fn will_need(&self, _range: Range<u64>) {}
}

/// A store of files addressed by path (a local absolute path, or an object key).
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// `file://` or `s3://bucket`, for messages and URIs.
    fn scheme_root(&self) -> String;
    /// Whether its paths are files of this machine's filesystem (workers then write output
    /// parts into the file at their offset instead of uploading parts).
    fn is_local(&self) -> bool {
        false
    }
    /// Positioned reads of `path` on the calling thread, where the store has them cheaply (a
    /// local file's page cache); None: read through [`Storage::read_range_into`] (wrappers
    /// give None, so what they count or inject sees every read).
    fn positioned(&self, _path: &str) -> Option<Arc<dyn PositionedRead>> {
        None
    }
    /// Smallest part a multi-part output accepts (except a file's last part).
    fn min_part_size(&self) -> u64 {
        0
    }
    async fn size(&self, path: &str) -> SResult<u64>;
    async fn exists(&self, path: &str) -> SResult<bool>;
    async fn read_range(&self, path: &str, range: Range<u64>) -> SResult<Bytes>;
    /// Reads bytes `range` into `buf`, replacing what it held, and hands the buffer back, so
    /// that a caller reading piece after piece reuses one allocation. By default it reads with
    /// `read_range` and copies.
    async fn read_range_into(
        &self,
        path: &str,
        range: Range<u64>,
        mut buf: Vec<u8>,
    ) -> SResult<Vec<u8>> {
        let b = self.read_range(path, range).await?;
        buf.clear();
        buf.extend_from_slice(&b);
        Ok(buf)
    }
    async fn read_all(&self, path: &str) -> SResult<Bytes>;
    /// Writes a small file whole; readers see the old file or the new one, never a part.
    async fn put(&self, path: &str, data: Bytes) -> SResult<()>;
    /// Names of the files directly in folder `dir`.
    async fn list(&self, dir: &str) -> SResult<Vec<String>>;
    async fn delete(&self, path: &str) -> SResult<()>;
    /// Starts an output file of `size` bytes, written by parts at known offsets.
    async fn begin_upload(&self, path: &str, size: u64) -> SResult<Upload>;
    /// Writes part `part_index` (bytes at `offset`). Writing the same part again replaces it.
    async fn write_part(
        &self,
        upload: &Upload,
        part_index: u32,
        offset: u64,
        data: Bytes,
    ) -> SResult<Receipt>;
    /// Checks, before the file is completed, that storage holds what `parts` say was written
    /// for an output file of `size` bytes: each part at its size where the backend can list
    /// an upload's parts, the written length for a local file. By default (a backend that can
    /// do neither) it checks nothing; the caller then checks the completed file's size.
    async fn check_upload(&self, _upload: &Upload, _parts: &[Receipt], _size: u64) -> SResult<()> {
        Ok(())
    }
    /// Makes the file visible under its final path; `parts` in ascending part order.
    async fn finish_upload(&self, upload: &Upload, parts: &[Receipt]) -> SResult<()>;
    async fn abort_upload(&self, upload: &Upload) -> SResult<()>;
}

/// A parsed location: which store, and the path inside it.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn Storage>,
    pub path: String,
}

impl Location {
    pub fn uri(&self) -> String {
        let root = self.store.scheme_root();
        if self.store.is_local() {
            format!("{root}{}", self.path)
        } else {
            format!("{root}/{}", self.path)
        }
    }

    /// A file inside this location (treated as a folder).
    pub fn join(&self, name: &str) -> Location {
        let path = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}/{}", self.path.trim_end_matches('/'), name)
        };
        Location {
            store: self.store.clone(),
            path,
        }
    }
}

/// Wraps every store a resolver hands out (e.g. in fault injection).
pub(crate) type StoreWrapper = Arc<dyn Fn(Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync>;

/// Resolves URIs to stores, keeping one store per bucket. A wrapper (e.g. fault injection)
/// can be applied to every store it hands out.
#[derive(Clone, Default)]
pub struct Resolver {
    stores: Arc<Mutex<HashMap<String, Arc<dyn Storage>>>>,
    wrap: Option<StoreWrapper>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every store handed out is first passed through `wrap`.
    pub fn with_wrapper(
        wrap: impl Fn(Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync + 'static,
    ) -> Self {
        Resolver {
            stores: Default::default(),
            wrap: Some(Arc::new(wrap)),
        }
    }

    /// Resolves `uri`: `s3://bucket/key`, `file:///abs/path`, `hf://org/name@rev/file`,
    /// `null://bucket/key` (benchmarks only: discards output), or a path (relative paths are
    /// taken against `base_dir`). The scheme picks the backend from `SCHEMES`.
    pub fn resolve(&self, uri: &str, base_dir: &Path) -> SResult<Location> {
        for s in SCHEMES {
            if let Some(rest) = uri.strip_prefix(s.prefix) {
                return (s.open)(self, uri, rest, base_dir);
            }
        }
        if uri.contains("://") {
            let known: Vec<&str> = SCHEMES.iter().map(|s| s.prefix).collect();
            return Err(StorageError::new(
                format!(
                    "{uri}: unsupported URI scheme (use a local path or one of {})",
                    known.join(", ")
                ),
                false,
            ));
        }
        open_local(self, uri, uri, base_dir)
    }

    fn store(
        &self,
        key: &str,
        make: impl FnOnce() -> SResult<Arc<dyn Storage>>,
    ) -> SResult<Arc<dyn Storage>> {
        let mut stores = self
            .stores
            .lock()
            .map_err(|_| StorageError::new("storage registry poisoned", false))?;
        if let Some(s) = stores.get(key) {
            return Ok(s.clone());
        }
        let mut s = make()?;
        if let Some(w) = &self.wrap {
            s = w(s);
        }
        stores.insert(key.to_string(), s.clone());
        Ok(s)
    }
}

/// A URI scheme and how a location under it is opened: `(resolver, whole uri, rest after the
/// prefix, base folder for relative paths)`.
struct Scheme {
    prefix: &'static str,
    open: fn(&Resolver, &str, &str, &Path) -> SResult<Location>,
}

/// The one scheme → backend table. To add a backend: a module implementing `Storage`, and a
/// row here (a path without a scheme is local).
const SCHEMES: &[Scheme] = &[
    Scheme {
        prefix: "s3://",
        open: open_s3,
    },
    Scheme {
        prefix: "file://",
        open: open_local,
    },
    Scheme {
        prefix: hub::PREFIX,
        open: open_hub,
    },
    Scheme {
        prefix: null::PREFIX,
        open: open_null,
    },
];

/// `hf://ORG/NAME@REVISION/FILE`: a Hugging Face Hub repository (read-only), one store per
/// repository and revision, configured from the environment (see `hub`).
fn open_hub(r: &Resolver, uri: &str, rest: &str, _base_dir: &Path) -> SResult<Location> {
    let (id, file) = hub::RepoId::parse_uri(rest).ok_or_else(|| {
        StorageError::new(
            format!("{uri}: not a Hugging Face repository (write hf://ORG/NAME@REVISION, with letters, digits, `-`, `_` and `.`)"),
            false,
        )
    })?;
    let store = r.store(&id.uri(), || {
        Ok(Arc::new(hub::HubStorage::from_env(id.clone())?) as Arc<dyn Storage>)
    })?;
    Ok(Location { store, path: file })
}

/// `s3://bucket/key`: one store per bucket, configured from the environment.
fn open_s3(r: &Resolver, uri: &str, rest: &str, _base_dir: &Path) -> SResult<Location> {
    let (bucket, path) = bucket_and_key(uri, rest, "S3 URI")?;
    let store = r.store(&format!("s3://{bucket}"), || {
        Ok(Arc::new(object::ObjectStorage::s3_from_env(bucket)?) as Arc<dyn Storage>)
    })?;
    Ok(Location { store, path })
}

/// `BUCKET/KEY` after a scheme: the bucket, and the key without leading or trailing slashes.
fn bucket_and_key<'a>(uri: &str, rest: &'a str, what: &str) -> SResult<(&'a str, String)> {
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(StorageError::new(
            format!("{uri}: no bucket in {what}"),
            false,
        ));
    }
    Ok((bucket, key.trim_matches('/').to_string()))
}

/// `null://bucket/key`: the benchmark-only discarding store (`null`), one per bucket.
fn open_null(r: &Resolver, uri: &str, rest: &str, _base_dir: &Path) -> SResult<Location> {
    let (bucket, path) = bucket_and_key(uri, rest, "the URI (write null://BUCKET/PATH)")?;
    let store = r.store(&format!("{}{bucket}", null::PREFIX), || {
        Ok(Arc::new(null::NullStorage::new(bucket)) as Arc<dyn Storage>)
    })?;
    Ok(Location { store, path })
}

/// A local path (`file:///abs/path`, or a path, relative to `base_dir`).
fn open_local(r: &Resolver, _uri: &str, path: &str, base_dir: &Path) -> SResult<Location> {
    let p = PathBuf::from(path);
    let mut abs = if p.is_absolute() { p } else { base_dir.join(p) };
    if !abs.is_absolute() {
        if let Ok(cwd) = std::env::current_dir() {
            abs = cwd.join(abs);
        }
    }
    let abs = normalize(&abs);
    let store = r.store("file://", || {
        Ok(Arc::new(local::LocalStorage::new()) as Arc<dyn Storage>)
    })?;
    Ok(Location {
        store,
        path: abs.to_string_lossy().into_owned(),
    })
}

/// Removes `.` and `..` components without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Runs an idempotent storage operation, retrying retryable failures with backoff (for the
/// coordinator's own reads; tasks are retried whole by the coordinator instead).
pub async fn retry<T, F, Fut>(mut op: F) -> SResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = SResult<T>>,
{
    let mut delay = std::time::Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if e.retryable && attempt < 5 => {
                tracing::warn!("{e}; retrying in {delay:?} (attempt {attempt})");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}
