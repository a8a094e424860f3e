//! Reading a task's input rows: whole input rows a piece at a time, decoded to f32 as they
//! come, from storage or from the worker's row cache (the pieces a statistics pass read).

use std::path::Path;

use shardmerge_proto as pb;

use super::rowcache::Key;
use super::scratch::{emptied, give_back};
use super::{fatal, view2d, Executor, Io, Scratch, TaskError};
use crate::format::dtype::{self, DType};
use crate::kernels::{Method, TensorCtx};
use crate::storage::{retry, Location, Mapped};

/// Bytes of one input read at a time (then decoded before the next piece is read).
const READ_PIECE: u64 = 4 << 20;

/// What one input's read did.
struct Read {
    values: Vec<f32>,
    piece: Vec<u8>,
    from_storage: u64,
    from_cache: u64,
    keys: Vec<Key>,
}

/// The stored dtype of one input of `job`.
pub(crate) fn input_dtype(src: &pb::TensorSource, job: &pb::TensorJob) -> Result<DType, TaskError> {
    DType::from_proto(src.dtype).ok_or_else(|| {
        fatal(format!(
            "{}: input of {} has no float dtype",
            src.uri, job.name
        ))
    })
}

impl Executor {
    /// Reads rows `[start, end)` of every input of `job` as f32, cropped to the output's row
    /// length (an input may be wider, e.g. an embedding with a larger hidden size). With
    /// `keep`, pieces read from storage are kept in the row cache for the tensor's next passes;
    /// pieces found there are read from it, and their keys noted in `io` (a write task drops
    /// them once its part is written).
    pub(super) async fn read_inputs(
        &self,
        job: &pb::TensorJob,
        rows: (u64, u64),
        keep: bool,
        io: &mut Io,
        scratch: &mut Scratch,
    ) -> Result<Vec<Vec<f32>>, TaskError> {
        if let Some(map) = &job.row_map {
            if job
                .inputs
                .iter()
                .any(|s| s.lora.is_some() || s.derived.is_some())
            {
                return Err(fatal(format!(
                    "tensor {}: a LoRA adapter or a streamed stage on a vocabulary-re-mapped embedding (plan error)",
                    job.name
                )));
            }
            let (start, end) = rows;
            let (v, n) = super::rowmap::read_inputs(&self.resolver, job, map, start, end).await?;
            for (src, n) in job.inputs.iter().zip(n) {
                io.read_from(&src.model, n);
            }
            return Ok(v);
        }
        let bufs: Vec<_> = (0..job.inputs.len()).map(|i| scratch.input(i)).collect();
        let job_id = io.job.as_str();
        let reads = job
            .inputs
            .iter()
            .zip(bufs)
            .map(|(src, bufs)| self.read_one(job, src, rows, bufs, keep, job_id));
        let mut results = futures::future::try_join_all(reads).await?;
        // a LoRA adapter's delta, for the rows read (`model+adapter`)
        let (_, out_row) = view2d(&job.shape);
        for (r, src) in results.iter_mut().zip(&job.inputs) {
            if let Some(lora) = &src.lora {
                r.from_storage += self
                    .apply_lora(job, src, lora, rows, &mut r.values, out_row as usize)
                    .await?;
            }
        }
        let mut out = Vec::with_capacity(results.len());
        let mut pieces = Vec::with_capacity(results.len());
        for (r, src) in results.into_iter().zip(&job.inputs) {
            io.read_from(&src.model, r.from_storage);
            io.bytes_cached += r.from_cache;
            io.cached.extend(r.keys);
            out.push(r.values);
            pieces.push(r.piece);
        }
        give_back(&mut scratch.pieces, pieces);
        Ok(out)
    }

