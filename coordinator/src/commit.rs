//! The commit: once every output file is complete, write `config.json`, the tokenizer files, a
//! model card with the recipe, the checksum manifest (`shardmerge.checksums.json`: each data
//! file's size and CRC-32C, combined from its parts' receipts), and
//! `model.safetensors.index.json` last. A folder without the index is not a finished
//! checkpoint. An `--overwrite` job also completes its data files here (`commit_checkpoint`).

use bytes::Bytes;
use serde_json::{json, Map, Value};
use shardmerge_worker::format::names::{CHECKSUMS, CONFIG, INDEX, MODEL_CARD};
use shardmerge_worker::storage::{Location, Receipt, Upload};

use crate::error::{Error, Result};
use crate::plan::{Plan, TOKENIZER_FILES};

/// The index manifest: every tensor's file, and the total size of the tensor data.
pub(crate) fn index_json(plan: &Plan) -> Value {
    let mut wm = Map::new();
    let mut total = 0u64;
    for f in &plan.files {
        for (k, &ti) in f.tensors.iter().enumerate() {
            wm.insert(plan.tensors[ti].name.clone(), Value::String(f.name.clone()));
            let (a, b) = f.layout.spans[k];
            total += b - a;
        }
    }
    json!({ "metadata": { "total_size": total }, "weight_map": Value::Object(wm) })
}

pub(crate) fn model_card(plan: &Plan) -> String {
    let models: Vec<String> = plan
        .models
        .iter()
        .map(|m| format!("- {}", m.name))
        .collect();
    format!(
        "---\nlibrary_name: transformers\ntags:\n- merge\n- shardmerge\n---\n# Merged model\n\n\
         This model was merged with shardmerge, from a mergekit recipe, using the `{}` method.\n\n\
         ## Models merged\n\n{}\n\n## Recipe\n\n```yaml\n{}\n```\n",
        plan.recipe.merge_method,
        models.join("\n"),
        plan.recipe.text.trim_end()
    )
}

/// Each output file's (size, CRC-32C), from its parts' receipts (`receipts[fi]` in part
/// order), combined without reading any data again.
pub(crate) fn file_sums(plan: &Plan, receipts: &[Vec<Receipt>]) -> Result<Vec<(u64, u32)>> {
    let mut sums = Vec::with_capacity(plan.files.len());
    for (fi, f) in plan.files.iter().enumerate() {
        let parts = receipts.get(fi).map_or(&[][..], Vec::as_slice);
        let mut crc = 0u32;
        let mut size = 0u64;
        for r in parts {
            crc = shardmerge_worker::crc::combine(crc, r.crc32c, r.size);
            size += r.size;
        }
        if size != f.layout.total_size {
            return Err(Error::commit(
                "",
                format!(
                    "the parts of {} hold {size} bytes but the plan lays out {}; the job \
                 cannot record its checksums (run it again)",
                    f.name, f.layout.total_size
                ),
            ));
        }
        sums.push((size, crc));
    }
    Ok(sums)
}

/// The checksum manifest (`shardmerge.checksums.json`) of the plan's output files.
pub(crate) fn checksums_json(plan: &Plan, sums: &[(u64, u32)]) -> Value {
    let mut files = Map::new();
    for (f, (size, crc)) in plan.files.iter().zip(sums) {
        files.insert(
            f.name.clone(),
            json!({ "size": size, "crc32c": format!("{crc:08x}") }),
        );
    }
    json!({ "algorithm": "crc32c", "files": Value::Object(files) })
}

