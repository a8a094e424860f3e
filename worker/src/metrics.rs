//! Operations endpoints: a Prometheus `/metrics` page and readiness/liveness checks over a
//! minimal HTTP/1.1 server, and the worker's own metrics.
//!
//! The worker's metrics are observed at its work source ([`MeteredSource`] wraps the source the
//! task loop pulls from): every task a worker leases ends in exactly one `complete` or `fail`
//! call, so counting there counts every task once without touching the loop or the kernels.
//!
//! The HTTP server answers `GET /metrics` (OpenMetrics text), `GET /ready` (200 once the
//! process is ready: for a worker, once it reached its coordinator recently; 503 otherwise) and
//! `GET /healthz` (200 while the process serves). Anything else is 404. One request per
//! connection; requests are read with a size and time limit, so a slow or hostile peer costs a
//! task and a few kilobytes, never more.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use shardmerge_proto as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pull::{SourceError, WorkSource};

/// What an operations endpoint serves: the metrics page and the readiness answer.
pub trait Endpoint: Send + Sync + 'static {
    /// The metrics page, OpenMetrics text.
    fn render(&self) -> String;
    /// Whether `/ready` answers 200.
    fn ready(&self) -> bool;
}

/// Binds `addr` for the operations endpoint, with a message that says what to do when taken.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!("--metrics-listen {addr}: cannot listen there: {e} (pick another address or port)")
    })
}

/// Serves `/metrics`, `/ready` and `/healthz` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, endpoint: Arc<dyn Endpoint>) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // out of file descriptors and the like: wait rather than spin
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn, &*endpoint)).await;
        });
    }
}

/// Largest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8 << 10;

async fn answer(mut conn: tokio::net::TcpStream, endpoint: &dyn Endpoint) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    match path {
        "/metrics" => {
            let body = endpoint.render();
            respond(
                &mut conn,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        "/ready" | "/readyz" => {
            if endpoint.ready() {
                respond(&mut conn, "200 OK", "text/plain", "ready\n").await
            } else {
                respond(
                    &mut conn,
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready\n",
                )
                .await
            }
        }
        "/healthz" | "/livez" => respond(&mut conn, "200 OK", "text/plain", "ok\n").await,
        _ => {
            respond(
                &mut conn,
                "404 Not Found",
                "text/plain",
                "not found: this endpoint serves /metrics, /ready and /healthz\n",
            )
            .await
        }
    }
}

async fn respond(
    conn: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// Encodes `registry` as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!("metrics: encoding failed: {e}");
    }
    out
}

/// The resident memory of this process in bytes (Linux; None elsewhere).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The kind of a task, a label value.
pub fn task_kind(t: &pb::Task) -> &'static str {
    match &t.kind {
        Some(pb::task::Kind::Write(_)) if t.audit => "audit",
        Some(pb::task::Kind::Write(_)) => "write",
        Some(pb::task::Kind::Stats(_)) => "stats",
        None => "unknown",
    }
}

/// The merge method of a task (its first tensor's), a label value; `header` for a task that
/// writes only a file header.
pub fn task_method(t: &pb::Task) -> String {
    let tensor = match &t.kind {
        Some(pb::task::Kind::Write(w)) => w.tensors.first().or_else(|| {
            w.segments.iter().find_map(|s| match &s.kind {
                Some(pb::segment::Kind::Rows(r)) => r.tensor.as_ref(),
                _ => None,
            })
        }),
        Some(pb::task::Kind::Stats(s)) => s.rows.as_ref().and_then(|r| r.tensor.as_ref()),
        None => None,
    };
    match tensor {
        Some(t) if !t.method.is_empty() => t.method.clone(),
        Some(_) => "unknown".into(),
        None => "header".into(),
    }
}

/// Buckets for task durations: 10 ms to about 80 s.
pub fn task_seconds_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.01, 2.0, 14)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub kind: String,
    pub outcome: String,
}

