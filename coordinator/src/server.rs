//! The distributed coordinator: the gRPC `Coordinator` service over one `JobManager`.
//!
//! Every RPC delegates to the job manager that embedded mode uses in-process; this module only
//! translates messages and errors. No planning or arithmetic happens here.
//!
//! Around it: the token check (`auth`), TLS (`tls`) and, for submitted jobs, the path policy
//! (`policy`), which runs before the job manager touches storage.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use shardmerge_proto as pb;
use shardmerge_proto::coordinator_server::{Coordinator, CoordinatorServer};
use tonic::{Code, Request, Response, Status};

use crate::auth::Auth;
use crate::error::Error;
use crate::job::{JobManager, SubmitOptions};
use crate::policy::{Policy, Refusal};
use crate::progress::terminal;

pub use shardmerge_proto::MAX_MESSAGE;

pub struct Service {
    mgr: Arc<JobManager>,
    policy: Arc<Policy>,
}

impl Service {
    /// A service that accepts jobs on any path (`Policy::any()`); see [`Service::with_policy`].
    pub fn new(mgr: Arc<JobManager>) -> Self {
        Self::with_policy(mgr, Policy::any())
    }

    /// A service that refuses jobs whose inputs or output lie outside `policy`.
    pub(crate) fn with_policy(mgr: Arc<JobManager>, policy: Policy) -> Self {
        Service {
            mgr,
            policy: Arc::new(policy),
        }
    }

