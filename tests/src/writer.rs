//! The one safetensors writer of the test suites: a checkpoint folder's weight files, sharded
//! as huggingface_hub shards them (with `model.safetensors.index.json` when there is more than
//! one file), each header laid out by the product's own `layout_file`, and the data streamed
//! tensor by tensor in chunks, so a large model is never held in memory.
//!
//! The `shardmerge-tests` crate exports it as `shardmerge_tests::writer`; the coordinator's
//! suites cannot depend on that crate (it depends on theirs) and include this file, with
//! `family.rs`, from `coordinator/tests/common`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use shardmerge_worker::format::dtype::{encode, DType};
use shardmerge_worker::format::safetensors::{layout_file, LayoutEntry};

/// Elements per chunk handed to a data source, 4 Mi.
pub const CHUNK: usize = 1 << 22;

/// What `write_checkpoint` wrote.
#[derive(Debug, Default)]
pub struct ModelStats {
    pub files: Vec<PathBuf>,
    pub params: u64,
    pub tensor_bytes: u64,
    pub file_bytes: u64,
}

/// Splits tensors into shards the way huggingface_hub does: a tensor starts a new shard when it
/// would push the current one past `max`; a tensor bigger than `max` gets a shard of its own.
pub fn split_shards(sizes: &[u64], max: Option<u64>) -> Vec<Vec<usize>> {
    let Some(max) = max else {
        return vec![(0..sizes.len()).collect()];
    };
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_size = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if s > max {
            shards.push(vec![i]);
            continue;
        }
        if cur_size + s > max && !cur.is_empty() {
            shards.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur.push(i);
        cur_size += s;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// The bytes of tensor `i` (an index into the entries given) from element `start` on, one
/// chunk at a time: `out` holds `out.len() / dtype size` elements. Called tensor by tensor, in
/// the order the files hold them, chunks in order.
pub type DataSource<'a> = dyn FnMut(usize, u64, &mut [u8]) + 'a;

/// Writes the weight files of a checkpoint into `dir` (created if missing): one
/// `model.safetensors`, or shards of at most `shard_size` bytes with an index. Files are
/// written under a `.partial` name and renamed when complete; an index or shards left by an
/// earlier write with another sharding are removed.
pub fn write_checkpoint(
    dir: &Path,
    tensors: &[LayoutEntry],
    shard_size: Option<u64>,
    data: &mut DataSource<'_>,
) -> io::Result<ModelStats> {
    fs::create_dir_all(dir)?;
    let numel = |t: &LayoutEntry| t.shape.iter().product::<u64>();
    let sizes: Vec<u64> = tensors
        .iter()
        .map(|t| numel(t) * t.dtype.size() as u64)
        .collect();
    let shards = split_shards(&sizes, shard_size);
    let n = shards.len();
    let mut stats = ModelStats::default();
    let mut weight_map = BTreeMap::new();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut buf = Vec::new();
    for (k, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let entries: Vec<LayoutEntry> = shard.iter().map(|&i| tensors[i].clone()).collect();
        let layout = layout_file(&entries, &meta);
        let path = dir.join(&fname);
        let partial = dir.join(format!("{fname}.partial"));
        let mut w = BufWriter::with_capacity(8 << 20, File::create(&partial)?);
        w.write_all(&layout.header)?;
        for &i in shard {
            let (t, count) = (&tensors[i], numel(&tensors[i]));
            let es = t.dtype.size();
            let mut start = 0u64;
            while start < count {
                let len = (count - start).min(CHUNK as u64) as usize;
                buf.resize(len * es, 0);
                data(i, start, &mut buf);
                w.write_all(&buf)?;
                start += len as u64;
            }
            weight_map.insert(t.name.clone(), fname.clone());
            stats.params += count;
            stats.tensor_bytes += sizes[i];
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&partial, &path)?;
        stats.file_bytes += layout.total_size;
        stats.files.push(path);
    }
    let index = dir.join("model.safetensors.index.json");
    if n > 1 {
        let v = json!({
            "metadata": {"total_size": stats.tensor_bytes},
            "weight_map": weight_map,
        });
        write_json(&index, &v)?;
    } else if index.exists() {
        fs::remove_file(&index)?;
    }
    // stale shards of an earlier run with another sharding
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
        if name.ends_with(".safetensors") && !stats.files.contains(&p) {
            fs::remove_file(&p)?;
        }
    }
    Ok(stats)
}

/// [`write_checkpoint`] of tensors whose values are given as f32, each stored as its entry's
/// (floating-point) dtype.
pub fn write_values(
    dir: &Path,
    tensors: &[(LayoutEntry, &[f32])],
    shard_size: Option<u64>,
) -> io::Result<ModelStats> {
    let entries: Vec<LayoutEntry> = tensors.iter().map(|(e, _)| e.clone()).collect();
    write_checkpoint(dir, &entries, shard_size, &mut |i, start, out| {
        let (e, v) = &tensors[i];
        let start = start as usize;
        let n = out.len() / e.dtype.size();
        encode(e.dtype, &v[start..start + n], out);
    })
}

/// An f32 tensor's entry: `name`, `shape`, stored as `dtype`.
pub fn entry(name: &str, dtype: DType, shape: &[u64]) -> LayoutEntry {
    LayoutEntry {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// Writes `v` as transformers does: two-space indent, trailing newline.
pub fn write_json(path: &Path, v: &Value) -> io::Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
    s.push('\n');
    fs::write(path, s)
}
