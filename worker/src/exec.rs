//! Runs one task: range-reads exactly the input bytes it needs, converts them to f32, runs the
//! kernel, converts to the output dtype and writes its part of the output file. A task is pure,
//! so running it twice writes the same bytes.

use std::path::Path;
use std::sync::Arc;

use shardmerge_proto as pb;

use crate::format::dtype::{self, DType};
use crate::kernels::{self, TensorCtx};
use crate::storage::{self, retry, Resolver, StorageError};

/// A task failure: retryable ones (I/O) are run again, the others fail the job.
#[derive(Debug, Clone)]
pub struct TaskError {
    pub message: String,
    pub retryable: bool,
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

impl From<StorageError> for TaskError {
    fn from(e: StorageError) -> Self {
        TaskError {
            message: e.message,
            retryable: e.retryable,
        }
    }
}

/// An error retrying cannot mend.
pub(crate) fn fatal(msg: impl Into<String>) -> TaskError {
    TaskError {
        message: msg.into(),
        retryable: false,
    }
}

pub use crate::tensor::view2d;

mod analyse;
mod blocked;
mod derive;
pub mod extract;
mod group;
mod kernel;
mod lora;
mod out;
mod read;
mod rowcache;
mod rowmap;
mod scratch;
mod segment;
mod tap;
pub use blocked::reads_as_stored;
use kernel::{kernel_points, kernel_rows, kernel_stored, partial_rows};
use out::Part;
pub use out::{Staged, Writes};
pub(crate) use read::input_dtype;
pub use read::whole_as_stored;
pub use rowcache::RowCache;
use scratch::{give_back, sized};
pub use scratch::{release_free_memory, Scratch};
use segment::{non_finite, segment_tensor};
pub use tap::ReportTap;

/// Builds the kernel's view of a tensor job (see [`crate::tensor::tensor_ctx`]).
pub fn tensor_ctx(job: &pb::TensorJob) -> Result<TensorCtx<'_>, TaskError> {
    crate::tensor::tensor_ctx(job).map_err(fatal)
}

/// Executes tasks against storage.
#[derive(Clone, Debug, Default)]
pub struct Executor {
    pub resolver: Resolver,
    /// Where statistics passes keep the rows they read for the tensor's next passes and its
    /// write task (none: every pass reads storage).
    pub cache: Option<Arc<RowCache>>,
    /// The report computed from the rows the kernels are given (`run --report`), if any.
    pub tap: Option<Arc<ReportTap>>,
}

/// What a task did, for the result message.
#[derive(Default)]
struct Io {
    /// The task's job (keys its row-cache entries).
    job: String,
    /// Input bytes read from storage (`read_from`).
    bytes_read: u64,
    /// The same by input (model name), in the order first read.
    by_input: Vec<(String, u64)>,
    /// Input bytes read from the row cache instead.
    bytes_cached: u64,
    /// The row-cache pieces it read.
    cached: Vec<rowcache::Key>,
}

impl Io {
    /// Counts `n` bytes read from storage for input `model`.
    fn read_from(&mut self, model: &str, n: u64) {
        self.bytes_read += n;
        match self.by_input.iter_mut().find(|(m, _)| m == model) {
            Some((_, b)) => *b += n,
            None => self.by_input.push((model.to_string(), n)),
        }
    }

    /// The bytes read by input, for the result message.
    fn inputs(&self) -> Vec<pb::InputRead> {
        let read = self.by_input.iter().map(|(m, n)| pb::InputRead {
            input: m.clone(),
            bytes_read: *n,
            bytes_read_total: 0,
        });
        read.collect()
    }
}

impl Executor {
    pub fn new(resolver: Resolver) -> Self {
        Executor {
            resolver,
            cache: None,
            tap: None,
        }
    }

    /// This executor, keeping statistics passes' rows in `cache`.
    pub fn with_cache(mut self, cache: Option<Arc<RowCache>>) -> Self {
        self.cache = cache;
        self
    }