/// Writes `config.json`, the tokenizer files, the model card, the checksum manifest, and the
/// index last. Returns the names written.
pub(crate) async fn write_checkpoint_files(
    plan: &Plan,
    out: &Location,
    checksums: &Value,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    if let Some(cfg) = &plan.config {
        put(out, CONFIG, to_json(cfg, CONFIG)?).await?;
        names.push(CONFIG.to_string());
    }
    if let Some(src) = &plan.tokenizer_from {
        for name in TOKENIZER_FILES {
            if crate::plan::vocab::made_for_output(plan, name) {
                continue;
            }
            let l = src.join(name);
            match shardmerge_worker::storage::retry(|| l.store.read_all(&l.path)).await {
                Ok(b) => {
                    put(out, name, b).await?;
                    names.push(name.to_string());
                }
                Err(e) if e.not_found => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for (name, bytes) in &plan.tokenizer_files {
        put(out, name, bytes.clone()).await?;
        names.push(name.clone());
    }
    put(out, MODEL_CARD, model_card(plan)).await?;
    names.push(MODEL_CARD.to_string());
    put(out, CHECKSUMS, to_json(checksums, CHECKSUMS)?).await?;
    names.push(CHECKSUMS.to_string());
    let idx = to_json(&index_json(plan), INDEX)?;
    put(out, INDEX, idx).await?;
    names.push(INDEX.to_string());
    Ok(names)
}

/// Commits a checkpoint whose data files are all written. `files[fi]`: output file `fi`'s
/// upload and its parts' receipts in part order.
///
/// `replace` (an `--overwrite` job): the data files were left uncompleted (temporary local
/// files, S3 multipart uploads in progress), so the folder still held the old checkpoint,
/// whole, until now. Here the old index (and checksum manifest) go first, then the new data
/// files complete at their final names (a local rename; S3 completes the multipart upload at
/// the final key: no copy of the data), the small files and the index follow, and only then are
/// the files of the old checkpoint that the new one does not have removed. Run again after an
/// interruption (a restarted coordinator resuming the job), it completes what is left: a file
/// already completed is recognised by its size and CRC-32C.
pub async fn commit_checkpoint(
    plan: &Plan,
    out: &Location,
    files: &[(Upload, Vec<Receipt>)],
    replace: bool,
) -> Result<()> {
    let receipts: Vec<Vec<Receipt>> = files.iter().map(|(_, r)| r.clone()).collect();
    let sums = file_sums(plan, &receipts)?;
    let checksums = checksums_json(plan, &sums);
    let before = if replace {
        match out.store.list(&out.path).await {
            Ok(names) => names,
            Err(e) if e.not_found => Vec::new(),
            Err(e) => return Err(e.into()),
        }
    } else {
        Vec::new()
    };
    if replace {
        for name in [INDEX, CHECKSUMS] {
            let l = out.join(name);
            l.store.delete(&l.path).await?;
        }
        for ((upload, parts), &(size, crc)) in files.iter().zip(&sums) {
            if let Err(e) = out.store.finish_upload(upload, parts).await {
                // A coordinator restarted during this commit: the previous one may have
                // completed the file already. Only the new file's exact bytes count (the old
                // checkpoint's file of the same name may well have the same size).
                let done = Location {
                    store: out.store.clone(),
                    path: upload.path.clone(),
                };
                let same = out.store.size(&upload.path).await.is_ok_and(|n| n == size)
                    && crate::verify::file_crc(&done, size, Vec::new())
                        .await
                        .is_ok_and(|(c, _)| c == crc);
                if !same {
                    return Err(Error::commit(&upload.path, format!("completing it: {e}")));
                }
            }
        }
    }
    let mut names = write_checkpoint_files(plan, out, &checksums).await?;
    names.extend(plan.files.iter().map(|f| f.name.clone()));
    let stale = |n: &&String| !names.contains(n) && !crate::claim::is_claim(n);
    for old in before.iter().filter(stale) {
        let l = out.join(old);
        match l.store.delete(&l.path).await {
            Ok(()) => tracing::debug!("removed {} (not part of the new checkpoint)", l.uri()),
            Err(e) => tracing::warn!(
                "the new checkpoint is committed but {} of the old one could not be removed: {e}",
                l.uri()
            ),
        }
    }
    Ok(())
}

/// Writes a small file into the output folder.
pub async fn put(loc: &Location, name: &str, data: impl Into<Bytes>) -> Result<()> {
    let l = loc.join(name);
    l.store.put(&l.path, data.into()).await?;
    Ok(())
}

/// `v` as pretty JSON; a value that cannot be written fails the commit rather than writing an
/// empty `name`.
fn to_json(v: &Value, name: &str) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v)
        .map_err(|e| Error::commit("", format!("cannot write {name} as JSON: {e}")))
}
