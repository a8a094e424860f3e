//! A remote work source: the coordinator's gRPC service. Worker processes run the same loop
//! (`pull::run`) as embedded mode over this client.
//!
//! The channel is lazy and reconnects by itself; calls that fail at the transport (the
//! coordinator restarting, a dropped connection) are retried with exponential backoff, so a
//! worker rides out a coordinator blip instead of dying.

use std::time::Duration;

use async_trait::async_trait;
use shardmerge_proto as pb;
use shardmerge_proto::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::pull::WorkSource;

pub use shardmerge_proto::MAX_MESSAGE;

/// Normalises a coordinator address: `host:port` becomes `http://host:port`.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// A lazily connected channel to `url`; the first call connects.
pub fn channel(url: &str) -> Result<Channel, String> {
    let url = normalize_url(url);
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|e| format!("{url}: not a valid coordinator URL ({e}); use http://HOST:PORT"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(ep.connect_lazy())
}

/// A client for `url` with the message limits the coordinator uses.
pub fn client(url: &str) -> Result<CoordinatorClient<Channel>, String> {
    Ok(CoordinatorClient::new(channel(url)?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Whether a failed call may succeed when tried again (the coordinator is unreachable or
/// restarting), as opposed to a refusal.
pub fn is_transport(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// Describes a failed call for a person: names the coordinator when it is unreachable.
pub fn describe(url: &str, s: &Status) -> String {
    if is_transport(s) {
        format!(
            "coordinator {} unreachable ({}); check that `shardmerge coordinator` runs there and the address is right",
            normalize_url(url),
            s.message()
        )
    } else {
        s.message().to_string()
    }
}

/// The coordinator as a work source for `pull::run`.
#[derive(Clone)]
pub struct RemoteSource {
    url: String,
    client: CoordinatorClient<Channel>,
    /// How long report calls (complete, fail) keep retrying a lost coordinator.
    report_patience: Duration,
}

impl RemoteSource {
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(RemoteSource {
            url: normalize_url(url),
            client: client(url)?,
            report_patience: Duration::from_secs(60),
        })
    }

    /// Runs `call` until it succeeds, fails with a non-transport error, or `patience` is spent.
    async fn retry<T, F, Fut>(&self, what: &str, patience: Duration, call: F) -> Result<T, String>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
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
                Err(s) => return Err(format!("{what}: {}", describe(&self.url, &s))),
            }
        }
    }
}

#[async_trait]
impl WorkSource for RemoteSource {
    async fn poll(&self, req: pb::PollWorkRequest) -> Result<pb::PollWorkResponse, String> {
        // the worker loop backs off between failed polls
        self.retry("poll", Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.poll_work(req).await }
        })
        .await
    }

    async fn renew(&self, req: pb::RenewLeaseRequest) -> Result<pb::RenewLeaseResponse, String> {
        self.retry("renew", Duration::from_secs(2), |mut c| {
            let req = req.clone();
            async move { c.renew_lease(req).await }
        })
        .await
    }

    async fn complete(
        &self,
        req: pb::CompleteTaskRequest,
    ) -> Result<pb::CompleteTaskResponse, String> {
        self.retry("complete", self.report_patience, |mut c| {
            let req = req.clone();
            async move { c.complete_task(req).await }
        })
        .await
    }

    async fn fail(&self, req: pb::FailTaskRequest) -> Result<(), String> {
        self.retry("fail", self.report_patience, |mut c| {
            let req = req.clone();
            async move { c.fail_task(req).await }
        })
        .await
        .map(|_| ())
    }
}
