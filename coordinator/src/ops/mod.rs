//! The coordinator as operated: the standard gRPC health service (`grpc.health.v1`) next to
//! the `Coordinator` service, and its Prometheus metrics.
//!
//! The metrics come from two places, neither of them the job code:
//! - the gRPC service layer ([`Metered`] wraps the `Coordinator` service): leases handed out by
//!   PollWork, results accepted or rejected by CompleteTask, FailTask reports, renewals that
//!   find their lease lost, leases that run out without a report, workers seen;
//! - the job manager's status snapshots (`JobManager::list`) at scrape time: jobs by state,
//!   tasks queued and leased, bytes planned and written.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use shardmerge_proto as pb;
use shardmerge_proto::coordinator_server::{Coordinator, CoordinatorServer};
use shardmerge_worker::metrics::{self as wm, Endpoint};
use tonic::{Request, Response, Status};

use crate::auth::Authed;
use crate::error::Error;
use crate::job::JobManager;
use crate::server::{error_chain, Security, Service, MAX_MESSAGE};

mod inputs;
mod metered;
mod metrics;

pub use metered::Metered;
pub use metrics::CoordinatorMetrics;

static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`say`] write JSON objects (`--log-format json`).
pub fn set_json_logs() {
    JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// A service's lifecycle line (listening, resumed, shutting down) on stderr: plain text, or
/// with `--log-format json` one JSON object like the log events', whatever `RUST_LOG` says.
pub fn say(msg: String) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let line = serde_json::json!({
            "timestamp": ts,
            "level": "INFO",
            "target": "shardmerge",
            "message": msg,
        });
        eprintln!("{line}");
    } else {
        eprintln!("{msg}");
    }
}

/// The gRPC service name of the coordinator, as the health service reports it.
pub const SERVICE_NAME: &str = "shardmerge.v1.Coordinator";

/// The connections `listener` accepts, with TCP_NODELAY: the builder's `tcp_nodelay` applies
/// only to listeners tonic binds itself, and without it Nagle's algorithm held replies back
/// behind the client's delayed ACK whenever calls overlapped on a connection (tens of ms per
/// RPC; a 64-slot fleet got a few hundred completions per second).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves the coordinator, its health service and (with `metrics_listen`) its metrics on
/// `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mgr: Arc<JobManager>,
    lease_ttl: Duration,
    security: Security,
    metrics_listen: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let metrics = CoordinatorMetrics::new(mgr.clone(), lease_ttl);
    if let Some(addr) = metrics_listen {
        let l = wm::bind(addr).await.map_err(|e| Error::usage("", e))?;
        let at = l.local_addr().unwrap_or(addr);
        say(format!(
            "shardmerge coordinator: metrics on http://{at}/metrics"
        ));
        tokio::spawn(wm::serve(l, metrics.clone()));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    let svc = CoordinatorServer::new(Metered {
        inner: Service::with_policy(mgr, security.policy),
        metrics,
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = security.tls {
        builder = builder.tls_config(tls).map_err(|e| {
            Error::usage(
                "--tls-cert/--tls-key",
                format!(
                    "{} (give a PEM certificate chain and its PEM private key)",
                    error_chain(&e)
                ),
            )
        })?;
    }
    let incoming = incoming(listener);
    // the health service stays open for probes; every Coordinator RPC passes the token check
    builder
        .add_service(health_service)
        .add_service(Authed::new(svc, security.auth))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::usage("", format!("coordinator server: {}", error_chain(&e))))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    /// Every connection the coordinator accepts has TCP_NODELAY set.
    #[tokio::test]
    async fn accepted_connections_have_tcp_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("TCP_NODELAY readable"));
    }
}
