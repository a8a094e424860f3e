//! Hugging Face Hub model repositories, read-only: `hf://ORG/NAME@REVISION/FILE`.
//!
//! A file is read from the local Hugging Face cache when the cache holds it (`HF_HUB_CACHE`,
//! else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; `models--ORG--NAME/refs/REVISION`
//! names a commit, `snapshots/COMMIT/FILE` is the file), else from the Hub over HTTP:
//! `HF_ENDPOINT` (default `https://huggingface.co`) `/ORG/NAME/resolve/REVISION/FILE`, with
//! `Authorization: Bearer $HF_TOKEN` when set (sent to the endpoint's host only, never logged).
//!
//! Every read of a safetensors file is a `Range` request (headers and tensor byte ranges
//! only); a `200` answer to one is refused, since it would stream the whole file. Redirects
//! are followed by hand for every request: the Hub answers with signed CDN URLs that are
//! valid for one request, so no redirect target is kept. The revision is pinned: the first
//! answer's `X-Repo-Commit` (or the cache's `refs/REVISION`) fixes the commit, every later
//! read asks for that commit, and `scheme_root` names it, so the URIs handed to workers read
//! the same snapshot.
//!
//! With `HF_HUB_OFFLINE=1` only the cache is read. A file the cache marks missing
//! (`.no_exist/COMMIT/FILE`) is not asked for.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, LOCATION, RANGE};
use reqwest::{Method, StatusCode};
use url::Url;

use super::{Receipt, SResult, Storage, StorageError, Upload};

mod cache;
mod repo;
pub(crate) use cache::cache_dir;
use repo::is_commit;
pub use repo::{model_reference, RepoId, PREFIX};

/// Redirect hops followed for one request.
const MAX_REDIRECTS: usize = 8;

/// One Hub repository at one revision.
pub(crate) struct HubStorage {
    repo: RepoId,
    endpoint: Url,
    token: Option<String>,
    client: reqwest::Client,
    /// `models--ORG--NAME` in the cache, when there is one.
    cache: Option<PathBuf>,
    /// The commit every read asks for, once known.
    commit: Mutex<Option<String>>,
    /// `HF_HUB_OFFLINE`: only the cache is read; a file it lacks does not exist.
    offline: bool,
}

impl fmt::Debug for HubStorage {
    // the token is never printed
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubStorage")
            .field("repo", &self.repo)
            .field("endpoint", &self.endpoint.as_str())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

fn unsupported(what: &str) -> StorageError {
    StorageError::new(
        format!(
            "Hugging Face Hub repositories are read-only here: cannot {what} (write the output to a local folder or s3:// instead)"
        ),
        false,
    )
}

impl HubStorage {
    /// A store for `repo`, configured from `HF_ENDPOINT`, `HF_TOKEN` and the cache variables.
    pub(crate) fn from_env(repo: RepoId) -> SResult<HubStorage> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        let mut s = Self::new(repo, &endpoint, token, cache_dir())?;
        s.offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Ok(s)
    }

