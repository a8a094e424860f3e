//! Who may call the coordinator: bearer tokens checked before any RPC runs.
//!
//! Two tokens, both optional:
//! - the main token (`--token-file`) grants every RPC;
//! - the worker token (`--worker-token-file`) grants only the worker RPCs (`PollWork`,
//!   `RenewLease`, `CompleteTask`, `FailTask`), so a worker's credential cannot submit, list,
//!   watch or cancel jobs.
//!
//! With a token configured every call must carry `authorization: Bearer TOKEN`; a missing or
//! wrong token is `Unauthenticated`, the worker token on another RPC is `PermissionDenied`.
//! Tokens are compared in constant time and never logged: refusals name the RPC and the peer.
//! The check wraps the `Coordinator` service only, so services added next to it (e.g. gRPC
//! health for probes) stay open.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use shardmerge_worker::client::Token;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::Status;

/// The gRPC path prefix of the coordinator's RPCs.
const PREFIX: &str = "/shardmerge.v1.Coordinator/";

/// The RPCs the worker token grants. Every other RPC (including ones added later) needs the
/// main token: the list fails closed.
pub const WORKER_RPCS: [&str; 4] = ["PollWork", "RenewLease", "CompleteTask", "FailTask"];

/// The coordinator's tokens. `Auth::none()` lets every caller in.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    main: Option<Token>,
    worker: Option<Token>,
}

impl Auth {
    /// No authentication: every caller may call every RPC.
    pub fn none() -> Auth {
        Auth::default()
    }

    /// `main` grants everything, `worker` the worker RPCs only. A worker token needs a main
    /// token (else the worker token would be the only barrier to the job RPCs), and the two
    /// must differ.
    pub fn new(main: Option<Token>, worker: Option<Token>) -> Result<Auth, String> {
        match (&main, &worker) {
            (None, Some(_)) => Err(
                "--worker-token-file needs --token-file too (the token for submit, status and cancel)"
                    .into(),
            ),
            (Some(m), Some(w)) if m.matches(w.expose().as_bytes()) => Err(
                "--token-file and --worker-token-file hold the same token; give workers their own"
                    .into(),
            ),
            _ => Ok(Auth { main, worker }),
        }
    }

    /// Whether calls must carry a token.
    pub(crate) fn enabled(&self) -> bool {
        self.main.is_some()
    }

    /// Checks one call: `path` is the gRPC path (`/shardmerge.v1.Coordinator/PollWork`),
    /// `authorization` the header's value, if any.
    pub fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), Status> {
        let Some(main) = &self.main else {
            return Ok(());
        };
        let rpc = path.strip_prefix(PREFIX).unwrap_or(path);
        let presented = authorization.and_then(bearer);
        let Some(presented) = presented else {
            return Err(Status::unauthenticated(format!(
                "{rpc}: this coordinator requires a token: give the client --token-file FILE \
                 (or set SHARDMERGE_TOKEN_FILE) with the token the coordinator was started with"
            )));
        };
        // both comparisons always run: the time does not say which token was tried
        let is_main = main.matches(presented);
        let is_worker = self.worker.as_ref().is_some_and(|w| w.matches(presented));
        if is_main {
            return Ok(());
        }
        if is_worker {
            if WORKER_RPCS.contains(&rpc) {
                return Ok(());
            }
            return Err(Status::permission_denied(format!(
                "{rpc}: the worker token grants only {}; use the coordinator's main token",
                WORKER_RPCS.join(", ")
            )));
        }
        Err(Status::unauthenticated(format!(
            "{rpc}: wrong token: this coordinator does not know the token given (check the \
             client's --token-file / SHARDMERGE_TOKEN_FILE)"
        )))
    }
}

/// The token of an `authorization: Bearer TOKEN` header value (scheme case-insensitive).
fn bearer(v: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let t = rest.trim_ascii();
    (!t.is_empty()).then_some(t)
}

/// How many refused calls are logged per [`REFUSAL_WINDOW`]; the rest are counted, and the
/// count is logged with the next refusal logged (a flood of bad calls cannot flood the log).
pub const REFUSALS_LOGGED: u32 = 10;
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// Refusal logs at a bounded rate: at most `per_window` lines per window, and a count of the
/// ones left out.
#[derive(Debug)]
pub struct Throttle {
    per_window: u32,
    window: Duration,
    state: Mutex<(Option<Instant>, u32, u64)>,
}

impl Throttle {
    pub fn new(per_window: u32, window: Duration) -> Throttle {
        Throttle {
            per_window,
            window,
            state: Mutex::new((None, 0, 0)),
        }
    }

    /// Whether to log an event at `now`: `Some((n, last))` to log it, with the `n` events left
    /// out before it, `last` when it is the window's last logged one.
    pub fn admit(&self, now: Instant) -> Option<(u64, bool)> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (start, logged, suppressed) = &mut *st;
        if start.is_none_or(|s| now.duration_since(s) >= self.window) {
            *start = Some(now);
            *logged = 0;
        }
        if *logged >= self.per_window {
            *suppressed += 1;
            return None;
        }
        *logged += 1;
        Some((std::mem::take(suppressed), *logged == self.per_window))
    }
}

