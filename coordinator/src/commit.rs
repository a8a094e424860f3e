//! The commit: once every output file is complete, write `config.json`, the tokenizer files, a
//! model card with the recipe, and `model.safetensors.index.json` last. A folder without the
//! index is not a finished checkpoint.

use serde_json::{json, Map, Value};
use shardmerge_worker::storage::Location;

use crate::error::Result;
use crate::job::put;
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
        put(
            out,
            "config.json",
            serde_json::to_vec_pretty(cfg).unwrap_or_default(),
        )
        .await?;
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
    let idx = serde_json::to_vec_pretty(&index_json(plan)).unwrap_or_default();
    put(out, "model.safetensors.index.json", idx).await?;
    Ok(())
}
