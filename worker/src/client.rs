//! A remote work source: the coordinator's gRPC service. Worker processes run the same loop
//! (`pull::run`) as embedded mode over this client.
//!
//! The channel is lazy and reconnects by itself; calls that fail at the transport (the
//! coordinator restarting, a dropped connection) are retried with exponential backoff, so a
//! worker rides out a coordinator blip instead of dying.
//!
//! Every client of the coordinator (workers, `submit`, `status`, `cancel`) connects through
//! [`connect`] with its [`ClientOptions`]: a bearer token sent on every call, and TLS for
//! `https://` URLs (the server verified against the system roots or a given CA; optionally a
//! client certificate for mutual TLS). An `https://` URL never falls back to plain text.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use shardmerge_proto as pb;
use shardmerge_proto::coordinator_client::CoordinatorClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::pull::{SourceError, WorkSource};

pub use shardmerge_proto::MAX_MESSAGE;

/// Normalises a coordinator address: `host:port` becomes `http://host:port`.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// A secret token. Its `Debug` and `Display` never show it; it is compared in constant time.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from its text; leading and trailing white space is dropped. `what` names where
    /// it came from in errors (never the token itself).
    pub fn new(text: &str, what: &str) -> Result<Token, String> {
        let t = text.trim();
        if t.len() < 16 {
            return Err(format!(
                "{what}: the token is {} (it must be at least 16 characters; e.g. `openssl rand -hex 32 > FILE`)",
                if t.is_empty() { "empty".to_string() } else { "too short".to_string() }
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{what}: the token may hold only visible ASCII characters, without spaces (e.g. `openssl rand -hex 32 > FILE`)"
            ));
        }
        Ok(Token(Arc::from(t)))
    }

    /// Reads a token file (one token; surrounding white space is ignored).
    pub fn from_file(path: &Path) -> Result<Token, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the token file: {e}", path.display()))?;
        Token::new(&text, &path.display().to_string())
    }

    /// The token's text, for the `authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that depends only on the lengths.
    pub fn matches(&self, presented: &[u8]) -> bool {
        ct_eq(self.0.as_bytes(), presented)
    }
}

/// Constant-time equality: the time taken depends on the lengths only, never on where the
/// bytes first differ.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(std::hint::black_box(x ^ y));
    }
    std::hint::black_box(diff) == 0
}