    /// This executor, handing the input rows its kernels are given to `tap`.
    pub fn with_tap(mut self, tap: Option<Arc<ReportTap>>) -> Self {
        self.tap = tap;
        self
    }

    /// Runs one task with the slot's buffers (its bytes written before it returns).
    pub async fn run(
        &self,
        task: &pb::Task,
        scratch: &mut Scratch,
    ) -> Result<pb::TaskResult, TaskError> {
        let mut results = self.finish(self.stage(task, scratch).await, scratch).await;
        results
            .pop()
            .unwrap_or_else(|| Err(fatal("a task without a result")))
    }

    /// Computes one task with the slot's buffers: a write task's bytes are left to write.
    async fn stage(&self, task: &pb::Task, scratch: &mut Scratch) -> Staged {
        let r = match &task.kind {
            Some(pb::task::Kind::Write(w)) => self
                .compute_write(w, &task.job_id, task.audit, scratch)
                .await
                .map(Staged::Writes),
            Some(pb::task::Kind::Stats(s)) => self
                .run_stats(s, &task.job_id, scratch)
                .await
                .map(|r| Staged::Done(vec![Ok(r)])),
            None => Err(fatal(
                "task has no kind (coordinator/worker version mismatch?)",
            )),
        };
        scratch.trim();
        r.unwrap_or_else(|e| Staged::Done(vec![Err(e)]))
    }

    /// Writes what `staged` left to write, now, keeping the buffers for the slot's next tasks.
    async fn finish(
        &self,
        staged: Staged,
        scratch: &mut Scratch,
    ) -> Vec<Result<pb::TaskResult, TaskError>> {
        match staged {
            Staged::Done(results) => results,
            Staged::Writes(w) => {
                let (results, bufs) = self.write_out(w).await;
                scratch.keep_outputs(bufs);
                results
            }
        }
    }

    /// Computes a write task's bytes, to be written; `audit`: to write nothing, and report
    /// the size and CRC-32C of the bytes as the receipt (an audit of another worker's result).
    async fn compute_write(
        &self,
        w: &pb::WriteTask,
        job_id: &str,
        audit: bool,
        scratch: &mut Scratch,
    ) -> Result<Writes, TaskError> {
        let out = w
            .output
            .as_ref()
            .ok_or_else(|| fatal("write task without output"))?;
        let len = usize::try_from(out.length).map_err(|_| fatal("task too large"))?;
        // every byte is written below: literals and rows fill [0, len) in order (checked)
        let mut buf = sized(std::mem::take(&mut scratch.bytes), len);
        let mut at = 0usize;
        let mut io = Io {
            job: job_id.to_string(),
            ..Default::default()
        };
        for seg in &w.segments {
            match &seg.kind {
                Some(pb::segment::Kind::Literal(b)) => {
                    let end = at + b.len();
                    buf.get_mut(at..end)
                        .ok_or_else(|| fatal("segment overruns the task's output range"))?
                        .copy_from_slice(b);
                    at = end;
                }
                Some(pb::segment::Kind::Rows(r)) => {
                    let job = segment_tensor(r, &w.tensors)?;
                    at = self
                        .write_rows(job, r, &mut buf, at, &mut io, scratch)
                        .await?;
                }
                None => return Err(fatal("empty segment")),
            }
        }
        if at != len {
            return Err(fatal(format!(
                "segments fill {at} of the task's {len} bytes (plan error)"
            )));
        }
        Ok(Writes {
            parts: vec![Part {
                // (an audit writes nothing: its receipt says what would have been written)
                out: (!audit).then(|| out.clone()),
                buf,
                result: pb::TaskResult {
                    bytes_read: io.bytes_read,
                    inputs: io.inputs(),
                    // (an audit computed the bytes and wrote none: metrics and logs count no
                    // write)
                    bytes_written: if audit { 0 } else { len as u64 },
                    // (unused: the part receipt's CRC-32C is the part's checksum)
                    checksum: 0,
                    part: None,
                    stats: None,
                },
            }],
            cached: io.cached,
        })
    }