    /// Rows `rows` of every input of `job` as stored, for a kernel that takes them so
    /// ([`stored_dtypes`]): a local file's mapped, any other one range read each (with
    /// retries) into the slot's read buffers.
    pub(super) async fn read_stored(
        &self,
        job: &pb::TensorJob,
        rows: (u64, u64),
        io: &mut Io,
        scratch: &mut Scratch,
    ) -> Result<Vec<StoredIn>, TaskError> {
        let bufs: Vec<Vec<u8>> = (0..job.inputs.len()).map(|i| scratch.piece(i)).collect();
        let reads = job.inputs.iter().zip(bufs).map(|(src, buf)| async move {
            let (loc, range) = self.stored_range(job, src, rows)?;
            if let Some(file) = loc.store.positioned(&loc.path) {
                match file.map(range.clone()) {
                    Ok(Some(m)) => return Ok(StoredIn::Mapped(m, buf)),
                    Ok(None) => {}
                    // (a filesystem that cannot map, or a file shorter than its header says:
                    // the read says what is wrong, or works)
                    Err(e) => tracing::warn!("{e}: reading it instead of mapping it"),
                }
            }
            read_whole(&loc, range, buf).await.map(StoredIn::Read)
        });
        let got = futures::future::try_join_all(reads).await?;
        for (src, b) in job.inputs.iter().zip(&got) {
            io.read_from(&src.model, b.len() as u64);
        }
        Ok(got)
    }

    /// Rows `[start, end)` of input `src`: read ([`Executor::read_input`]), or computed when it
    /// is derived (a streamed stage, [`Executor::derive_input`]).
    async fn read_one(
        &self,
        job: &pb::TensorJob,
        src: &pb::TensorSource,
        rows: (u64, u64),
        bufs: (Vec<f32>, Vec<u8>),
        keep: bool,
        job_id: &str,
    ) -> Result<Read, TaskError> {
        let Some(inner) = &src.derived else {
            return self.read_input(job, src, rows, bufs, keep, job_id).await;
        };
        let d = self
            .derive_input(job, src, inner, rows, bufs, job_id)
            .await?;
        Ok(Read {
            values: d.values,
            piece: d.piece,
            from_storage: d.bytes_read,
            from_cache: 0,
            keys: Vec::new(),
        })
    }

    /// Reads rows `[start, end)` of input `src`: whole rows a piece (about READ_PIECE bytes)
    /// at a time, each decoded as it comes, so the raw bytes never take more than one piece.
    async fn read_input(
        &self,
        job: &pb::TensorJob,
        src: &pb::TensorSource,
        (start, end): (u64, u64),
        (buf, mut piece): (Vec<f32>, Vec<u8>),
        keep: bool,
        job_id: &str,
    ) -> Result<Read, TaskError> {
        let (_, out_row) = view2d(&job.shape);
        let dt = input_dtype(src, job)?;
        let (_, in_row) = view2d(&src.shape);
        let es = dt.size() as u64;
        let (loc, row_bytes) = self.stored_rows(job, src, end)?;
        let rows_per_piece = (READ_PIECE / row_bytes.max(1)).max(1);
        let n = ((end - start) * out_row) as usize;
        let mut r = Read {
            values: emptied(buf, n),
            piece: Vec::new(),
            from_storage: 0,
            from_cache: 0,
            keys: Vec::new(),
        };
        let mut row = start;
        while row < end {
            let re = (row + rows_per_piece).min(end);
            let (from, to) = (
                src.data_offset + row * row_bytes,
                src.data_offset + re * row_bytes,
            );
            let key = self.cache.as_ref().map(|_| Key {
                job: job_id.to_string(),
                uri: src.uri.clone(),
                from,
                to,
            });
            let (got, hit) = self.cached(key.as_ref(), piece).await;
            piece = got;
            if hit {
                r.from_cache += to - from;
                r.keys.extend(key);
            } else {
                piece = retry(|| {
                    let buf = std::mem::take(&mut piece);
                    loc.store.read_range_into(&loc.path, from..to, buf)
                })
                .await?;
                r.from_storage += to - from;
                if let (true, Some(c), Some(key)) = (keep, &self.cache, key) {
                    piece = c.put(key, piece).await;
                }
            }
            if in_row == out_row {
                dtype::decode_extend(dt, &piece, &mut r.values);
            } else {
                let ob = (out_row * es) as usize;
                for one in piece.chunks_exact(row_bytes as usize) {
                    dtype::decode_extend(dt, &one[..ob], &mut r.values);
                }
            }
            row = re;
        }
        r.piece = piece;
        Ok(r)
    }