/// What a refusal's log line adds about the ones not logged.
fn throttle_note(left_out: u64, last: bool) -> String {
    let window = REFUSAL_WINDOW.as_secs();
    let mut note = String::new();
    if left_out > 0 {
        note += &format!(" ({left_out} more refused calls were not logged before this one)");
    }
    if last {
        note += &format!(
            " (at most {REFUSALS_LOGGED} refusals are logged per {window}s: further ones are counted, and the count logged with the next)"
        );
    }
    note
}

/// A gRPC service behind the token check.
#[derive(Clone)]
pub struct Authed<S> {
    inner: S,
    auth: Arc<Auth>,
    throttle: Arc<Throttle>,
}

impl<S> Authed<S> {
    pub fn new(inner: S, auth: Auth) -> Self {
        Authed {
            inner,
            auth: Arc::new(auth),
            throttle: Arc::new(Throttle::new(REFUSALS_LOGGED, REFUSAL_WINDOW)),
        }
    }
}

impl<S: NamedService> NamedService for Authed<S> {
    const NAME: &'static str = S::NAME;
}

/// The caller's address, for refusal logs.
fn peer<B>(req: &http::Request<B>) -> String {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map_or_else(|| "unknown peer".to_string(), |a| a.to_string())
}

impl<S, B> Service<http::Request<B>> for Authed<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let authorization = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self.auth.check(req.uri().path(), authorization) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                // never the token: the RPC, the peer and the reason only; at a bounded rate
                if let Some((left_out, last)) = self.throttle.admit(Instant::now()) {
                    tracing::warn!(
                        rpc = req.uri().path(),
                        peer = %peer(&req),
                        code = ?status.code(),
                        "refused a call: {}{}",
                        if authorization.is_none() { "no token" } else { "wrong token or no right to this RPC" },
                        throttle_note(left_out, last)
                    );
                }
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn tok(s: &str) -> Token {
        Token::new(s, "test").expect("token")
    }

    const MAIN: &str = "main-token-0123456789abcdef";
    const WORKER: &str = "worker-token-0123456789abcdef";

    fn auth() -> Auth {
        Auth::new(Some(tok(MAIN)), Some(tok(WORKER))).expect("auth")
    }

    fn call(a: &Auth, rpc: &str, header: Option<&str>) -> Result<(), Code> {
        a.check(&format!("{PREFIX}{rpc}"), header.map(str::as_bytes))
            .map_err(|s| s.code())
    }

    #[test]
    fn refusals_are_logged_at_a_bounded_rate_with_a_count() {
        let t = Throttle::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let logged: Vec<Option<(u64, bool)>> = (0..6000).map(|_| t.admit(t0)).collect();
        assert_eq!(logged.iter().filter(|x| x.is_some()).count(), 3);
        let first = [Some((0, false)), Some((0, false)), Some((0, true)), None];
        assert_eq!(&logged[..4], &first);
        // the next window logs again, first with the count of those left out
        assert_eq!(t.admit(t0 + Duration::from_secs(61)), Some((5997, false)));
        assert_eq!(t.admit(t0 + Duration::from_secs(62)), Some((0, false)));
    }

    #[test]
    fn no_token_configured_lets_everyone_in() {
        assert_eq!(call(&Auth::none(), "SubmitJob", None), Ok(()));
    }

    #[test]
    fn main_token_grants_every_rpc() {
        let a = auth();
        for rpc in ["SubmitJob", "ListJobs", "CancelJob", "PollWork", "Unknown"] {
            assert_eq!(call(&a, rpc, Some(&format!("Bearer {MAIN}"))), Ok(()));
            assert_eq!(call(&a, rpc, Some(&format!("bearer  {MAIN} "))), Ok(()));
        }
    }

    #[test]
    fn missing_or_wrong_tokens_are_unauthenticated() {
        let a = auth();
        for h in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some(MAIN),
            Some("Basic bWFpbg=="),
            Some("Bearer main-token-0123456789abcdeX"),
            Some("Bearer main-token-0123456789abcdef0"),
        ] {
            assert_eq!(
                call(&a, "SubmitJob", h),
                Err(Code::Unauthenticated),
                "{h:?}"
            );
        }
    }

    #[test]
    fn worker_token_grants_only_worker_rpcs() {
        let a = auth();
        let h = format!("Bearer {WORKER}");
        for rpc in WORKER_RPCS {
            assert_eq!(call(&a, rpc, Some(&h)), Ok(()));
        }
        for rpc in [
            "SubmitJob",
            "GetJob",
            "ListJobs",
            "WatchJob",
            "CancelJob",
            "Other",
        ] {
            assert_eq!(call(&a, rpc, Some(&h)), Err(Code::PermissionDenied));
        }
    }

    #[test]
    fn refusals_never_echo_the_token() {
        let a = auth();
        let wrong = "Bearer secret-guess-0123456789abcdef";
        for h in [Some(wrong), Some(&format!("Bearer {WORKER}") as &str)] {
            let e = a
                .check(&format!("{PREFIX}SubmitJob"), h.map(str::as_bytes))
                .expect_err("refused");
            assert!(!e.message().contains("secret-guess"), "{}", e.message());
            assert!(!e.message().contains(WORKER), "{}", e.message());
        }
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(Auth::new(None, Some(tok(WORKER))).is_err());
        assert!(Auth::new(Some(tok(MAIN)), Some(tok(MAIN))).is_err());
        assert!(Token::new("short", "t").is_err());
        assert!(Token::new("has a space in it 0123456789", "t").is_err());
        assert!(!format!("{:?}", tok(MAIN)).contains(MAIN));
    }
}