/// How a client authenticates to the coordinator and verifies it.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Sent as `authorization: Bearer TOKEN` on every call.
    pub token: Option<Token>,
    /// PEM of the CA(s) that sign the coordinator's certificate; `None`: the system roots.
    pub tls_ca: Option<Vec<u8>>,
    /// PEM certificate and key of this client, for a coordinator that requires mutual TLS.
    pub tls_identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientOptions {
    /// Options from the command line's files: `--token-file` (else `SHARDMERGE_TOKEN`, a token
    /// given directly), `--tls-ca`, `--tls-client-cert` + `--tls-client-key`.
    pub fn load(
        token_file: Option<&Path>,
        tls_ca: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> Result<ClientOptions, String> {
        let token = match token_file {
            Some(p) => Some(Token::from_file(p)?),
            None => match std::env::var("SHARDMERGE_TOKEN") {
                Ok(t) if !t.is_empty() => Some(Token::new(&t, "SHARDMERGE_TOKEN")?),
                _ => None,
            },
        };
        let read = |p: &Path, what: &str| {
            std::fs::read(p).map_err(|e| format!("{}: cannot read the {what}: {e}", p.display()))
        };
        let tls_ca = tls_ca
            .map(|p| read(p, "CA certificate (--tls-ca)"))
            .transpose()?;
        let tls_identity = match (client_cert, client_key) {
            (Some(c), Some(k)) => Some((
                read(c, "client certificate (--tls-client-cert)")?,
                read(k, "client key (--tls-client-key)")?,
            )),
            (None, None) => None,
            _ => {
                return Err(
                    "--tls-client-cert and --tls-client-key go together: give both or neither"
                        .into(),
                )
            }
        };
        Ok(ClientOptions {
            token,
            tls_ca,
            tls_identity,
        })
    }
}

/// Adds `authorization: Bearer TOKEN` to every call (when there is a token).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    fn new(token: Option<&Token>) -> Result<Bearer, String> {
        let Some(t) = token else {
            return Ok(Bearer(None));
        };
        let mut v: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", t.expose()))
                .map_err(|_| "the token holds characters a header cannot carry".to_string())?;
        v.set_sensitive(true);
        Ok(Bearer(Some(v)))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of the coordinator: the channel, with the bearer token added to each call.
pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// A lazily connected channel to `url` (the first call connects): TLS for `https://`.
pub(crate) fn channel_with(url: &str, o: &ClientOptions) -> Result<Channel, String> {
    let url = normalize_url(url);
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err(format!(
            "{url}: not a coordinator URL; use http://HOST:PORT, or https://HOST:PORT for a coordinator with TLS"
        ));
    }
    let mut ep = Endpoint::from_shared(url.clone())
        .map_err(|e| format!("{url}: not a valid coordinator URL ({e}); use http://HOST:PORT"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if https {
        let mut tls = ClientTlsConfig::new().timeout(Duration::from_secs(10));
        tls = match &o.tls_ca {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &o.tls_identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(tls).map_err(|e| {
            format!("{url}: cannot set up TLS ({e}); check --tls-ca and the client certificate")
        })?;
    } else if o.tls_ca.is_some() || o.tls_identity.is_some() {
        return Err(format!(
            "{url}: TLS options were given but the URL is plain http://; use https://"
        ));
    }
    Ok(ep.connect_lazy())
}

/// A lazily connected channel to `url` without token or client certificate.
pub fn channel(url: &str) -> Result<Channel, String> {
    channel_with(url, &ClientOptions::default())
}

/// A client for `url` with the message limits the coordinator uses and the token of `o`.
pub fn connect(url: &str, o: &ClientOptions) -> Result<Client, String> {
    Ok(
        CoordinatorClient::with_interceptor(channel_with(url, o)?, Bearer::new(o.token.as_ref())?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
}

/// A client for `url` without token or client certificate.
pub fn client(url: &str) -> Result<Client, String> {
    connect(url, &ClientOptions::default())
}

/// Whether a failed call may succeed when tried again (the coordinator is unreachable or
/// restarting), as opposed to a refusal.
pub fn is_transport(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// Whether a failed call was refused for who the caller is (no token, a wrong token, a token
/// without the right): trying again cannot help.
pub(crate) fn is_refusal(s: &Status) -> bool {
    matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied)
}

/// What broke under a failed call, from the typed errors in its source chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broken {
    /// TLS failed (rustls' error: an unknown CA, a name mismatch, a refused client
    /// certificate, a peer that does not speak TLS).
    Tls,
    /// The peer's bytes were not HTTP/2 (h2 found an error in them): a plain-text client of a
    /// TLS server sees the server's TLS records.
    NotHttp2,
    Other,
}

fn broken(s: &Status) -> Broken {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(s);
    while let Some(e) = src {
        // rustls' error travels inside an io::Error, whose `source` skips it
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        if e.is::<rustls::Error>() || inner.is_some_and(|i| i.is::<rustls::Error>()) {
            return Broken::Tls;
        }
        // an HTTP/2 error h2 itself found in what the peer sent (a TLS record read as a frame
        // header is a frame-size or protocol error), not a reset the peer chose to send
        if e.downcast_ref::<h2::Error>()
            .is_some_and(h2::Error::is_library)
        {
            return Broken::NotHttp2;
        }
        src = e.source();
    }
    Broken::Other
}

/// Describes a failed call for a person: names the coordinator when it is unreachable.
pub fn describe(url: &str, s: &Status) -> String {
    let url = normalize_url(url);
    let msg = transport_message(s);
    let broken = broken(s);
    if is_transport(s) || broken == Broken::NotHttp2 {
        if broken == Broken::Tls {
            return format!(
                "TLS with coordinator {url} failed ({msg}); check --tls-ca (the CA that signed the \
                 coordinator's certificate), that the certificate names the URL's host and, for \
                 mutual TLS, --tls-client-cert/--tls-client-key"
            );
        }
        let hint = if url.starts_with("http://") {
            "; if it serves TLS, use an https:// URL"
        } else {
            ""
        };
        format!(
            "coordinator {url} unreachable ({msg}); check that `shardmerge coordinator` runs there and the address is right{hint}"
        )
    } else {
        s.message().to_string()
    }
}

/// A transport failure's message with its causes (tonic puts the useful part, e.g. a TLS
/// certificate error, in the source chain).
fn transport_message(s: &Status) -> String {
    let mut msg = s.message().to_string();
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        let m = e.to_string();
        if !msg.contains(&m) {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        src = e.source();
    }
    msg
}

/// The coordinator as a work source for `pull::run`.
#[derive(Clone)]
pub struct RemoteSource {
    url: String,
    client: Client,
    /// How long report calls (complete, fail) keep retrying a lost coordinator.
    report_patience: Duration,
    /// The first refusal (no or wrong token, a token without the right): the worker cannot
    /// work with this coordinator and should stop, saying why.
    refused: Arc<Mutex<Option<String>>>,
    refused_tx: Arc<tokio::sync::Notify>,
}

impl RemoteSource {
    pub fn new(url: &str) -> Result<Self, String> {
        Self::with_options(url, &ClientOptions::default())
    }

    pub fn with_options(url: &str, o: &ClientOptions) -> Result<Self, String> {
        Ok(RemoteSource {
            url: normalize_url(url),
            client: connect(url, o)?,
            report_patience: Duration::from_secs(60),
            refused: Arc::default(),
            refused_tx: Arc::default(),
        })
    }

    /// Resolves with the reason once the coordinator refused this worker's credentials.
    pub async fn refused(&self) -> String {
        loop {
            let wait = self.refused_tx.notified();
            if let Some(r) = self.refused.lock().ok().and_then(|r| r.clone()) {
                return r;
            }
            wait.await;
        }
    }

    /// Runs `call` until it succeeds, fails with a non-transport error, or `patience` is spent.
    async fn retry<T, F, Fut>(
        &self,
        what: &str,
        patience: Duration,
        call: F,
    ) -> Result<T, SourceError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match call(self.client.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if is_transport(&s) && start.elapsed() + backoff < patience => {
                    tracing::debug!("{what}: {}; retrying in {backoff:?}", s.message());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(s) => {
                    let message = format!("{what}: {}", describe(&self.url, &s));
                    if is_refusal(&s) {
                        if let Ok(mut r) = self.refused.lock() {
                            r.get_or_insert_with(|| message.clone());
                        }
                        self.refused_tx.notify_waiters();
                    }
                    return Err(source_error(&s, message));
                }
            }
        }
    }
}

/// The typed error of a call that failed with `s`, described by `message`.
fn source_error(s: &Status, message: String) -> SourceError {
    if is_refusal(s) {
        SourceError::Refused {
            code: s.code(),
            message,
        }
    } else if is_transport(s) || broken(s) == Broken::NotHttp2 {
        SourceError::Unreachable { message }
    } else {
        SourceError::Rejected {
            code: s.code(),
            message,
        }
    }
}

#[async_trait]
impl WorkSource for RemoteSource {
    async fn poll(&self, req: pb::PollWorkRequest) -> Result<pb::PollWorkResponse, SourceError> {
        // the worker loop backs off between failed polls
        self.retry("poll", Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.poll_work(req).await }
        })
        .await
    }

    async fn renew(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, SourceError> {
        self.retry("renew", Duration::from_secs(2), |mut c| {
            let req = req.clone();
            async move { c.renew_lease(req).await }
        })
        .await
    }

    async fn complete(
        &self,
        req: pb::CompleteTaskRequest,
    ) -> Result<pb::CompleteTaskResponse, SourceError> {
        self.retry("complete", self.report_patience, |mut c| {
            let req = req.clone();
            async move { c.complete_task(req).await }
        })
        .await
    }

    async fn fail(&self, req: pb::FailTaskRequest) -> Result<(), SourceError> {
        self.retry("fail", self.report_patience, |mut c| {
            let req = req.clone();
            async move { c.fail_task(req).await }
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed call is an error a caller can match (retry, stop, give up), with its gRPC code
    /// and the message a person reads unchanged.
    #[test]
    fn failed_calls_are_typed_by_what_a_caller_can_do() {
        let e = |s: Status| source_error(&s, format!("poll: {}", s.message()));
        let down = e(Status::unavailable("connection refused"));
        assert!(matches!(down, SourceError::Unreachable { .. }) && down.is_retryable());
        assert_eq!(
            (down.code(), down.to_string()),
            (Code::Unavailable, "poll: connection refused".to_string())
        );
        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            let r = e(Status::new(code, "no token"));
            assert!(matches!(r, SourceError::Refused { .. }) && !r.is_retryable());
            assert_eq!(r.code(), code);
        }
        let bad = e(Status::invalid_argument("unknown lease"));
        assert!(matches!(bad, SourceError::Rejected { .. }) && !bad.is_retryable());
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert_eq!(bad.to_string(), "poll: unknown lease");
    }
}