    pub fn new(
        repo: RepoId,
        endpoint: &str,
        token: Option<String>,
        cache_root: Option<PathBuf>,
    ) -> SResult<HubStorage> {
        let endpoint = Url::parse(endpoint.trim_end_matches('/')).map_err(|e| {
            StorageError::new(
                format!("HF_ENDPOINT `{endpoint}` is not a URL ({e}); set it like https://huggingface.co"),
                false,
            )
        })?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| StorageError::new(format!("HTTP client: {e}"), false))?;
        let cache = cache_root.map(|c| c.join(format!("models--{}--{}", repo.org, repo.name)));
        let commit = is_commit(&repo.revision).then(|| repo.revision.clone());
        Ok(HubStorage {
            repo,
            endpoint,
            token,
            client,
            cache,
            commit: Mutex::new(commit),
            offline: false,
        })
    }

    fn pinned(&self) -> Option<String> {
        self.commit.lock().ok().and_then(|c| c.clone())
    }

    fn pin(&self, commit: &str) {
        if let Ok(mut c) = self.commit.lock() {
            if c.is_none() && is_commit(commit) {
                *c = Some(commit.to_string());
            }
        }
    }

    fn resolve_url(&self, file: &str) -> SResult<Url> {
        if !safe_file(file) {
            return Err(StorageError::new(
                format!(
                    "{}/{file}: not a file name inside a repository",
                    self.scheme_root()
                ),
                false,
            ));
        }
        let rev = self.pinned().unwrap_or_else(|| self.repo.revision.clone());
        let mut u = self.endpoint.clone();
        {
            let mut segs = u.path_segments_mut().map_err(|_| {
                StorageError::new(
                    format!("HF_ENDPOINT {} cannot take a path", self.endpoint),
                    false,
                )
            })?;
            segs.pop_if_empty();
            segs.push(&self.repo.org)
                .push(&self.repo.name)
                .push("resolve");
            // a revision like refs/pr/1 is one path segment, percent-encoded
            segs.push(&rev);
            for s in file.split('/') {
                segs.push(s);
            }
        }
        Ok(u)
    }

    /// Sends `method` to the resolve URL of `file`, following redirects by hand (the `Range`
    /// header goes with every hop; the token only to the endpoint's own host). Returns the
    /// final answer; pins the commit from the first answer's `X-Repo-Commit`.
    async fn send(
        &self,
        method: Method,
        file: &str,
        range: Option<&Range<u64>>,
    ) -> SResult<(reqwest::Response, HeaderMap)> {
        let mut url = self.resolve_url(file)?;
        let mut first: Option<HeaderMap> = None;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.client.request(method.clone(), url.clone());
            if let Some(r) = range {
                req = req.header(RANGE, format!("bytes={}-{}", r.start, r.end - 1));
            }
            if let Some(t) = &self.token {
                if same_origin(&url, &self.endpoint) {
                    req = req.header(AUTHORIZATION, format!("Bearer {t}"));
                }
            }
            let resp = req.send().await.map_err(|e| {
                // the error names the URL, which never carries the token
                StorageError::new(
                    format!("{}/{file}: HTTP request failed: {e}", self.scheme_root()),
                    true,
                )
            })?;
            if first.is_none() {
                if let Some(c) = resp.headers().get("x-repo-commit") {
                    if let Ok(c) = c.to_str() {
                        self.pin(c);
                    }
                }
                first = Some(resp.headers().clone());
            }
            if resp.status().is_redirection() {
                let loc = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| {
                        StorageError::new(
                            format!("{}/{file}: redirect without a Location", self.scheme_root()),
                            false,
                        )
                    })?;
                url = url.join(loc).map_err(|e| {
                    StorageError::new(
                        format!("{}/{file}: bad redirect `{loc}`: {e}", self.scheme_root()),
                        false,
                    )
                })?;
                continue;
            }
            return Ok((resp, first.unwrap_or_default()));
        }
        Err(StorageError::new(
            format!(
                "{}/{file}: more than {MAX_REDIRECTS} redirects",
                self.scheme_root()
            ),
            false,
        ))
    }

    fn status_error(&self, file: &str, status: StatusCode, headers: &HeaderMap) -> StorageError {
        let what = format!("{}/{file}", self.scheme_root());
        let code = headers
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match status {
            StatusCode::NOT_FOUND if code == "RepoNotFound" || code == "GatedRepo" => {
                StorageError::new(
                    format!(
                        "{what}: repository not found or not accessible ({code}); check the id, or set HF_TOKEN for a private or gated repository"
                    ),
                    false,
                )
            }
            StatusCode::NOT_FOUND => StorageError::not_found(format!("{what}: no such file")),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => StorageError::new(
                format!(
                    "{what}: access refused ({status}); set HF_TOKEN to a token that can read this repository"
                ),
                false,
            ),
            s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                StorageError::new(format!("{what}: HTTP {s}"), true)
            }
            s => StorageError::new(format!("{what}: unexpected HTTP {s}"), false),
        }
    }

    async fn get_range(&self, file: &str, range: Range<u64>) -> SResult<Bytes> {
        let want = range.end - range.start;
        let (resp, first) = self.send(Method::GET, file, Some(&range)).await?;
        let status = resp.status();
        if status == StatusCode::OK {
            return Err(StorageError::new(
                format!(
                    "{}/{file}: the server answered a range request with the whole file (HTTP 200); refusing to stream it (use a server or proxy that honours Range)",
                    self.scheme_root()
                ),
                false,
            ));
        }
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Err(StorageError::new(
                format!(
                    "{}/{file}: bytes {}..{} are past the end of the file (truncated?)",
                    self.scheme_root(),
                    range.start,
                    range.end
                ),
                false,
            ));
        }
        if status != StatusCode::PARTIAL_CONTENT {
            let mut h = first;
            h.extend(resp.headers().clone());
            return Err(self.status_error(file, status, &h));
        }
        let body = resp.bytes().await.map_err(|e| {
            StorageError::new(
                format!("{}/{file}: reading the answer: {e}", self.scheme_root()),
                true,
            )
        })?;
        if body.len() as u64 != want {
            return Err(StorageError::new(
                format!(
                    "{}/{file}: asked for {want} bytes at {}, got {}",
                    self.scheme_root(),
                    range.start,
                    body.len()
                ),
                true,
            ));
        }
        Ok(body)
    }
}