    pub fn into_server(self) -> CoordinatorServer<Service> {
        CoordinatorServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Refuses a job whose recipe or output lies outside the allowed prefixes.
    async fn check_paths(&self, recipe: &str, out: &str, o: &SubmitOptions) -> Result<(), Status> {
        match self.policy.check_job(recipe, out, &o.base_dir).await {
            Ok(()) => Ok(()),
            Err(Refusal::Recipe(e)) => Err(status_of(e)),
            Err(Refusal::Outside(msg)) => {
                tracing::warn!("refused a job: {msg}");
                Err(Status::permission_denied(msg))
            }
        }
    }

    /// The job manager's options for a submitted job: 0 means the default.
    pub(crate) fn submit_options(&self, o: &pb::JobOptions) -> SubmitOptions {
        SubmitOptions::from_proto(o)
    }
}

/// The gRPC status of an error: its code from the variant, its message the error's.
fn status_of(e: Error) -> Status {
    Status::new(code_of(&e), e.to_string())
}

fn code_of(e: &Error) -> Code {
    match e {
        Error::Recipe { .. } | Error::Input { .. } | Error::Plan { .. } => Code::InvalidArgument,
        Error::Kernel { pass: None, .. } => Code::InvalidArgument,
        Error::InputChanged { .. } => Code::FailedPrecondition,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::Storage(s) if s.not_found => Code::NotFound,
        Error::Storage(s) if s.retryable => Code::Unavailable,
        Error::Storage(_) => Code::FailedPrecondition,
        Error::Journal { .. } | Error::Rpc { .. } => Code::Unavailable,
        Error::Cancelled { .. } => Code::Cancelled,
        Error::Exhausted { .. } => Code::ResourceExhausted,
        Error::Kernel { .. } | Error::Job { .. } | Error::Commit { .. } | Error::Usage { .. } => {
            Code::Internal
        }
    }
}

fn no_job(id: &str) -> Status {
    Status::not_found(format!(
        "no job {id} on this coordinator (`shardmerge status` lists the jobs it knows)"
    ))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Service {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let r = req.into_inner();
        if r.output_uri.is_empty() {
            return Err(Status::invalid_argument("output_uri is empty"));
        }
        let opts = r.options.unwrap_or_default();
        if pb::Rng::try_from(opts.rng).is_err() {
            return Err(Status::invalid_argument(format!(
                "options.rng: unknown value {} (this coordinator knows mergekit = 0, counter = 1)",
                opts.rng
            )));
        }
        if r.more_points.len() >= crate::recipe::sweep::MAX_POINTS {
            return Err(Status::invalid_argument(format!(
                "{} points: a sweep has at most {}",
                r.more_points.len() + 1,
                crate::recipe::sweep::MAX_POINTS
            )));
        }
        let mut o = self.submit_options(&opts);
        // a job alone is cut for itself; the points of a sweep share their slots
        o.points = 1;
        // every point is a job of its own: all of them count against --max-jobs
        self.mgr.admit(r.more_points.len() + 1).map_err(status_of)?;
        let mut points = vec![(r.recipe_yaml.as_str(), r.output_uri.as_str())];
        points.extend(
            r.more_points
                .iter()
                .map(|p| (p.recipe_yaml.as_str(), p.output_uri.as_str())),
        );
        // the path policy first: nothing outside the allowed prefixes is looked at
        for (recipe, out) in &points {
            if out.is_empty() {
                return Err(Status::invalid_argument("a point's output_uri is empty"));
            }
            self.check_paths(recipe, out, &o).await?;
        }
        let jobs = if points.len() == 1 {
            vec![self.mgr.submit(points[0].0, points[0].1, &o).await]
        } else {
            match self.mgr.submit_grid(&points, &o).await {
                Ok(jobs) => jobs.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            }
        };
        let mut ids = Vec::with_capacity(jobs.len());
        for (j, (_, out)) in jobs.into_iter().zip(&points) {
            let (id, plan) = j.map_err(status_of)?;
            tracing::info!(
                job = %id,
                tensors = plan.tensors.len(),
                files = plan.files.len(),
                "submitted: {} bytes to write to {out}",
                plan.bytes_out(),
            );
            ids.push(id);
        }
        let id = ids.first().cloned().unwrap_or_default();
        let status = self.mgr.status(&id);
        let point_job_ids = if ids.len() > 1 { ids } else { Vec::new() };
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id,
            status,
            point_job_ids,
        }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = req.into_inner().job_id;
        self.mgr
            .status(&id)
            .map(Response::new)
            .ok_or_else(|| no_job(&id))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let mut jobs = self.mgr.list();
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        let Some(rx) = self.mgr.watch(&id) else {
            // a job that ended before this coordinator started (from its journal)
            let st = self.mgr.status(&id).ok_or_else(|| no_job(&id))?;
            let once: WatchStream = Box::pin(futures::stream::once(async move { Ok(st) }));
            return Ok(Response::new(once));
        };
        // Yields the current status, then one per change, and ends after a terminal state.
        let stream =
            futures::stream::unfold((rx, false, true), |(mut rx, done, first)| async move {
                if done {
                    return None;
                }
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let st = rx.borrow_and_update().clone();
                let end = terminal(&st);
                Some((Ok(st), (rx, end, false)))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = req.into_inner().job_id;
        let st = self.mgr.cancel(&id).await.ok_or_else(|| no_job(&id))?;
        match pb::JobState::try_from(st.state) {
            Ok(pb::JobState::Committing) => Err(Status::failed_precondition(format!(
                "job {id} is committing its checkpoint (every data file is written); it can no \
                 longer be cancelled: wait for it, then delete the output if unwanted"
            ))),
            _ => Ok(Response::new(st)),
        }
    }

    async fn poll_work(
        &self,
        req: Request<pb::PollWorkRequest>,
    ) -> Result<Response<pb::PollWorkResponse>, Status> {
        let req = req.into_inner();
        if let Some(job) = self.mgr.quarantined_in(&req.worker_id) {
            return Err(Status::permission_denied(format!(
                "worker {:?} is quarantined: an audit of job {job} found its results wrong; it \
                 gets no more work from this coordinator",
                req.worker_id
            )));
        }
        Ok(Response::new(self.mgr.poll_work(&req).await))
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        Ok(Response::new(self.mgr.renew(&req.into_inner())))
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let accepted = self.mgr.complete(&req.into_inner()).await;
        Ok(Response::new(pb::CompleteTaskResponse { accepted }))
    }

    async fn fail_task(
        &self,
        req: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        self.mgr.fail(&req.into_inner()).await;
        Ok(Response::new(pb::FailTaskResponse {}))
    }
}

/// Resolves when the process gets SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: until then the default action (death) applies,
/// and a `run` interrupted between creating its output files and waiting on its job died with
/// its `*.partial` files left behind.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let int = signal(SignalKind::interrupt()).ok();
        let term = signal(SignalKind::terminate()).ok();
        async move {
            let next = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            if int.is_none() && term.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                _ = next(int) => {}
                _ = next(term) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Who may call the coordinator, over what, and which storage its jobs may use.
#[derive(Clone, Debug)]
pub struct Security {
    pub auth: Auth,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    pub policy: Policy,
}

impl Security {
    /// No token, no TLS, any path: for tests and single-user setups on loopback.
    pub fn open() -> Security {
        Security {
            auth: Auth::none(),
            tls: None,
            policy: Policy::any(),
        }
    }
}

/// An error with its causes, one after the other.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Binds `addr` with a message that says what to do when it is taken.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::usage("--listen", format!(
            "cannot listen on {addr}: {e} (is another coordinator running? pick another --listen address)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use shardmerge_worker::storage::StorageError;
    use tonic::Code;

    use super::code_of;
    use crate::error::Error;

    /// The gRPC code follows the variant, never the message.
    #[test]
    fn codes_come_from_the_variants() {
        assert_eq!(code_of(&Error::recipe("k", "bad")), Code::InvalidArgument);
        assert_eq!(code_of(&Error::plan("t", "bad")), Code::InvalidArgument);
        assert_eq!(code_of(&Error::job("j", "failed")), Code::Internal);
        let missing = Error::Storage(StorageError::not_found("x: not found"));
        assert_eq!(code_of(&missing), Code::NotFound);
        let flaky = Error::Storage(StorageError::new("x: reset", true));
        assert_eq!(code_of(&flaky), Code::Unavailable);
        let full = Error::Exhausted {
            limit: "--max-jobs",
            reason: "full".into(),
        };
        assert_eq!(code_of(&full), Code::ResourceExhausted);
    }
}
