//! `shardmerge verify`: a checkpoint's index, files, headers and sizes agree, offsets are in
//! bounds and don't overlap. Reads headers only.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use shardmerge_worker::storage::Resolver;

use crate::error::{Error, Result};
use crate::plan::load_model;

/// What a verified checkpoint holds.
#[derive(Debug)]
pub struct Report {
    pub files: usize,
    pub tensors: usize,
    pub bytes: u64,
}

pub async fn verify(resolver: &Resolver, uri: &str) -> Result<Report> {
    // load_model parses every header (bounds, overlaps, sizes) and checks the index against them
    let m = load_model(resolver, Path::new("."), uri).await?;
    let idx_loc = m.loc.join("model.safetensors.index.json");
    let mut files = BTreeMap::new();
    for (uri, _) in m.tensors.values() {
        files.insert(uri.clone(), ());
    }
    if let Ok(b) = idx_loc.store.read_all(&idx_loc.path).await {
        let idx: Value = serde_json::from_slice(&b)
            .map_err(|e| Error::Input(format!("{}: not valid JSON: {e}", idx_loc.uri())))?;
        let wm = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .map_or(0, |w| w.len());
        if wm != m.tensors.len() {
            return Err(Error::Input(format!(
                "{}: the index lists {wm} tensors but the files hold {}",
                idx_loc.uri(),
                m.tensors.len()
            )));
        }
        if let Some(total) = idx.pointer("/metadata/total_size").and_then(Value::as_u64) {
            let sum: u64 = m.tensors.values().map(|(_, t)| t.end - t.start).sum();
            if total != sum {
                return Err(Error::Input(format!(
                    "{}: metadata.total_size is {total} but the tensors hold {sum} bytes",
                    idx_loc.uri()
                )));
            }
        }
    }
    // every file must be exactly as long as its header says: no trailing bytes
    for uri in files.keys() {
        let loc = resolver.resolve(uri, Path::new("/"))?;
        let size = loc.store.size(&loc.path).await?;
        let end = m
            .tensors
            .values()
            .filter(|(u, _)| u == uri)
            .map(|(_, t)| t.end)
            .max()
            .unwrap_or(0);
        if end != size && end != 0 {
            return Err(Error::Input(format!(
                "{uri}: {} bytes after the last tensor (file is {size} bytes, data ends at {end})",
                size.saturating_sub(end)
            )));
        }
    }
    Ok(Report {
        files: files.len(),
        tensors: m.tensors.len(),
        bytes: m.bytes,
    })
}
