//! The adapter's `adapter_config.json` (the fields mergekit-extract-lora writes) and its model
//! card.

use serde_json::{json, Map, Value};

/// `adapter_config.json` for modules of the given ranks (module name, rank; in task order):
/// `r` and `lora_alpha` are the largest rank, and every module of another rank is listed in
/// `rank_pattern` and `alpha_pattern` with its rank as both (so each module's scale is 1).
pub fn adapter_config(base: &str, ranks: &[(String, usize)], modules_to_save: &[String]) -> Value {
    let r = ranks.iter().map(|(_, r)| *r).max().unwrap_or(0);
    let mut targets: Vec<&str> = ranks
        .iter()
        .map(|(m, _)| m.rsplit('.').next().unwrap_or(m))
        .collect();
    targets.sort_unstable();
    targets.dedup();
    let pattern: Map<String, Value> = ranks
        .iter()
        .filter(|(_, k)| *k != r)
        .map(|(m, k)| (m.clone(), json!(k)))
        .collect();
    json!({
        "base_model_name_or_path": base,
        "peft_type": "LORA",
        "use_rslora": false,
        "target_modules": targets,
        "modules_to_save": modules_to_save,
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "inference_mode": true,
    })
}

/// The adapter's `README.md`: what it was extracted from, and how.
pub fn card(base: &str, ft: &str, invocation: &str, r: usize) -> String {
    format!(
        "---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- shardmerge\n- lora\n---\n\
         # LoRA adapter extracted from {ft}\n\n\
         A PEFT LoRA adapter (rank up to {r}) that takes `{base}` to a low-rank approximation of \
         `{ft}`: each module's difference between the two, factored by a truncated SVD, written \
         by `shardmerge extract-lora`.\n\n```sh\n{invocation}\n```\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_of_another_rank_get_patterns() {
        let ranks = vec![
            ("model.layers.0.self_attn.q_proj".to_string(), 8),
            ("model.layers.0.mlp.down_proj".to_string(), 5),
            ("model.layers.1.self_attn.q_proj".to_string(), 8),
        ];
        let c = adapter_config("b", &ranks, &["norm".to_string()]);
        assert_eq!(c["r"], 8);
        assert_eq!(c["lora_alpha"], 8);
        assert_eq!(c["target_modules"], json!(["down_proj", "q_proj"]));
        assert_eq!(
            c["rank_pattern"],
            json!({"model.layers.0.mlp.down_proj": 5})
        );
        assert_eq!(c["alpha_pattern"], c["rank_pattern"]);
        assert_eq!(c["modules_to_save"], json!(["norm"]));
    }
}
