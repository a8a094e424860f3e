//! The module kind of a tensor, from its name (mergekit-style names of the common families).

/// Every kind, in report order.
pub const KINDS: &[&str] = &["attention", "mlp", "embeddings", "norms", "other"];

/// `attention`, `mlp`, `embeddings`, `norms` or `other`.
pub fn of(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    let has = |keys: &[&str]| keys.iter().any(|k| n.contains(k));
    if has(&["norm", "ln_", ".ln", "ln_f"]) {
        "norms"
    } else if has(&["embed", "wte.", "wpe.", "lm_head", "embed_out"]) {
        "embeddings"
    } else if has(&[
        "attn",
        "attention",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "qkv",
    ]) {
        "attention"
    } else if has(&[
        "mlp",
        "feed_forward",
        "ffn",
        "gate_proj",
        "up_proj",
        "down_proj",
        "experts",
        "fc1",
        "fc2",
        "c_fc",
        "dense_h_to_4h",
        "dense_4h_to_h",
    ]) {
        "mlp"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::of;

    #[test]
    fn kinds_of_common_names() {
        for (name, kind) in [
            ("model.layers.0.self_attn.q_proj.weight", "attention"),
            ("model.layers.3.mlp.down_proj.weight", "mlp"),
            ("model.embed_tokens.weight", "embeddings"),
            ("lm_head.weight", "embeddings"),
            ("model.layers.0.input_layernorm.weight", "norms"),
            ("model.norm.weight", "norms"),
            ("transformer.h.0.ln_1.weight", "norms"),
            ("transformer.h.0.attn.c_attn.weight", "attention"),
            ("transformer.h.0.mlp.c_fc.weight", "mlp"),
            (
                "gpt_neox.layers.0.attention.query_key_value.weight",
                "attention",
            ),
            ("something.else", "other"),
        ] {
            assert_eq!(of(name), kind, "{name}");
        }
    }
}
