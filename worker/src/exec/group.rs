//! A task and its riders (tasks of other jobs leased with it: the points of a sweep, see
//! `Lease::riders`) run together. When they are write tasks that read exactly the same input
//! rows, segment by segment, each segment's rows are read once and every task's kernel runs
//! over them, each into its own output bytes, written to its own output. Whether they read the
//! same rows is decided from what they read (inputs, rows, shapes), never from their methods
//! or parameters; tasks that do not match run one after another.

use shardmerge_proto as pb;

use super::scratch::{give_back, sized};
use super::segment::{non_finite, segment_tensor};
use super::{blocked, fatal, kernel_points, partial_rows, Executor, Io, Scratch, TaskError};
use super::{Part, Staged, Writes};
use crate::format::dtype::{self, DType};
use crate::tensor::view2d;

type TaskResult = Result<pb::TaskResult, TaskError>;

impl Executor {
    /// Runs `tasks` (a leased task, then its riders); one result per task, in order.
    pub async fn run_group(&self, tasks: &[&pb::Task], scratch: &mut Scratch) -> Vec<TaskResult> {
        let staged = self.stage_group(tasks, scratch).await;
        self.finish(staged, scratch).await
    }

    /// Computes a group (as [`Executor::run_group`]), leaving its write tasks' bytes to write
    /// ([`Executor::write_out`]) when it is one write task or write tasks that share reads.
    pub async fn stage_group(&self, tasks: &[&pb::Task], scratch: &mut Scratch) -> Staged {
        if let Some(writes) = shared_writes(tasks) {
            let r = self.compute_writes(&writes, scratch).await;
            scratch.trim();
            return match r {
                Ok(w) => Staged::Writes(w),
                Err(e) => Staged::Done(tasks.iter().map(|_| Err(e.clone())).collect()),
            };
        }
        if let Some(stats) = shared_stats(tasks) {
            let r = self
                .run_stats_group(&stats, &tasks[0].job_id, scratch)
                .await;
            scratch.trim();
            return Staged::Done(r);
        }
        if let [task] = tasks {
            return self.stage(task, scratch).await;
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(self.run(t, scratch).await);
        }
        Staged::Done(out)
    }