/// A file name inside a repository: relative, no `.`/`..`/empty segments, no backslash.
fn safe_file(file: &str) -> bool {
    !file.is_empty()
        && !file.contains('\\')
        && file
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// The total size from `Content-Range: bytes a-b/TOTAL`.
fn content_range_total(h: &HeaderMap) -> Option<u64> {
    let v = h.get(CONTENT_RANGE)?.to_str().ok()?;
    v.rsplit_once('/')?.1.trim().parse().ok()
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

#[async_trait]
impl Storage for HubStorage {
    fn scheme_root(&self) -> String {
        let rev = self.pinned().unwrap_or_else(|| self.repo.revision.clone());
        RepoId {
            revision: rev,
            ..self.repo.clone()
        }
        .uri()
    }

    async fn size(&self, path: &str) -> SResult<u64> {
        if let Some(p) = self.cached(path) {
            return std::fs::metadata(&p)
                .map(|m| m.len())
                .map_err(|e| StorageError::new(format!("{}: {e}", p.display()), false));
        }
        if let Some(e) = self.known_absent(path) {
            return Err(e);
        }
        let (resp, first) = self.send(Method::HEAD, path, None).await?;
        let status = resp.status();
        if !status.is_success() {
            let mut h = first;
            h.extend(resp.headers().clone());
            return Err(self.status_error(path, status, &h));
        }
        header_u64(&first, "x-linked-size")
            .or_else(|| content_range_total(resp.headers()))
            .or_else(|| header_u64(resp.headers(), CONTENT_LENGTH.as_str()))
            .ok_or_else(|| {
                StorageError::new(
                    format!(
                        "{}/{path}: the server gave no size (no Content-Length)",
                        self.scheme_root()
                    ),
                    false,
                )
            })
    }

    async fn exists(&self, path: &str) -> SResult<bool> {
        match self.size(path).await {
            Ok(_) => Ok(true),
            Err(e) if e.not_found => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn read_range(&self, path: &str, range: Range<u64>) -> SResult<Bytes> {
        if range.end <= range.start {
            return Ok(Bytes::new());
        }
        if let Some(p) = self.cached(path) {
            let p = p.to_string_lossy().into_owned();
            return tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&p)
                    .map_err(|e| StorageError::new(format!("{p}: open: {e}"), false))?;
                super::local::read_exact_range(&f, &p, range).map(Bytes::from)
            })
            .await
            .map_err(|e| StorageError::new(format!("I/O task failed: {e}"), true))?;
        }
        if let Some(e) = self.known_absent(path) {
            return Err(e);
        }
        self.get_range(path, range).await
    }

    async fn read_all(&self, path: &str) -> SResult<Bytes> {
        if let Some(p) = self.cached(path) {
            return std::fs::read(&p)
                .map(Bytes::from)
                .map_err(|e| StorageError::new(format!("{}: {e}", p.display()), false));
        }
        if let Some(e) = self.known_absent(path) {
            return Err(e);
        }
        let (resp, first) = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let mut h = first;
            h.extend(resp.headers().clone());
            return Err(self.status_error(path, status, &h));
        }
        resp.bytes().await.map_err(|e| {
            StorageError::new(
                format!("{}/{path}: reading the answer: {e}", self.scheme_root()),
                true,
            )
        })
    }

    async fn put(&self, path: &str, _data: Bytes) -> SResult<()> {
        Err(unsupported(&format!("write {path}")))
    }

    async fn list(&self, dir: &str) -> SResult<Vec<String>> {
        Err(unsupported(&format!("list {dir}")))
    }

    async fn delete(&self, path: &str) -> SResult<()> {
        Err(unsupported(&format!("delete {path}")))
    }

    async fn begin_upload(&self, path: &str, _size: u64) -> SResult<Upload> {
        Err(unsupported(&format!("write {path}")))
    }

    async fn write_part(
        &self,
        upload: &Upload,
        _part_index: u32,
        _offset: u64,
        _data: Bytes,
    ) -> SResult<Receipt> {
        Err(unsupported(&format!("write {}", upload.path)))
    }

    async fn finish_upload(&self, upload: &Upload, _parts: &[Receipt]) -> SResult<()> {
        Err(unsupported(&format!("write {}", upload.path)))
    }

    async fn abort_upload(&self, upload: &Upload) -> SResult<()> {
        Err(unsupported(&format!("write {}", upload.path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_urls_and_pin() {
        let s = HubStorage::new(
            RepoId::parse("org/name@refs/pr/1").unwrap(),
            "http://127.0.0.1:9/",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            s.resolve_url("sub/model.safetensors").unwrap().as_str(),
            "http://127.0.0.1:9/org/name/resolve/refs%2Fpr%2F1/sub/model.safetensors"
        );
        assert!(s.resolve_url("../x").is_err());
        let c = "0123456789abcdef0123456789abcdef01234567";
        s.pin(c);
        assert_eq!(s.scheme_root(), format!("hf://org/name@{c}"));
        assert!(format!("{s:?}").contains("token: None"));
    }

    #[test]
    fn token_is_not_printed() {
        let s = HubStorage::new(
            RepoId::parse("org/name").unwrap(),
            "http://127.0.0.1:9",
            Some("hf_secret".into()),
            None,
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hf_secret"));
    }
}
