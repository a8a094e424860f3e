//! Jobs that share their reads: the points of a sweep are jobs of their own (each with its
//! output, claim, uploads, journal record, audits and commit), linked so that each task of a
//! *leader* is leased together with the same task of its *riders*: the later points whose
//! tasks read exactly the same input rows. The points fall into groups by what they read, each
//! led by its first point (a grid that varies the method may cut its points two ways). The worker reads the rows once and
//! computes each rider from them (`Lease::riders`, the worker's `exec/group.rs`).
//!
//! The manager compares what tasks read (their cut: files, byte ranges, tensors' rows, and the
//! tensors' inputs), never what they compute: the points may differ in any parameter or
//! method. A rider job does not lease tasks on its own while its leader runs; once the leader
//! has ended or is committing (every one of its tasks is done), it leases what it has left
//! (a task that failed under a rider lease, say) like any job, reading those rows again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use shardmerge_proto as pb;

use super::lease::{Lease, LeaseRules, LeaseTable};
use super::{lock, tasks, Job, JobManager, SubmitOptions};
use crate::cut::{Cut, SegDef};
use crate::error::Result;
use crate::journal::Item;
use crate::plan::Plan;

/// Whether every task of `b` reads what the same task of `a` reads: the same cut (files,
/// byte ranges, segments' tensors and rows, statistics units), over tensors with the same
/// inputs. Literal bytes (headers) may differ.
pub(crate) fn same_reads(pa: &Plan, a: &Cut, pb: &Plan, b: &Cut) -> bool {
    let rows = |s: &SegDef| match s {
        SegDef::Literal(l) => (usize::MAX, l.len() as u64, 0, 0),
        SegDef::Rows {
            tensor,
            start,
            end,
            range_index,
        } => (*tensor, *start, *end, *range_index as u64),
    };
    let tasks = a.tasks.len() == b.tasks.len()
        && a.tasks.iter().zip(&b.tasks).all(|(x, y)| {
            (x.file, x.offset, x.length, x.segments.len())
                == (y.file, y.offset, y.length, y.segments.len())
                && x.segments.iter().map(rows).eq(y.segments.iter().map(rows))
        });
    let units = a.units.len() == b.units.len()
        && a.units
            .iter()
            .zip(&b.units)
            .all(|(x, y)| (x.tensor, &x.ranges) == (y.tensor, &y.ranges));
    let tensors = pa.tensors.len() == pb.tensors.len()
        && pa.tensors.iter().zip(&pb.tensors).all(|(x, y)| {
            (&x.shape, x.out_dtype, &x.inputs, &x.row_map)
                == (&y.shape, y.out_dtype, &y.inputs, &y.row_map)
        });
    tasks && units && tensors
}

impl JobManager {
    /// Submits the points of a grid (recipe, output) as jobs of their own, cut to share a
    /// slot (`SubmitOptions::points`), and links them ([`Self::link`]): no task of any runs
    /// before they are all linked. An error submitting one cancels those submitted before it.
    pub async fn submit_grid(
        &self,
        points: &[(&str, &str)],
        o: &SubmitOptions,
    ) -> Result<Vec<(String, Arc<Plan>)>> {
        let mut o = o.clone();
        o.points = u32::try_from(points.len().max(1)).unwrap_or(u32::MAX);
        let mut jobs: Vec<(String, Arc<Plan>)> = Vec::with_capacity(points.len());
        for (recipe, out) in points {
            let leader = jobs.first().map(|(id, _)| id.as_str());
            match self.submit_point(recipe, out, &o, leader).await {
                Ok(j) => jobs.push(j),
                Err(e) => {
                    for (jid, _) in &jobs {
                        self.cancel(jid).await;
                    }
                    return Err(e);
                }
            }
        }
        let ids: Vec<String> = jobs.iter().map(|(j, _)| j.clone()).collect();
        if let Some((lead, rest)) = ids.split_first() {
            let linked = self.link(lead, rest);
            tracing::info!(
                job = %lead,
                points = ids.len(),
                "grid: {linked} of {} other point(s) ride on an earlier point with the same cut, reading its rows",
                rest.len()
            );
        }
        Ok(jobs)
    }

    /// Links the points of a grid (see the module's comment): `first` and `others` in point
    /// order, each point riding on the first before it whose tasks read what its tasks read,
    /// so each group of points with the same cut (a `sweep_methods` grid's task_arithmetic
    /// points and its TIES points, say) reads the rows once. Returns how many ride; every
    /// point may lease tasks from now on. (A point already linked, or gone, is left as it is.)
    pub fn link(&self, first: &str, others: &[String]) -> usize {
        let mut jobs = lock(&self.jobs);
        let order: Vec<&str> = std::iter::once(first)
            .chain(others.iter().map(String::as_str).filter(|r| *r != first))
            .collect();
        for id in &order {
            if let Some(j) = jobs.get_mut(*id) {
                j.held = false;
            }
        }
        let mut leaders: Vec<&str> = Vec::new();
        let mut rides: Vec<(&str, &str)> = Vec::new();
        for id in order {
            let Some(j) = jobs.get(id).filter(|j| j.leader.is_none()) else {
                continue;
            };
            let alike = |l: &&&str| {
                jobs.get(**l).is_some_and(|lj| {
                    same_reads(&lj.state.plan, &lj.state.cut, &j.state.plan, &j.state.cut)
                })
            };
            match leaders.iter().find(alike) {
                Some(&lead) => rides.push((id, lead)),
                None => leaders.push(id),
            }
        }
        for &(id, lead) in &rides {
            if let Some(j) = jobs.get_mut(id) {
                j.leader = Some(lead.to_string());
            }
            if let Some(l) = jobs.get_mut(lead) {
                l.riders.push(id.to_string());
            }
        }
        rides.len()
    }
}

/// Whether job `id` leases nothing on its own now: it is a point of a grid not linked yet,
/// or it rides on a leader that still runs.
pub(super) fn rides(jobs: &HashMap<String, Job>, id: &str) -> bool {
    let Some(j) = jobs.get(id) else { return false };
    if j.held {
        return true;
    }
    let Some(leader) = j.leader.as_ref() else {
        return false;
    };
    jobs.get(leader)
        .is_some_and(|l| l.state.status.state == pb::JobState::Running as i32)
}

/// The who and when of one poll.
pub(super) struct Poller<'a> {
    pub worker: &'a str,
    pub now: Instant,
    pub rules: LeaseRules,
}

/// Leases task `item` of each of `riders` that has it queued to the poller, as riders of a
/// lease of the leader's task.
pub(super) fn lease_riders(
    jobs: &mut HashMap<String, Job>,
    leases: &mut LeaseTable,
    riders: &[String],
    item: Item,
    p: &Poller<'_>,
) -> Vec<pb::Lease> {
    let mut out = Vec::new();
    for r in riders {
        let Some(j) = jobs.get_mut(r) else { continue };
        let Some(g) = j.state.lease_rider(item, p.worker, p.now, p.rules) else {
            continue;
        };
        leases.grant(Lease {
            id: g.lease.clone(),
            worker: p.worker.to_string(),
            job: j.state.id.clone(),
            item: g.item,
            granted_at: p.now,
        });
        out.push(pb::Lease {
            lease_id: g.lease,
            ttl_ms: p.rules.ttl.as_millis() as u64,
            task: Some(tasks::build_task(
                &j.state, &j.out, &j.uploads, g.item, g.attempt,
            )),
            riders: Vec::new(),
        });
        j.publish();
    }
    out
}
