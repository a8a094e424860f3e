//! Jobs that share their reads: the points of a sweep are jobs of their own (each with its
//! output, claim, uploads, journal record, audits and commit), linked so that each task of a
//! *leader* is leased together with the same task of its *riders*: the other points whose
//! tasks read exactly the same input rows. The points fall into groups by what they read, each
//! led by the point with the most statistics units. A grid that varies the method would cut
//! its points several ways (task_arithmetic at any row, TIES whole or into statistics units):
//! every point of one is cut like the method with the finest cut where it can be
//! (`cut::cut_like`), so it is one group too. The worker reads the rows once and computes each
//! rider from them (`Lease::riders`, the worker's `exec/group.rs`).
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
/// byte ranges, segments' tensors and rows; each statistics unit of `b` one of `a`'s), over
/// tensors with the same inputs. Literal bytes (headers) may differ.
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
    // (b's statistics units are among a's: a TIES leader's, say, and none of a
    // task_arithmetic rider's; `lease_riders` finds b's unit of a's)
    let units = b.units.iter().all(|y| {
        a.units
            .iter()
            .any(|x| (x.tensor, &x.ranges) == (y.tensor, &y.ranges))
    });
    let tensors = pa.tensors.len() == pb.tensors.len()
        && pa
            .tensors
            .iter()
            .zip(&pb.tensors)
            .all(|(x, y)| x.reads_as(y));
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
        let like = super::prepare::CutLike::new(methods(points));
        let mut jobs: Vec<(String, Arc<Plan>)> = Vec::with_capacity(points.len());
        for (recipe, out) in points {
            let leader = jobs.first().map(|(id, _)| id.as_str());
            match self.submit_point(recipe, out, &o, leader, &like).await {
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
    /// order, each point riding on the first leader (the points with the most statistics units
    /// first) whose tasks read what its tasks read, so each group of points with the same cut
    /// reads the rows once. Returns how many ride; every point may lease tasks from now on.
    /// (A point already linked, or gone, is left as it is.)
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
        // the points with the most statistics units (then passes) first: one whose units are
        // among another's rides on it (a grid's task_arithmetic points on its first TIES
        // point, say), and a leader's passes are never fewer than its riders'
        let mut order = order;
        order.sort_by_key(|id| {
            std::cmp::Reverse(jobs.get(*id).map_or((0, 0), |j| {
                let units = &j.state.cut.units;
                (
                    units.len(),
                    units.iter().map(|u| u64::from(u.passes)).sum::<u64>(),
                )
            }))
        });
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

/// One recipe of each method of a grid's points (`sweep_methods`), in point order, when they
/// have more than one: every point is cut like the one of them with the finest cut
/// (`cut::cut_like`), so that they all read the same rows. Empty for a grid of one method.
fn methods(points: &[(&str, &str)]) -> Vec<String> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for (recipe, _) in points {
        // (a recipe that does not parse fails its own submission)
        let Ok(r) = crate::recipe::Recipe::parse(recipe) else {
            continue;
        };
        if !seen.iter().any(|(m, _)| *m == r.merge_method) {
            seen.push((r.merge_method, recipe.to_string()));
        }
    }
    if seen.len() < 2 {
        return Vec::new();
    }
    seen.into_iter().map(|(_, text)| text).collect()
}

/// Leases task `item` of each of `riders` that has it queued to the poller, as riders of a
/// lease of the leader's task. `units`: the tensor of each of the leader's statistics units
/// (a rider's statistics task of a tensor is its unit of that tensor, whatever its index).
pub(super) fn lease_riders(
    jobs: &mut HashMap<String, Job>,
    leases: &mut LeaseTable,
    (riders, units): (&[String], &[usize]),
    item: Item,
    p: &Poller<'_>,
) -> Vec<pb::Lease> {
    let mut out = Vec::new();
    for r in riders {
        let Some(j) = jobs.get_mut(r) else { continue };
        let item = match item {
            Item::Stats { unit, range } => {
                let tensor = units.get(unit).copied();
                let Some(unit) = j
                    .state
                    .cut
                    .units
                    .iter()
                    .position(|u| Some(u.tensor) == tensor)
                else {
                    continue;
                };
                Item::Stats { unit, range }
            }
            other => other,
        };
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
