//! The commit: once every output file is complete, write `config.json`, the tokenizer files, a
//! model card with the recipe, and `model.safetensors.index.json` last. A folder without the
//! index is not a finished checkpoint.

use bytes::Bytes;
use serde_json::{json, Map, Value};
use shardmerge_worker::storage::Location;

use crate::error::{Error, Result};
use crate::plan::{Plan, TOKENIZER_FILES};

/// The index manifest: every tensor's file, and the total size of the tensor data.
pub fn index_json(plan: &Plan) -> Value {
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

pub fn model_card(plan: &Plan) -> String {
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

pub async fn write_checkpoint_files(plan: &Plan, out: &Location) -> Result<()> {
    if let Some(cfg) = &plan.config {
        put(out, "config.json", to_json(cfg, "config.json")?).await?;
    }
    if let Some(src) = &plan.tokenizer_from {
        for name in TOKENIZER_FILES {
            let l = src.join(name);
            match shardmerge_worker::storage::retry(|| l.store.read_all(&l.path)).await {
                Ok(b) => put(out, name, b).await?,
                Err(e) if e.not_found => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    put(out, "README.md", model_card(plan)).await?;
    let idx = to_json(&index_json(plan), "model.safetensors.index.json")?;
    put(out, "model.safetensors.index.json", idx).await?;
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
        .map_err(|e| Error::Job(format!("commit: cannot write {name} as JSON: {e}")))
}