    /// Statistics passes over the same rows (checked by `shared_stats`): the rows read once
    /// (kept in the row cache under the first task's job, whose write task reads them), each
    /// task's partial statistics computed from them.
    async fn run_stats_group(
        &self,
        ss: &[Pass<'_>],
        job_id: &str,
        scratch: &mut Scratch,
    ) -> Vec<TaskResult> {
        let mut io = Io {
            job: job_id.to_string(),
            ..Default::default()
        };
        let (r0, job0) = (ss[0].rows, ss[0].job);
        let read = self
            .read_inputs(job0, (r0.row_start, r0.row_end), true, &mut io, scratch)
            .await;
        let mut inputs = match read {
            Ok(v) => v,
            Err(e) => return ss.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut out = Vec::with_capacity(ss.len());
        for (k, p) in ss.iter().enumerate() {
            let (partial, back) =
                partial_rows(p.job, p.rows, p.pass, (inputs, self.tap.clone())).await;
            inputs = back;
            out.push(partial.map(|st| pb::TaskResult {
                // the rows were read once, for the first task: the others read nothing
                bytes_read: if k == 0 { io.bytes_read } else { 0 },
                inputs: if k == 0 { io.inputs() } else { Vec::new() },
                stats: Some(st.to_proto()),
                ..Default::default()
            }));
        }
        give_back(&mut scratch.inputs, inputs);
        out
    }

    /// Computes write tasks that read the same rows (checked by `shared_writes`), reading each
    /// segment's rows once, each task's bytes to be written to its own output.
    async fn compute_writes(
        &self,
        ws: &[Write<'_>],
        scratch: &mut Scratch,
    ) -> Result<Writes, TaskError> {
        let len = usize::try_from(ws[0].out.length).map_err(|_| fatal("task too large"))?;
        // the buffers of the last group, when the store gave them back
        let bufs = scratch.output_buffers(ws.len());
        // every byte is written below: literals and rows fill [0, len) in order (checked)
        let mut bufs: Vec<Vec<u8>> = bufs.into_iter().map(|b| sized(b, len)).collect();
        let mut io = Io {
            job: ws[0].job.to_string(),
            ..Default::default()
        };
        let mut at = 0usize;
        for s in 0..ws[0].w.segments.len() {
            at = self
                .shared_segment(ws, s, &mut bufs, at, &mut io, scratch)
                .await?;
        }
        if at != len {
            return Err(fatal(format!(
                "segments fill {at} of the task's {len} bytes (plan error)"
            )));
        }
        let parts = ws.iter().zip(bufs).enumerate();
        let parts = parts.map(|(k, (w, buf))| Part {
            out: (!w.audit).then(|| w.out.clone()),
            result: pb::TaskResult {
                // the rows were read once, for the first task: the others read nothing
                bytes_read: if k == 0 { io.bytes_read } else { 0 },
                inputs: if k == 0 { io.inputs() } else { Vec::new() },
                bytes_written: if w.audit { 0 } else { buf.len() as u64 },
                // (unused: the part receipt's CRC-32C is the part's checksum)
                checksum: 0,
                part: None,
                stats: None,
            },
            buf,
        });
        Ok(Writes {
            parts: parts.collect(),
            cached: io.cached,
        })
    }

    /// Segment `s` of every task into its buffer from byte `at`: literals copied, rows read
    /// once and computed by each task's kernel (or copied, for a tensor that is not floating
    /// point). Returns where the segment ends.
    async fn shared_segment(
        &self,
        ws: &[Write<'_>],
        s: usize,
        bufs: &mut [Vec<u8>],
        at: usize,
        io: &mut Io,
        scratch: &mut Scratch,
    ) -> Result<usize, TaskError> {
        let seg = |k: usize| ws[k].w.segments[s].kind.as_ref();
        let Some(pb::segment::Kind::Rows(r0)) = seg(0) else {
            let mut end = at;
            for (k, buf) in bufs.iter_mut().enumerate() {
                let Some(pb::segment::Kind::Literal(b)) = seg(k) else {
                    return Err(fatal("empty segment"));
                };
                end = at + b.len();
                buf.get_mut(at..end)
                    .ok_or_else(|| fatal("segment overruns the task's output range"))?
                    .copy_from_slice(b);
            }
            return Ok(end);
        };
        let job0 = segment_tensor(r0, &ws[0].w.tensors)?;
        let odt = DType::from_proto(job0.out_dtype)
            .ok_or_else(|| fatal(format!("tensor {}: no output dtype", job0.name)))?;
        let (_, row_len) = view2d(&job0.shape);
        let end = at + ((r0.row_end - r0.row_start) * row_len) as usize * odt.size();
        let (first, rest) = bufs.split_at_mut(1);
        let dst0 = first[0]
            .get_mut(at..end)
            .ok_or_else(|| fatal("segment overruns the task's output range"))?;
        if !odt.is_float() {
            // copied from the inputs, which every task shares
            self.copy_rows(job0, r0, odt, dst0, io).await?;
            rest.iter_mut()
                .for_each(|b| b[at..end].copy_from_slice(&first[0][at..end]));
            return Ok(end);
        }
        let points = (0..ws.len())
            .map(|k| match seg(k) {
                Some(pb::segment::Kind::Rows(r)) => Ok((segment_tensor(r, &ws[k].w.tensors)?, r)),
                _ => Err(fatal("empty segment")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let jobs: Vec<&str> = ws.iter().map(|w| w.job).collect();
        // every point from the same inputs, what they share computed once: a block of rows
        // at a time when the methods have no statistics passes
        if points.iter().all(|(j, _)| blocked::applies(j, odt))
            && self
                .blocked_rows(&points, odt, (bufs, &jobs), (at, end), io, scratch)
                .await?
        {
            return Ok(end);
        }
        let inputs = self
            .read_inputs(job0, (r0.row_start, r0.row_end), false, io, scratch)
            .await?;
        let outs = std::mem::take(&mut scratch.points);
        let (res, inputs) = kernel_points(&points, inputs, (outs, self.tap.clone())).await;
        let outs = res?;
        for ((job, r), (buf, values)) in points.iter().zip(bufs.iter_mut().zip(&outs)) {
            if !dtype::encode_finite(odt, values, &mut buf[at..end]) {
                let finite = inputs.iter().all(|v| v.iter().all(|x| x.is_finite()));
                non_finite(job, r, values, odt, finite)?;
            }
        }
        self.tap_written(&jobs, (job0, r0), &inputs, (bufs, at, end), odt);
        scratch.points = outs;
        give_back(&mut scratch.inputs, inputs);
        Ok(end)
    }
}

impl Executor {
    /// Hands the tap, if any, the values the jobs `jobs` wrote of rows `r0` of `job0` (bytes
    /// `[at, end)` of each one's buffer in `bufs`) with the inputs they were computed from.
    fn tap_written(
        &self,
        jobs: &[&str],
        (job0, r0): (&pb::TensorJob, &pb::TensorRows),
        inputs: &[Vec<f32>],
        (bufs, at, end): (&[Vec<u8>], usize, usize),
        odt: DType,
    ) {
        let range = (r0.row_start, r0.row_end);
        let Some(mut w) = self.tap.as_ref().and_then(|t| t.outputs(jobs, job0, range)) else {
            return;
        };
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let written: Vec<&[u8]> = bufs.iter().map(|b| &b[at..end]).collect();
        w.add(&refs, &written, odt);
        w.finish();
    }
}

/// One write task of a group.
struct Write<'a> {
    w: &'a pb::WriteTask,
    out: &'a pb::OutputTarget,
    job: &'a str,
    audit: bool,
}

/// The tasks as write tasks, when there are several and every one reads exactly what the
/// first one reads: the same output length, segment for segment literals of the same length
/// or the same rows of tensors with the same shape, output dtype, inputs and row map.
fn shared_writes<'a>(tasks: &[&'a pb::Task]) -> Option<Vec<Write<'a>>> {
    if tasks.len() < 2 {
        return None;
    }
    let ws: Vec<Write<'a>> = tasks
        .iter()
        .map(|t| match &t.kind {
            Some(pb::task::Kind::Write(w)) => Some(Write {
                w,
                out: w.output.as_ref()?,
                job: &t.job_id,
                audit: t.audit,
            }),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let first = &ws[0];
    ws[1..]
        .iter()
        .all(|x| same_segments(first, x))
        .then_some(ws)
}

/// One statistics pass of a group.
struct Pass<'a> {
    rows: &'a pb::TensorRows,
    job: &'a pb::TensorJob,
    pass: u32,
}

/// The tasks as statistics passes, when there are several and every one reads exactly the
/// rows the first one reads.
fn shared_stats<'a>(tasks: &[&'a pb::Task]) -> Option<Vec<Pass<'a>>> {
    if tasks.len() < 2 {
        return None;
    }
    let ps: Vec<Pass<'a>> = tasks
        .iter()
        .map(|t| match &t.kind {
            Some(pb::task::Kind::Stats(s)) => {
                let rows = s.rows.as_ref()?;
                Some(Pass {
                    rows,
                    job: rows.tensor.as_ref()?,
                    pass: s.pass,
                })
            }
            _ => None,
        })
        .collect::<Option<_>>()?;
    let (a, t) = (ps[0].rows, ps[0].job);
    ps[1..]
        .iter()
        .all(|p| {
            (p.rows.row_start, p.rows.row_end) == (a.row_start, a.row_end)
                && same_tensor_reads(t, p.job)
        })
        .then_some(ps)
}

/// Whether two tensors' rows read the same bytes.
pub(super) fn same_tensor_reads(s: &pb::TensorJob, t: &pb::TensorJob) -> bool {
    (&s.shape, s.out_dtype, &s.row_map) == (&t.shape, t.out_dtype, &t.row_map)
        && s.inputs.len() == t.inputs.len()
        && s.inputs
            .iter()
            .zip(&t.inputs)
            .all(|(a, b)| same_source(a, b))
}

/// Whether two inputs are the same bytes: everything but the model's name and its random
/// keys (where its draws start: a DARE point's and a TIES point's inputs read alike).
fn same_source(a: &pb::TensorSource, b: &pb::TensorSource) -> bool {
    (&a.uri, a.data_offset, a.dtype, &a.shape, &a.tensor)
        == (&b.uri, b.data_offset, b.dtype, &b.shape, &b.tensor)
        && (&a.lora, &a.derived) == (&b.lora, &b.derived)
}

fn same_segments(a: &Write<'_>, b: &Write<'_>) -> bool {
    if a.out.length != b.out.length || a.w.segments.len() != b.w.segments.len() {
        return false;
    }
    a.w.segments.iter().zip(&b.w.segments).all(|(x, y)| {
        use pb::segment::Kind::{Literal, Rows};
        match (&x.kind, &y.kind) {
            (Some(Literal(p)), Some(Literal(q))) => p.len() == q.len(),
            (Some(Rows(p)), Some(Rows(q))) => {
                let (Ok(s), Ok(t)) = (
                    segment_tensor(p, &a.w.tensors),
                    segment_tensor(q, &b.w.tensors),
                ) else {
                    return false;
                };
                (p.row_start, p.row_end) == (q.row_start, q.row_end) && same_tensor_reads(s, t)
            }
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(job: &str, weight: f64, uri: &str) -> pb::Task {
        let tensor = pb::TensorJob {
            name: "w".into(),
            shape: vec![2, 2],
            out_dtype: DType::F32.to_proto() as i32,
            method: "linear".into(),
            params: Some(pb::ParamMap {
                values: [("weight".to_string(), weight)].into(),
            }),
            inputs: vec![pb::TensorSource {
                uri: uri.into(),
                dtype: DType::F32.to_proto() as i32,
                shape: vec![2, 2],
                ..Default::default()
            }],
            ..Default::default()
        };
        let rows = pb::TensorRows {
            row_end: 2,
            ..Default::default()
        };
        pb::Task {
            job_id: job.into(),
            kind: Some(pb::task::Kind::Write(pb::WriteTask {
                output: Some(pb::OutputTarget {
                    length: 20,
                    ..Default::default()
                }),
                segments: vec![
                    pb::Segment {
                        kind: Some(pb::segment::Kind::Literal(vec![0; 4])),
                    },
                    pb::Segment {
                        kind: Some(pb::segment::Kind::Rows(rows)),
                    },
                ],
                tensors: vec![tensor],
            })),
            ..Default::default()
        }
    }

    /// Tasks share their reads when they read the same rows, whatever their parameters; not
    /// when an input differs.
    #[test]
    fn tasks_share_reads_exactly_when_they_read_the_same_rows() {
        let (a, b, c) = (
            task("j1", 0.5, "file:///m/a"),
            task("j2", 1.0, "file:///m/a"),
            task("j3", 1.0, "file:///m/other"),
        );
        assert!(shared_writes(&[&a, &b]).is_some());
        assert!(shared_writes(&[&a]).is_none(), "one task alone is no group");
        assert!(shared_writes(&[&a, &b, &c]).is_none());
        // where an input's random draws start (a DARE point's, against a TIES point's) is no
        // difference in what is read; where its bytes start is
        fn source(t: &mut pb::Task) -> &mut pb::TensorSource {
            match &mut t.kind {
                Some(pb::task::Kind::Write(w)) => &mut w.tensors[0].inputs[0],
                _ => unreachable!("a write task"),
            }
        }
        let (mut d, mut e) = (b.clone(), b.clone());
        source(&mut d).rng_offset = 4096;
        source(&mut e).data_offset = 8;
        assert!(shared_writes(&[&a, &d]).is_some());
        assert!(shared_writes(&[&a, &e]).is_none());
    }

    fn pass(job: &str, pass: u32, rows: (u64, u64)) -> pb::Task {
        let Some(pb::task::Kind::Write(w)) = task(job, 0.5, "file:///m/a").kind else {
            unreachable!("a write task")
        };
        pb::Task {
            job_id: job.into(),
            kind: Some(pb::task::Kind::Stats(pb::StatsTask {
                rows: Some(pb::TensorRows {
                    tensor: w.tensors.into_iter().next(),
                    row_start: rows.0,
                    row_end: rows.1,
                    ..Default::default()
                }),
                pass,
            })),
            ..Default::default()
        }
    }

    /// Statistics passes share their reads over the same rows, whatever their pass; a write
    /// task and a pass do not.
    #[test]
    fn passes_share_reads_over_the_same_rows() {
        let (a, b, c) = (
            pass("j1", 0, (0, 1)),
            pass("j2", 1, (0, 1)),
            pass("j3", 0, (1, 2)),
        );
        assert!(shared_stats(&[&a, &b]).is_some());
        assert!(shared_stats(&[&a, &c]).is_none());
        let w = task("j4", 1.0, "file:///m/a");
        assert!(shared_stats(&[&a, &w]).is_none());
        assert!(shared_writes(&[&w, &a]).is_none());
    }
}