    /// Where input `src`'s rows lie as stored: its store and the bytes of one row, checked to
    /// hold rows `[.., end)` at least as wide as the output's.
    pub(super) fn stored_rows(
        &self,
        job: &pb::TensorJob,
        src: &pb::TensorSource,
        end: u64,
    ) -> Result<(Location, u64), TaskError> {
        let (_, out_row) = view2d(&job.shape);
        let dt = input_dtype(src, job)?;
        let (in_rows, in_row) = view2d(&src.shape);
        if end > in_rows || in_row < out_row {
            return Err(fatal(format!(
                "{}: tensor {} of {} has shape {:?}, too small for output shape {:?}",
                src.uri, job.name, src.model, src.shape, job.shape
            )));
        }
        let loc = self.resolver.resolve(&src.uri, Path::new("/"))?;
        Ok((loc, in_row * dt.size() as u64))
    }

    /// Piece `key` from the row cache into `piece`, and whether it was there (else `piece`
    /// comes back as it was).
    async fn cached(&self, key: Option<&Key>, piece: Vec<u8>) -> (Vec<u8>, bool) {
        match (&self.cache, key) {
            (Some(c), Some(k)) => match c.get(k, piece).await {
                Ok(b) => (b, true),
                Err(b) => (b, false),
            },
            _ => (piece, false),
        }
    }
}

/// One input of a whole tensor as stored ([`Executor::read_stored`]).
pub(super) enum StoredIn {
    /// Read into a slot's read buffer.
    Read(Vec<u8>),
    /// A local file's bytes, mapped; with the slot's read buffer it left unused.
    Mapped(Mapped, Vec<u8>),
}

impl std::ops::Deref for StoredIn {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            StoredIn::Read(b) => b,
            StoredIn::Mapped(m, _) => m,
        }
    }
}

impl StoredIn {
    /// The slot's read buffer, to reuse; the mapping, if any, to keep looking at.
    pub(super) fn into_parts(self) -> (Vec<u8>, Option<Mapped>) {
        match self {
            StoredIn::Read(b) => (b, None),
            StoredIn::Mapped(m, b) => (b, Some(m)),
        }
    }
}

/// The dtypes of `job`'s inputs when its kernel computes rows `rows` from the inputs as stored
/// ([`whole_as_stored`]): the whole tensor. Else None: they are read decoded.
pub(super) fn stored_dtypes(job: &pb::TensorJob, (start, end): (u64, u64)) -> Option<Vec<DType>> {
    let (rows, out_row) = view2d(&job.shape);
    if start != 0 || end != rows {
        return None;
    }
    let dts = job
        .inputs
        .iter()
        .map(|s| input_dtype(s, job).ok())
        .collect::<Option<Vec<_>>>()?;
    let (ctx, m) = (super::tensor_ctx(job).ok()?, super::method_of(job).ok()?);
    let inputs = job.inputs.iter().zip(&dts).map(|(s, &dt)| {
        let plain = s.lora.is_none() && s.derived.is_none();
        (dt, view2d(&s.shape).1, plain)
    });
    whole_as_stored(m, &ctx, out_row, job.row_map.is_some(), inputs).then_some(dts)
}

/// Whether method `m` computes a whole tensor `ctx` from its inputs as stored
/// ([`crate::kernels::Method::takes_stored`]), each `(dtype, row length, plain)`: 16-bit
/// floats read as they are (`plain`: no LoRA adapter, no streamed stage) with the output's row
/// length `out_row`, and no vocabulary re-map. A local input is then mapped, not read into
/// the slot's memory, and the planner charges the tensor's memory by that.
pub fn whole_as_stored(
    m: &dyn Method,
    ctx: &TensorCtx,
    out_row: u64,
    row_map: bool,
    mut inputs: impl Iterator<Item = (DType, u64, bool)>,
) -> bool {
    !row_map
        && inputs.all(|(dt, row, plain)| {
            plain && row == out_row && matches!(dt, DType::BF16 | DType::F16)
        })
        && m.takes_stored(ctx)
}

/// Bytes `range` of `loc` in one range read (with retries), into `buf` (reused on the first
/// try).
pub(super) async fn read_whole(
    loc: &Location,
    range: std::ops::Range<u64>,
    buf: Vec<u8>,
) -> Result<Vec<u8>, TaskError> {
    let mut buf = Some(buf);
    Ok(retry(|| {
        let b = buf.take().unwrap_or_default();
        loc.store.read_range_into(&loc.path, range.clone(), b)
    })
    .await?)
}