/// A worker's metrics.
pub struct WorkerMetrics {
    registry: Registry,
    tasks: Family<OutcomeLabels, Counter>,
    read_bytes: Counter,
    written_bytes: Counter,
    task_seconds: Family<KindLabels, Histogram>,
    slots_busy: Gauge,
    slot_memory: Gauge,
    slot_memory_in_use: Gauge,
    resident: Gauge,
    last_contact_ms: AtomicU64,
    start: Instant,
    /// Leases running now: when each started and its kind.
    running: Mutex<HashMap<String, (Instant, &'static str)>>,
}

/// How long after its last successful call to the coordinator a worker still reports ready.
pub(crate) const READY_WINDOW: Duration = Duration::from_secs(30);

impl WorkerMetrics {
    /// Metrics for a worker with `slots` task slots of `slot_memory` bytes each.
    pub fn new(slots: usize, slot_memory: u64) -> Arc<Self> {
        let mut registry = Registry::default();
        let tasks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "shardmerge_worker_tasks",
            "Tasks this worker finished, by kind (write, stats) and outcome (done: accepted; \
             rejected: the coordinator ignored the result, its lease had ended; failed)",
            tasks.clone(),
        );
        let read_bytes = Counter::default();
        registry.register(
            "shardmerge_worker_read_bytes",
            "Input bytes read by tasks this worker completed",
            read_bytes.clone(),
        );
        let written_bytes = Counter::default();
        registry.register(
            "shardmerge_worker_written_bytes",
            "Output bytes written by tasks this worker completed",
            written_bytes.clone(),
        );
        let task_seconds = Family::<KindLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(task_seconds_buckets())) as fn() -> Histogram,
        );
        registry.register(
            "shardmerge_worker_task_seconds",
            "Time from lease to report of each task, by kind",
            task_seconds.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let slots_g = gauge(&mut registry, "shardmerge_worker_slots", "Task slots");
        let slots_busy = gauge(
            &mut registry,
            "shardmerge_worker_slots_busy",
            "Task slots running a task now",
        );
        let slot_memory_g = gauge(
            &mut registry,
            "shardmerge_worker_slot_memory_bytes",
            "Memory budget of one slot (--memory-limit / --threads)",
        );
        let slot_memory_in_use = gauge(
            &mut registry,
            "shardmerge_worker_slot_memory_in_use_bytes",
            "Slot memory held by running tasks (busy slots x slot budget: the most they may use)",
        );
        let resident = gauge(
            &mut registry,
            "shardmerge_worker_resident_memory_bytes",
            "Resident memory of the worker process",
        );
        slots_g.set(slots as i64);
        slot_memory_g.set(i64::try_from(slot_memory).unwrap_or(i64::MAX));
        Arc::new(WorkerMetrics {
            registry,
            tasks,
            read_bytes,
            written_bytes,
            task_seconds,
            slots_busy,
            slot_memory: slot_memory_g,
            slot_memory_in_use,
            resident,
            last_contact_ms: AtomicU64::new(u64::MAX),
            start: Instant::now(),
            running: Mutex::new(HashMap::new()),
        })
    }

    fn contact(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_contact_ms.store(ms, Ordering::Relaxed);
    }

    fn leased(&self, lease: &pb::Lease) {
        let kind = lease.task.as_ref().map_or("unknown", task_kind);
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(lease.lease_id.clone(), (Instant::now(), kind));
        self.set_busy(running.len());
    }

    /// A lease ended with `outcome`; `bytes` (read, written) when its result was accepted.
    fn ended(&self, lease_id: &str, outcome: &str, bytes: Option<(u64, u64)>) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let started = running.remove(lease_id);
        self.set_busy(running.len());
        drop(running);
        let kind = started.map_or("unknown", |(_, k)| k);
        self.tasks
            .get_or_create(&OutcomeLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
        if let Some((at, _)) = started {
            self.task_seconds
                .get_or_create(&KindLabels { kind: kind.into() })
                .observe(at.elapsed().as_secs_f64());
        }
        if let Some((read, written)) = bytes {
            self.read_bytes.inc_by(read);
            self.written_bytes.inc_by(written);
        }
    }

    fn set_busy(&self, n: usize) {
        self.slots_busy.set(n as i64);
        let per = self.slot_memory.get();
        self.slot_memory_in_use.set(per.saturating_mul(n as i64));
    }
}

impl Endpoint for WorkerMetrics {
    fn render(&self) -> String {
        if let Some(b) = resident_bytes() {
            self.resident.set(i64::try_from(b).unwrap_or(i64::MAX));
        }
        encode(&self.registry)
    }

    /// Ready while the coordinator answered within [`READY_WINDOW`].
    fn ready(&self) -> bool {
        let last = self.last_contact_ms.load(Ordering::Relaxed);
        last != u64::MAX
            && (self.start.elapsed().as_millis() as u64).saturating_sub(last)
                < READY_WINDOW.as_millis() as u64
    }
}

/// A work source that records the worker's metrics of every call through it.
pub struct MeteredSource<S> {
    inner: S,
    metrics: Arc<WorkerMetrics>,
}

impl<S> MeteredSource<S> {
    pub fn new(inner: S, metrics: Arc<WorkerMetrics>) -> Self {
        MeteredSource { inner, metrics }
    }
}

#[async_trait]
impl<S: WorkSource> WorkSource for MeteredSource<S> {
    async fn poll(&self, req: pb::PollWorkRequest) -> Result<pb::PollWorkResponse, SourceError> {
        let r = self.inner.poll(req).await;
        if let Ok(resp) = &r {
            self.metrics.contact();
            for lease in &resp.leases {
                self.metrics.leased(lease);
            }
        }
        r
    }

    async fn renew(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, SourceError> {
        let r = self.inner.renew(req).await;
        if r.is_ok() {
            self.metrics.contact();
        }
        r
    }

    async fn complete(
        &self,
        req: pb::CompleteTaskRequest,
    ) -> Result<pb::CompleteTaskResponse, SourceError> {
        let lease_id = req.lease_id.clone();
        let bytes = req.result.as_ref().map(|r| (r.bytes_read, r.bytes_written));
        let r = self.inner.complete(req).await;
        match &r {
            Ok(resp) => {
                self.metrics.contact();
                if resp.accepted {
                    self.metrics.ended(&lease_id, "done", bytes);
                } else {
                    self.metrics.ended(&lease_id, "rejected", None);
                }
            }
            Err(_) => self.metrics.ended(&lease_id, "unreported", None),
        }
        r
    }

    async fn fail(&self, req: pb::FailTaskRequest) -> Result<(), SourceError> {
        let lease_id = req.lease_id.clone();
        let r = self.inner.fail(req).await;
        if r.is_ok() {
            self.metrics.contact();
        }
        self.metrics.ended(&lease_id, "failed", None);
        r
    }
}
