//! One module of `extract-lora`: read the fine-tuned and the base weight whole, take their
//! task vector, factor it (`kernels::lowrank`), and write the module's adapter tensors as a
//! *part*: a small safetensors file with the tensors' final names, its rank in their shapes,
//! that the commit copies into `adapter_model.safetensors`. A task is pure: running it twice
//! writes the same part.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;

use super::{fatal, TaskError};
use crate::format::dtype::{self, DType};
use crate::format::safetensors::{layout_file, LayoutEntry};
use crate::kernels::lowrank::{self, LowRank};
use crate::kernels::round::Work;
use crate::storage::{retry, Resolver};

/// One tensor of one input checkpoint: its file and absolute byte span.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub uri: String,
    pub start: u64,
    pub end: u64,
    pub dtype: DType,
}

/// A module to factor: everything the task needs, nothing the worker must remember.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleTask {
    /// The module's name (`model.layers.0.self_attn.q_proj`), its weight `MODULE.weight`.
    pub module: String,
    /// The weight's shape, `[rows, cols]`, the same in both checkpoints.
    pub shape: [u64; 2],
    pub ft: Source,
    pub base: Source,
    /// The module's bias in both checkpoints (its delta is saved as `lora_B.bias`).
    pub bias: Option<(Source, Source)>,
    /// An embedding: factored transposed, saved as `lora_embedding_A`/`lora_embedding_B`.
    pub embedding: bool,
    /// The task vector's dtype (torch's promotion of the two inputs'), also the factors'.
    pub dtype: DType,
    pub lowrank: LowRank,
    /// Where the part goes (a URI).
    pub part: String,
}

/// What a module's task did.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleDone {
    pub rank: usize,
    /// Every singular value of the task vector, nonincreasing.
    pub singular: Vec<f32>,
    pub bytes_read: u64,
    pub part_bytes: u64,
}

/// The dtype torch gives `a - b`: the common one, else float32.
pub fn promoted(a: DType, b: DType) -> DType {
    if a == b {
        a
    } else {
        DType::F32
    }
}

/// Memory a module's task holds at its peak, for a weight of `rows x cols` read in a dtype of
/// `in_size` bytes: one input's raw bytes, the two inputs and their task vector as f32, the
/// SVD's (`lowrank::memory`) and the part.
pub fn task_memory(rows: u64, cols: u64, in_size: u64, max_rank: u64) -> u64 {
    let n = rows * cols;
    let r = max_rank.min(rows.min(cols));
    n * (in_size + 12) + lowrank::memory(rows, cols, max_rank) + r * (rows + cols) * 4 + (1 << 16)
}

/// Reads `src` whole as f32, counting the bytes into `read`.
async fn read_f32(
    resolver: &Resolver,
    src: &Source,
    read: &mut u64,
) -> Result<Vec<f32>, TaskError> {
    let loc = resolver.resolve(&src.uri, Path::new("/"))?;
    let raw = retry(|| loc.store.read_range(&loc.path, src.start..src.end)).await?;
    *read += raw.len() as u64;
    let size = src.dtype.size();
    if !raw.len().is_multiple_of(size) || raw.len() as u64 != src.end - src.start {
        return Err(fatal(format!(
            "{}: read {} bytes of {}..{}",
            src.uri,
            raw.len(),
            src.start,
            src.end
        )));
    }
    let mut v = vec![0f32; raw.len() / size];
    dtype::decode(src.dtype, &raw, &mut v);
    Ok(v)
}

fn work_of(d: DType) -> Work {
    match d {
        DType::BF16 => Work::BF16,
        DType::F16 => Work::F16,
        _ => Work::F32,
    }
}

/// `ft - base` in the task vector's dtype, read from storage.
async fn delta(
    resolver: &Resolver,
    ft: &Source,
    base: &Source,
    out: DType,
    read: &mut u64,
) -> Result<Vec<f32>, TaskError> {
    let x = read_f32(resolver, ft, read).await?;
    let b = read_f32(resolver, base, read).await?;
    if x.len() != b.len() {
        return Err(fatal(format!(
            "{} has {} values but {} has {}",
            ft.uri,
            x.len(),
            base.uri,
            b.len()
        )));
    }
    let mut d = vec![0f32; x.len()];
    lowrank::task_vector(&x, &b, work_of(out), &mut d);
    Ok(d)
}

/// Runs a module's task: its factors (and bias delta) written as a part at `t.part`.
pub async fn extract_module(resolver: &Resolver, t: &ModuleTask) -> Result<ModuleDone, TaskError> {
    let mut read = 0;
    let d = delta(resolver, &t.ft, &t.base, t.dtype, &mut read).await?;
    let [rows, cols] = t.shape;
    if d.len() as u64 != rows * cols {
        return Err(fatal(format!(
            "{}: {} values for shape [{rows}, {cols}]",
            t.module,
            d.len()
        )));
    }
    let (embedding, o) = (t.embedding, t.lowrank);
    let f = tokio::task::spawn_blocking(move || {
        lowrank::factors(&d, rows as usize, cols as usize, embedding, &o)
    })
    .await
    .map_err(|e| fatal(format!("{}: the SVD task stopped: {e}", t.module)))?
    .map_err(|e| fatal(format!("{}.weight: {e}", t.module)))?;
    let (out, inn) = if t.embedding {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let r = f.rank as u64;
    let (ka, kb) = if t.embedding {
        ("lora_embedding_A", "lora_embedding_B")
    } else {
        ("lora_A.weight", "lora_B.weight")
    };
    let name = |k: &str| format!("base_model.model.{}.{k}", t.module);
    let mut tensors = vec![(name(ka), vec![r, inn], f.a), (name(kb), vec![out, r], f.b)];
    if let Some((fb, bb)) = &t.bias {
        let db = delta(resolver, fb, bb, t.dtype, &mut read).await?;
        tensors.push((name("lora_B.bias"), vec![db.len() as u64], db));
    }
    let part = part_file(&tensors, t.dtype);
    let part_bytes = part.len() as u64;
    let loc = resolver.resolve(&t.part, Path::new("/"))?;
    let data = Bytes::from(part);
    retry(|| loc.store.put(&loc.path, data.clone())).await?;
    Ok(ModuleDone {
        rank: f.rank,
        singular: f.singular,
        bytes_read: read,
        part_bytes,
    })
}

/// A safetensors file of `tensors` (name, shape, f32 values) encoded as `dtype`, in order.
fn part_file(tensors: &[(String, Vec<u64>, Vec<f32>)], dtype: DType) -> Vec<u8> {
    let entries: Vec<LayoutEntry> = tensors
        .iter()
        .map(|(n, s, _)| LayoutEntry {
            name: n.clone(),
            dtype,
            shape: s.clone(),
        })
        .collect();
    let layout = layout_file(&entries, &BTreeMap::new());
    let mut out = vec![0u8; layout.total_size as usize];
    out[..layout.header.len()].copy_from_slice(&layout.header);
    for ((_, _, v), &(a, b)) in tensors.iter().zip(&layout.spans) {
        dtype::encode(dtype, v, &mut out[a as usize..b as usize]);
    }
    out
}