    /// Computes the rows of `r` (or copies them, for a tensor that is not floating point) into
    /// `buf` from byte `at` on, in the tensor's output dtype; returns where they end.
    async fn write_rows(
        &self,
        job: &pb::TensorJob,
        r: &pb::TensorRows,
        buf: &mut Vec<u8>,
        at: usize,
        io: &mut Io,
        scratch: &mut Scratch,
    ) -> Result<usize, TaskError> {
        let odt = DType::from_proto(job.out_dtype)
            .ok_or_else(|| fatal(format!("tensor {}: no output dtype", job.name)))?;
        let (_, row_len) = view2d(&job.shape);
        let n = ((r.row_end - r.row_start) * row_len) as usize;
        let end = at + n * odt.size();
        let job_id = io.job.clone();
        let blocked = blocked::applies(job, odt)
            && self
                .blocked_rows(
                    &[(job, r)],
                    odt,
                    (std::slice::from_mut(buf), &[job_id.as_str()]),
                    (at, end),
                    io,
                    scratch,
                )
                .await?;
        let dst = buf
            .get_mut(at..end)
            .ok_or_else(|| fatal("segment overruns the task's output range"))?;
        if blocked {
            // computed a block at a time (every value finite)
        } else if odt.is_float() {
            let (values, kept) = self.compute_rows(job, r, io, scratch).await?;
            let finite = dtype::encode_finite(odt, &values, dst);
            if !finite {
                // the inputs of this segment are still in the slot's buffers, unless the
                // kernel used them as working memory (it then said whether they were finite)
                let n_in = job.inputs.len();
                let inputs_finite = match kept {
                    Kept::Finite(f) => f,
                    Kept::Decoded => scratch.inputs[..n_in.min(scratch.inputs.len())]
                        .iter()
                        .all(|v| v.iter().all(|x| x.is_finite())),
                    Kept::Stored(dts, mapped) => {
                        dts.iter()
                            .zip(&scratch.pieces)
                            .zip(&mapped)
                            .all(|((&dt, b), m)| {
                                let b = m.as_deref().unwrap_or(b);
                                stored_view(dt, b).is_some_and(|s| s.all_finite())
                            })
                    }
                };
                non_finite(job, r, &values, odt, inputs_finite)?;
            }
            scratch.out = values;
        } else {
            self.copy_rows(job, r, odt, dst, io).await?;
        }
        Ok(end)
    }

    async fn run_stats(
        &self,
        s: &pb::StatsTask,
        job_id: &str,
        scratch: &mut Scratch,
    ) -> Result<pb::TaskResult, TaskError> {
        let r = s
            .rows
            .as_ref()
            .ok_or_else(|| fatal("stats task without rows"))?;
        let job = r
            .tensor
            .as_ref()
            .ok_or_else(|| fatal("stats task without tensor"))?;
        let mut io = Io {
            job: job_id.to_string(),
            ..Default::default()
        };
        let inputs = self
            .read_inputs(job, (r.row_start, r.row_end), true, &mut io, scratch)
            .await?;
        let (partial, inputs) = partial_rows(job, r, s.pass, (inputs, self.tap.clone())).await;
        give_back(&mut scratch.inputs, inputs);
        let partial = partial?;
        Ok(pb::TaskResult {
            bytes_read: io.bytes_read,
            inputs: io.inputs(),
            stats: Some(partial.to_proto()),
            ..Default::default()
        })
    }

