//! The adapter's commit: lays out `adapter_model.safetensors` from the parts' own headers (a
//! module's rank is in its part's shapes) and the tensors saved whole, copies every tensor's
//! bytes into it in pieces (memory: one piece), completes it, then writes `adapter_config.json`
//! and the card, and removes the parts.

use std::collections::BTreeMap;

use bytes::Bytes;
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::format::safetensors::{layout_file, LayoutEntry, StDtype, TensorInfo};
use shardmerge_worker::storage::{retry, Location, Receipt, Resolver, Upload};

use super::ExtractPlan;
use crate::error::{Error, Result};
use crate::plan::read_header;

/// The adapter's weights file (PEFT's name).
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// Bytes gathered before a part is written (at least S3's smallest part).
const PIECE: usize = 8 << 20;

/// One tensor of the adapter and where its bytes are.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    uri: String,
    span: (u64, u64),
}

fn entry(name: &str, uri: &str, t: &TensorInfo) -> Result<Entry> {
    let StDtype::Float(dtype) = t.dtype else {
        return Err(Error::input(
            uri,
            format!("tensor {name} is {}, not a float", t.dtype.name()),
        ));
    };
    Ok(Entry {
        name: name.to_string(),
        dtype,
        shape: t.shape.clone(),
        uri: uri.to_string(),
        span: (t.start, t.end),
    })
}

/// Every tensor of the adapter, by name: the parts' and the saved ones.
async fn entries(p: &ExtractPlan, parts: &[Location]) -> Result<Vec<Entry>> {
    let mut all = BTreeMap::new();
    for part in parts {
        let h = read_header(part).await?;
        for (n, t) in &h.tensors {
            all.insert(n.clone(), entry(n, &part.uri(), t)?);
        }
    }
    for s in &p.saved {
        all.insert(s.name.clone(), entry(&s.name, &s.uri, &s.info)?);
    }
    Ok(all.into_values().collect())
}

/// Bytes in a piece, written as a part once it is full.
struct Pieces<'a> {
    loc: &'a Location,
    upload: &'a Upload,
    buf: Vec<u8>,
    at: u64,
    receipts: Vec<Receipt>,
}

impl Pieces<'_> {
    async fn push(&mut self, data: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let (n, at) = (self.receipts.len() as u32, self.at);
        let r = retry(|| self.loc.store.write_part(self.upload, n, at, data.clone())).await?;
        self.at += data.len() as u64;
        self.receipts.push(r);
        Ok(())
    }
}

/// Writes `adapter_model.safetensors` into `out` from `es`; returns its size.
async fn write_weights(out: &Location, es: &[Entry], resolver: &Resolver) -> Result<u64> {
    let layout_entries: Vec<LayoutEntry> = es
        .iter()
        .map(|e| LayoutEntry {
            name: e.name.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let layout = layout_file(&layout_entries, &meta);
    let loc = out.join(WEIGHTS);
    let upload = retry(|| loc.store.begin_upload(&loc.path, layout.total_size)).await?;
    let mut w = Pieces {
        loc: &loc,
        upload: &upload,
        buf: Vec::with_capacity(PIECE * 2),
        at: 0,
        receipts: Vec::new(),
    };
    let copied = async {
        w.push(&layout.header).await?;
        for e in es {
            let src = resolver.resolve(&e.uri, std::path::Path::new("/"))?;
            let mut a = e.span.0;
            while a < e.span.1 {
                let b = e.span.1.min(a + PIECE as u64);
                let bytes = retry(|| src.store.read_range(&src.path, a..b)).await?;
                w.push(&bytes).await?;
                a = b;
            }
        }
        w.flush().await?;
        retry(|| {
            loc.store
                .check_upload(&upload, &w.receipts, layout.total_size)
        })
        .await?;
        retry(|| loc.store.finish_upload(&upload, &w.receipts)).await?;
        Ok::<_, Error>(())
    }
    .await;
    if let Err(e) = copied {
        let _ = loc.store.abort_upload(&upload).await;
        return Err(Error::commit(loc.uri(), e));
    }
    Ok(layout.total_size)
}

/// Commits the adapter into `out`: weights, then `adapter_config.json` and `README.md`.
pub async fn commit(
    p: &ExtractPlan,
    out: &Location,
    parts: &[Location],
    config: &serde_json::Value,
    card: String,
    resolver: &Resolver,
) -> Result<u64> {
    let es = entries(p, parts).await?;
    let size = write_weights(out, &es, resolver).await?;
    let text = serde_json::to_string_pretty(config).unwrap_or_default() + "\n";
    let cfg = out.join("adapter_config.json");
    retry(|| cfg.store.put(&cfg.path, Bytes::from(text.clone()))).await?;
    let readme = out.join("README.md");
    retry(|| readme.store.put(&readme.path, Bytes::from(card.clone()))).await?;
    remove_parts(parts).await;
    Ok(size)
}

/// Removes the parts (and their folder, when local and empty); failures are only logged.
pub async fn remove_parts(parts: &[Location]) {
    for part in parts {
        if let Err(e) = part.store.delete(&part.path).await {
            if !e.not_found {
                tracing::warn!("could not remove the part {}: {e}", part.uri());
            }
        }
    }
    if let Some(first) = parts.first() {
        if first.store.is_local() {
            if let Some(dir) = std::path::Path::new(&first.path).parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}
