//! Content keys of kept intermediates (`--keep-intermediates DIR`). A stage's key is the
//! SHA-256 of what its bytes are a function of: its recipe (stage names in it, not where their
//! checkpoints are), the options that shape its output (seed, draws, compute dtype, embedding
//! truncation), and each input's config, safetensors headers (every tensor's dtype, shape and
//! offsets) and checksum manifest when it has one (shardmerge's outputs, intermediates
//! included, do: so a stage whose input stage changed gets a new key too), and of an input's
//! LoRA adapter (`model+adapter`) its whole config and weights file, which are small. A kept
//! intermediate
//! is reused only when `DIR/NAME/shardmerge.stage.json` holds the same key and the checkpoint
//! is finished (its index is there); a folder existing is never enough.

use serde_json::json;
use sha2::{Digest, Sha256};
use shardmerge_worker::format::names::{CHECKSUMS, INDEX};
use shardmerge_worker::storage::{Location, Resolver};

use crate::error::Result;
use crate::job::SubmitOptions;
use crate::plan::load_model;
use crate::plan::lora::ADAPTER_FILES;
use crate::recipe::stages::Stage;
use crate::recipe::Recipe;

/// The file in a kept intermediate's folder that holds its key.
pub(super) const KEY_FILE: &str = "shardmerge.stage.json";

/// The content key of `stage`, whose recipe with its inputs located is `text`.
pub(super) async fn content_key(
    stage: &Stage,
    text: &str,
    o: &SubmitOptions,
    resolver: &Resolver,
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"shardmerge stage key 1\n");
    h.update(stage.text(&|n| format!("stage:{n}")).as_bytes());
    let opts = json!({
        "seed": o.seed, "rng": o.rng as i32, "compute_float32": o.compute_float32,
        "unsafe_truncate_embeddings": o.unsafe_truncate_embeddings,
    });
    h.update(opts.to_string().as_bytes());
    for name in Recipe::parse(text)?.referenced_models() {
        // `model+adapter`: the model as any other input, then the adapter's bytes
        let (model, adapter) = match name.split_once('+') {
            Some((m, a)) => (m, Some(a)),
            None => (name.as_str(), None),
        };
        let m = load_model(resolver, &o.base_dir, model).await?;
        h.update(format!("\nmodel {}\n", m.tensors.len()).as_bytes());
        h.update(
            serde_json::to_string(&m.config)
                .unwrap_or_default()
                .as_bytes(),
        );
        for (t, (uri, info)) in m.tensors.iter() {
            let file = uri.rsplit('/').next().unwrap_or_default();
            let line = format!(
                "\n{t}\t{file}\t{:?}\t{:?}\t{}\t{}",
                info.dtype, info.shape, info.start, info.end
            );
            h.update(line.as_bytes());
        }
        let sums = m.loc.join(CHECKSUMS);
        if sums.store.exists(&sums.path).await? {
            h.update(b"\nchecksums\n");
            h.update(&sums.store.read_all(&sums.path).await?);
        }
        if let Some(a) = adapter {
            hash_adapter(&mut h, a, o, resolver).await?;
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Adds adapter `reference`'s config and weights, whole, to `h`: an adapter trained again
/// keeps its shapes, so its headers alone would not tell it from the old one.
async fn hash_adapter(
    h: &mut Sha256,
    reference: &str,
    o: &SubmitOptions,
    resolver: &Resolver,
) -> Result<()> {
    let r = shardmerge_worker::storage::hub::model_reference(reference, &o.base_dir);
    let loc = resolver.resolve(&r, &o.base_dir)?;
    for file in ADAPTER_FILES {
        let f = loc.join(file);
        h.update(format!("\nadapter {file}\n").as_bytes());
        if f.store.exists(&f.path).await? {
            h.update(&f.store.read_all(&f.path).await?);
        }
    }
    Ok(())
}

/// What a kept intermediate's folder holds.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// A finished checkpoint with this key: reused.
    Same,
    /// One of ours with another key (or unfinished): replaced.
    Stale,
    /// No key of ours (missing, empty, or the user's files, which the run then refuses
    /// without --overwrite).
    Nothing,
}

fn location(out: &str, resolver: &Resolver) -> Result<Location> {
    Ok(resolver.resolve(out, &crate::embedded::cwd())?)
}

/// What `out` holds, against `key`.
pub(super) async fn check(out: &str, key: &str, resolver: &Resolver) -> Result<Found> {
    let loc = location(out, resolver)?;
    let kf = loc.join(KEY_FILE);
    if !kf.store.exists(&kf.path).await? {
        return Ok(Found::Nothing);
    }
    let held: Option<serde_json::Value> =
        serde_json::from_slice(&kf.store.read_all(&kf.path).await?).ok();
    let same = held.as_ref().and_then(|v| v.get("key")?.as_str()) == Some(key);
    let index = loc.join(INDEX);
    if same && index.store.exists(&index.path).await? {
        Ok(Found::Same)
    } else {
        Ok(Found::Stale)
    }
}

/// Records `key` in `out` (after its checkpoint is committed).
pub(super) async fn write(out: &str, stage: &Stage, key: &str, resolver: &Resolver) -> Result<()> {
    let kf = location(out, resolver)?.join(KEY_FILE);
    let v = json!({"stage": stage.name, "key": key, "recipe": stage.raw_text()});
    let text = serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
    kf.store.put(&kf.path, text.into_bytes().into()).await?;
    Ok(())
}