    /// Copies rows of a non-float tensor (never merged) from its first input, checking that
    /// every other input holds the same bytes there.
    async fn copy_rows(
        &self,
        job: &pb::TensorJob,
        r: &pb::TensorRows,
        odt: DType,
        dst: &mut [u8],
        io: &mut Io,
    ) -> Result<(), TaskError> {
        let (_, row_len) = view2d(&job.shape);
        let row_bytes = row_len * odt.size() as u64;
        let mut first: Option<&str> = None;
        for src in &job.inputs {
            if src.dtype != job.out_dtype || src.shape != job.shape || src.derived.is_some() {
                return Err(fatal(format!(
                    "{}: tensor {} of {} is not a {} tensor of shape {:?} (plan error)",
                    src.uri,
                    src.tensor,
                    src.model,
                    odt.name(),
                    job.shape
                )));
            }
            let from = src.data_offset + r.row_start * row_bytes;
            let to = src.data_offset + r.row_end * row_bytes;
            let loc = self.resolver.resolve(&src.uri, Path::new("/"))?;
            let data = retry(|| loc.store.read_range(&loc.path, from..to)).await?;
            io.read_from(&src.model, to - from);
            if data.len() != dst.len() {
                return Err(fatal(format!(
                    "{}: read {} bytes of tensor {}, expected {}",
                    src.uri,
                    data.len(),
                    src.tensor,
                    dst.len()
                )));
            }
            match first {
                None => {
                    dst.copy_from_slice(&data);
                    first = Some(&src.model);
                }
                Some(m) if data[..] != dst[..] => {
                    return Err(fatal(format!(
                        "tensor {}: its {} values differ between models {m} and {}; {} tensors are not merged but copied from the base model, so every model must hold the same values (merge models whose {} buffers agree)",
                        job.name,
                        odt.name(),
                        src.model,
                        odt.name(),
                        job.name
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Reads a row range of every input and computes the output rows in f32, in the slot's
    /// output buffer (give it back to `scratch.out` when done with the values). With them,
    /// where the inputs' values are still to be found (for the message on a non-finite output).
    async fn compute_rows(
        &self,
        job: &pb::TensorJob,
        r: &pb::TensorRows,
        io: &mut Io,
        scratch: &mut Scratch,
    ) -> Result<(Vec<f32>, Kept), TaskError> {
        let rows = (r.row_start, r.row_end);
        let out = std::mem::take(&mut scratch.out);
        if let Some(dts) = read::stored_dtypes(job, rows) {
            let inputs = self.read_stored(job, rows, io, scratch).await?;
            let (res, inputs) = kernel_stored(job, &dts, inputs, (out, self.tap.clone())).await;
            let (bufs, mapped) = inputs.into_iter().map(read::StoredIn::into_parts).unzip();
            give_back(&mut scratch.pieces, bufs);
            return res.map(|v| (v, Kept::Stored(dts, mapped)));
        }
        let inputs = self.read_inputs(job, rows, false, io, scratch).await?;
        let (res, inputs) = kernel_rows(job, r, inputs, out, (true, self.tap.clone())).await;
        give_back(&mut scratch.inputs, inputs);
        res.map(|(v, held)| (v, held.map_or(Kept::Decoded, Kept::Finite)))
    }
}

/// Where a segment's input values are after its kernel ran ([`Executor::compute_rows`]).
enum Kept {
    /// Decoded, in the slot's input buffers.
    Decoded,
    /// As stored (in these dtypes): mapped, or in the slot's read buffers.
    Stored(Vec<DType>, Vec<Option<storage::Mapped>>),
    /// Gone (the kernel used them as working memory): whether they were all finite.
    Finite(bool),
}

/// Bytes of a 16-bit float dtype as the kernels take them stored.
fn stored_view(dt: DType, b: &[u8]) -> Option<kernels::Stored<'_>> {
    match dt {
        DType::BF16 => Some(kernels::Stored::Bf16(b)),
        DType::F16 => Some(kernels::Stored::F16(b)),
        _ => None,
    }
}

pub(super) fn method_of(job: &pb::TensorJob) -> Result<&'static dyn kernels::Method, TaskError> {
    kernels::task_method(&job.method)
        .ok_or_else(|| fatal(format!("unknown merge method {:?}", job.method)))
}
