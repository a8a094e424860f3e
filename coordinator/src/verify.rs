//! `shardmerge verify`: a checkpoint's index, files, headers and sizes agree, offsets are in
//! bounds and don't overlap. Reads headers only. `verify --data` (`verify_data`) also re-reads
//! the data files against the checksum manifest the commit wrote.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use shardmerge_worker::storage::{Location, Resolver};

use crate::error::{Error, Result};
use crate::plan::load_model;
use shardmerge_worker::format::names::{self, CHECKSUMS};

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
    let idx_loc = m.loc.join(names::INDEX);
    let mut files = BTreeMap::new();
    for (uri, _) in m.tensors.values() {
        files.insert(uri.clone(), ());
    }
    if let Ok(b) = idx_loc.store.read_all(&idx_loc.path).await {
        let idx: Value = serde_json::from_slice(&b)
            .map_err(|e| Error::input(idx_loc.uri(), format!("not valid JSON: {e}")))?;
        let wm = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .map_or(0, |w| w.len());
        if wm != m.tensors.len() {
            return Err(Error::input(
                idx_loc.uri(),
                format!(
                    "the index lists {wm} tensors but the files hold {}",
                    m.tensors.len()
                ),
            ));
        }
        if let Some(total) = idx.pointer("/metadata/total_size").and_then(Value::as_u64) {
            let sum: u64 = m.tensors.values().map(|(_, t)| t.end - t.start).sum();
            if total != sum {
                return Err(Error::input(
                    idx_loc.uri(),
                    format!("metadata.total_size is {total} but the tensors hold {sum} bytes"),
                ));
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
            return Err(Error::input(
                uri,
                format!(
                    "{} bytes after the last tensor (file is {size} bytes, data ends at {end})",
                    size.saturating_sub(end)
                ),
            ));
        }
    }
    Ok(Report {
        files: files.len(),
        tensors: m.tensors.len(),
        bytes: m.bytes,
    })
}

/// What `verify --data` checked.
#[derive(Debug)]
pub struct DataReport {
    pub files: usize,
    pub bytes: u64,
}

/// Bytes read at a time by `verify_data`: its memory stays at one buffer of this size.
const DATA_CHUNK: u64 = 8 << 20;

/// `shardmerge verify --data`: re-reads every data file the checkpoint's checksum manifest
/// (`shardmerge.checksums.json`, written by the commit) lists, streaming, and compares its size
/// and CRC-32C with the manifest's. Every data file of the checkpoint must be listed.
pub async fn verify_data(resolver: &Resolver, uri: &str) -> Result<DataReport> {
    let m = load_model(resolver, Path::new("."), uri).await?;
    let man_loc = m.loc.join(CHECKSUMS);
    let raw = match man_loc.store.read_all(&man_loc.path).await {
        Ok(b) => b,
        Err(e) if e.not_found => {
            return Err(Error::input(
                man_loc.uri(),
                "no checksum manifest; only checkpoints written by shardmerge (with this \
                 version or later) can be checked with --data (plain `verify` checks the \
                 structure)",
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let man: Value = serde_json::from_slice(&raw)
        .map_err(|e| Error::input(man_loc.uri(), format!("not valid JSON: {e}")))?;
    let bad = |what: &str| Error::input(man_loc.uri(), what.to_string());
    if man.get("algorithm").and_then(Value::as_str) != Some("crc32c") {
        return Err(bad("unknown \"algorithm\" (expected \"crc32c\")"));
    }
    let listed = man
        .get("files")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no \"files\" object"))?;
    // every data file the index or the folder names must be covered by the manifest
    for (file_uri, _) in m.tensors.values() {
        let name = file_uri.rsplit('/').next().unwrap_or(file_uri);
        if !listed.contains_key(name) {
            return Err(bad(&format!(
                "does not list {name}, which the checkpoint's tensors are in"
            )));
        }
    }
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    for (name, entry) in listed {
        if name.contains('/') || name.contains("..") {
            return Err(bad(&format!("{name:?} is not a file name")));
        }
        let want_size = entry
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(&format!("{name}: no \"size\"")))?;
        let want_crc = entry
            .get("crc32c")
            .and_then(Value::as_str)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| bad(&format!("{name}: no \"crc32c\" (8 hex digits)")))?;
        let loc = m.loc.join(name);
        let size = loc.store.size(&loc.path).await?;
        if size != want_size {
            return Err(Error::input(
                loc.uri(),
                format!(
                    "{size} bytes, but the checksum manifest says {want_size}: the file was \
                 changed or truncated after the commit; write the checkpoint again"
                ),
            ));
        }
        let crc;
        (crc, buf) = file_crc(&loc, size, buf).await?;
        if crc != want_crc {
            return Err(Error::input(
                loc.uri(),
                format!(
                    "data checksum mismatch (CRC-32C {crc:08x}, the manifest says \
                 {want_crc:08x}): the file's bytes changed after the commit; write the \
                 checkpoint again or restore the file"
                ),
            ));
        }
        bytes += size;
    }
    Ok(DataReport {
        files: listed.len(),
        bytes,
    })
}

/// The CRC-32C of the first `size` bytes of `loc`, read `DATA_CHUNK` bytes at a time into
/// `buf` (handed back for reuse).
pub async fn file_crc(loc: &Location, size: u64, mut buf: Vec<u8>) -> Result<(u32, Vec<u8>)> {
    let mut crc = 0u32;
    let mut at = 0u64;
    while at < size {
        let end = (at + DATA_CHUNK).min(size);
        buf = loc.store.read_range_into(&loc.path, at..end, buf).await?;
        crc = crc32c::crc32c_append(crc, &buf);
        at = end;
    }
    Ok((crc, buf))
}
