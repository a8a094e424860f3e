//! The `Coordinator` service wrapped so that the metrics see its calls: leases granted,
//! renewals, results accepted or rejected, failures, and the workers that call.

use super::*;

/// The `Coordinator` service with its calls observed for the metrics.
pub struct Metered {
    pub(super) inner: Service,
    pub(super) metrics: Arc<CoordinatorMetrics>,
}

#[tonic::async_trait]
impl Coordinator for Metered {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.inner.submit_job(req).await
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.inner.get_job(req).await
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.inner.list_jobs(req).await
    }

    type WatchJobStream = <Service as Coordinator>::WatchJobStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.inner.watch_job(req).await
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.inner.cancel_job(req).await
    }

    async fn poll_work(
        &self,
        req: Request<pb::PollWorkRequest>,
    ) -> Result<Response<pb::PollWorkResponse>, Status> {
        self.metrics.saw_worker(&req.get_ref().worker_id);
        let resp = self.inner.poll_work(req).await?;
        for lease in &resp.get_ref().leases {
            self.metrics.granted(lease);
        }
        Ok(resp)
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        self.metrics.saw_worker(&req.get_ref().worker_id);
        let r = req.get_ref().clone();
        let resp = self.inner.renew_lease(req).await?;
        self.metrics.renewed(&r, resp.get_ref());
        Ok(resp)
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        self.metrics.saw_worker(&req.get_ref().worker_id);
        let lease_id = req.get_ref().lease_id.clone();
        let result = req.get_ref().result.as_ref();
        let bytes = result.map(|r| (r.bytes_read, r.bytes_written));
        let stats = result.is_some_and(|r| r.stats.is_some());
        let resp = self.inner.complete_task(req).await?;
        self.metrics
            .completed(&lease_id, bytes, stats, resp.get_ref().accepted);
        Ok(resp)
    }

    async fn fail_task(
        &self,
        req: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        self.metrics.saw_worker(&req.get_ref().worker_id);
        self.metrics.failed(req.get_ref());
        self.inner.fail_task(req).await
    }
}
