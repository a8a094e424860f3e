//! What the planner knows about model architectures, kept as data: one definition per family
//! saying which tensors sit before the decoder layers, how a layer's tensors are named, which
//! sit after them, which config keys hold the layer count and per-layer settings, and which
//! output-side tensor may be tied to an input-side one.
//!
//! A model's definition is chosen from its `config.json` (`architectures`, then `model_type`).
//! Models of an architecture not listed here use [`FALLBACK`]: a tensor is in a layer when its
//! name has a `layers.N.` component, and outside the layers a name containing `embed` is an
//! input-side tensor.

use serde_json::Value;

/// One architecture family.
#[derive(Debug)]
pub struct Arch {
    /// A short name for messages and `shardmerge plan`.
    pub name: &'static str,
    /// `config.json` `architectures` entries that select this definition.
    pub architectures: &'static [&'static str],
    /// `config.json` `model_type` values that select it (when `architectures` matched none).
    pub model_types: &'static [&'static str],
    /// Layer tensor names are one of these, then the layer index, then `.` and the rest.
    /// Empty: the fallback rule (a `layers.N.` component anywhere in the name).
    pub layer_prefixes: &'static [&'static str],
    /// Tensors before the layers (taken from the first slice of a frankenmerge).
    pub pre: &'static [&'static str],
    /// Tensors after the layers (taken from the last slice).
    pub post: &'static [&'static str],
    /// Embedding matrices: rows are vocabulary entries.
    pub embeddings: &'static [&'static str],
    /// (output-side tensor, the input-side tensor it may be tied to): a model that lacks the
    /// first shares the second's values.
    pub tied: &'static [(&'static str, &'static str)],
    /// The config key holding the number of layers.
    pub layers_key: &'static str,
    /// Config arrays with one entry per layer (e.g. `layer_types`).
    pub layer_arrays: &'static [&'static str],
    /// Config lists of layer indices (e.g. Qwen-MoE's `mlp_only_layers`).
    pub layer_index_lists: &'static [&'static str],
}

const LM_TIED: &[(&str, &str)] = &[("lm_head.weight", "model.embed_tokens.weight")];
const LM_EMBEDS: &[&str] = &["model.embed_tokens.weight", "lm_head.weight"];
const LM_PRE: &[&str] = &["model.embed_tokens.weight"];
const LM_POST: &[&str] = &["model.norm.weight", "lm_head.weight"];

/// A Llama-style decoder (`model.embed_tokens`, `model.layers.N.`, `model.norm`, `lm_head`).
const fn llama_like(
    name: &'static str,
    architectures: &'static [&'static str],
    model_types: &'static [&'static str],
    layer_arrays: &'static [&'static str],
    layer_index_lists: &'static [&'static str],
) -> Arch {
    Arch {
        name,
        architectures,
        model_types,
        layer_prefixes: &["model.layers."],
        pre: LM_PRE,
        post: LM_POST,
        embeddings: LM_EMBEDS,
        tied: LM_TIED,
        layers_key: "num_hidden_layers",
        layer_arrays,
        layer_index_lists,
    }
}

/// Every architecture with a definition.
pub static ARCHS: &[Arch] = &[
    llama_like(
        "llama",
        &["LlamaForCausalLM", "LLaMaForCausalLM"],
        &["llama"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "mistral",
        &["MistralForCausalLM"],
        &["mistral"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "qwen2",
        &["Qwen2ForCausalLM"],
        &["qwen2"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "qwen3",
        &["Qwen3ForCausalLM"],
        &["qwen3"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "gemma",
        &["GemmaForCausalLM"],
        &["gemma"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "gemma2",
        &["Gemma2ForCausalLM"],
        &["gemma2"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "gemma3_text",
        &["Gemma3ForCausalLM"],
        &["gemma3_text"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "phi3",
        &["Phi3ForCausalLM"],
        &["phi3"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "mixtral",
        &["MixtralForCausalLM"],
        &["mixtral"],
        &["layer_types"],
        &[],
    ),
    llama_like(
        "qwen2_moe",
        &["Qwen2MoeForCausalLM"],
        &["qwen2_moe"],
        &["layer_types"],
        &["mlp_only_layers"],
    ),
    llama_like(
        "qwen3_moe",
        &["Qwen3MoeForCausalLM"],
        &["qwen3_moe"],
        &["layer_types"],
        &["mlp_only_layers"],
    ),
    Arch {
        name: "gpt2",
        architectures: &["GPT2LMHeadModel", "GPT2Model"],
        model_types: &["gpt2"],
        // GPT2Model checkpoints drop the `transformer.` prefix
        layer_prefixes: &["transformer.h.", "h."],
        pre: &[
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "wte.weight",
            "wpe.weight",
        ],
        post: &[
            "transformer.ln_f.weight",
            "transformer.ln_f.bias",
            "ln_f.weight",
            "ln_f.bias",
            "lm_head.weight",
        ],
        embeddings: &["transformer.wte.weight", "wte.weight", "lm_head.weight"],
        tied: &[("lm_head.weight", "transformer.wte.weight")],
        layers_key: "n_layer",
        layer_arrays: &[],
        layer_index_lists: &[],
    },
    Arch {
        name: "gpt_neox",
        architectures: &["GPTNeoXForCausalLM"],
        model_types: &["gpt_neox"],
        layer_prefixes: &["gpt_neox.layers."],
        pre: &["gpt_neox.embed_in.weight"],
        // the output projection is named like an embedding but sits after the layers
        post: &[
            "gpt_neox.final_layer_norm.weight",
            "gpt_neox.final_layer_norm.bias",
            "embed_out.weight",
        ],
        embeddings: &["gpt_neox.embed_in.weight", "embed_out.weight"],
        tied: &[("embed_out.weight", "gpt_neox.embed_in.weight")],
        layers_key: "num_hidden_layers",
        layer_arrays: &[],
        layer_index_lists: &[],
    },
];

/// Models whose config names no listed architecture: the name-pattern rule.
pub static FALLBACK: Arch = Arch {
    name: "unknown (tensor-name rule)",
    architectures: &[],
    model_types: &[],
    layer_prefixes: &[],
    pre: &[],
    post: &[],
    embeddings: &[],
    tied: &[],
    layers_key: "num_hidden_layers",
    layer_arrays: &["layer_types"],
    layer_index_lists: &[],
};

/// The definition for a model with this `config.json` (or none).
pub fn of_config(config: Option<&Value>) -> &'static Arch {
    let Some(c) = config else {
        return &FALLBACK;
    };
    let archs: Vec<&str> = c
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for a in &archs {
        if let Some(d) = ARCHS.iter().find(|d| d.architectures.contains(a)) {
            return d;
        }
    }
    if let Some(mt) = c.get("model_type").and_then(Value::as_str) {
        if let Some(d) = ARCHS.iter().find(|d| d.model_types.contains(&mt)) {
            return d;
        }
    }
    &FALLBACK
}

/// Where a tensor sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place<'a> {
    /// Before the layers.
    Pre,
    /// In layer `index`: the name is `prefix`, the index, `.`, `rest`.
    Layer {
        prefix: &'a str,
        index: u64,
        rest: &'a str,
    },
    /// After the layers.
    Post,
}

impl Arch {
    pub fn is_fallback(&self) -> bool {
        std::ptr::eq(self, &FALLBACK)
    }

    /// Splits a layer tensor's name into (prefix, layer index, rest).
    pub fn split_layer<'a>(&self, name: &'a str) -> Option<(&'a str, u64, &'a str)> {
        if self.layer_prefixes.is_empty() {
            return split_layer_anywhere(name);
        }
        self.layer_prefixes.iter().find_map(|p| {
            let rest = name.strip_prefix(p)?;
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || rest.as_bytes().get(digits) != Some(&b'.') {
                return None;
            }
            let index = rest[..digits].parse().ok()?;
            Some((&name[..p.len()], index, &rest[digits + 1..]))
        })
    }

    /// Where `name` sits. A name the definition doesn't list goes by the fallback rule:
    /// before the layers if it contains `embed`, else after them.
    pub fn place<'a>(&self, name: &'a str) -> Place<'a> {
        if let Some((prefix, index, rest)) = self.split_layer(name) {
            return Place::Layer {
                prefix,
                index,
                rest,
            };
        }
        if self.pre.contains(&name) {
            Place::Pre
        } else if self.post.contains(&name) || !name.contains("embed") {
            Place::Post
        } else {
            Place::Pre
        }
    }

    /// Whether `name` is an embedding matrix (rows indexed by token).
    pub fn is_embedding(&self, name: &str) -> bool {
        if self.is_fallback() {
            return name.contains("embed_tokens")
                || name.starts_with("lm_head")
                || name.contains("wte");
        }
        self.embeddings.contains(&name)
    }

    /// The input-side tensor `name` may be tied to.
    pub fn tied_to(&self, name: &str) -> Option<&'static str> {
        self.tied.iter().find(|(o, _)| *o == name).map(|(_, i)| *i)
    }

    /// The layer count a config states.
    pub fn config_layers(&self, config: Option<&Value>) -> Option<u64> {
        config?.get(self.layers_key).and_then(Value::as_u64)
    }
}

/// The fallback layer rule: a `layers.N.` component anywhere in the name.
pub fn split_layer_anywhere(name: &str) -> Option<(&str, u64, &str)> {
    let mut search = 0;
    while let Some(pos) = name[search..].find("layers.") {
        let at = search + pos;
        if at == 0 || name.as_bytes()[at - 1] == b'.' {
            let rest = &name[at + 7..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && rest.as_bytes().get(digits) == Some(&b'.') {
                if let Ok(n) = rest[..digits].parse() {
                    return Some((&name[..at + 7], n, &rest[digits + 1..]));
                }
            }
        }
        search = at + 7;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chosen_from_architectures_then_model_type() {
        let c = json!({"architectures": ["GPT2LMHeadModel"], "model_type": "llama"});
        assert_eq!(of_config(Some(&c)).name, "gpt2");
        let c = json!({"architectures": ["SomethingNew"], "model_type": "gpt_neox"});
        assert_eq!(of_config(Some(&c)).name, "gpt_neox");
        let c = json!({"architectures": ["SomethingNew"], "model_type": "new"});
        assert!(of_config(Some(&c)).is_fallback());
        assert!(of_config(None).is_fallback());
    }

    #[test]
    fn places() {
        let neox = of_config(Some(&json!({"model_type": "gpt_neox"})));
        assert_eq!(neox.place("embed_out.weight"), Place::Post);
        assert_eq!(neox.place("gpt_neox.embed_in.weight"), Place::Pre);
        assert_eq!(
            neox.place("gpt_neox.layers.3.attention.bias"),
            Place::Layer {
                prefix: "gpt_neox.layers.",
                index: 3,
                rest: "attention.bias"
            }
        );
        let gpt2 = of_config(Some(&json!({"model_type": "gpt2"})));
        assert_eq!(
            gpt2.split_layer("transformer.h.11.ln_1.weight")
                .map(|s| s.1),
            Some(11)
        );
        assert_eq!(gpt2.split_layer("h.2.ln_1.weight").map(|s| s.1), Some(2));
        assert_eq!(gpt2.split_layer("transformer.hx.2.ln_1.weight"), None);
        assert_eq!(gpt2.place("transformer.wpe.weight"), Place::Pre);
        assert_eq!(gpt2.place("transformer.ln_f.bias"), Place::Post);
        assert_eq!(gpt2.config_layers(Some(&json!({"n_layer": 4}))), Some(4));
        // the fallback: by name
        assert_eq!(FALLBACK.place("model.embed_tokens.weight"), Place::Pre);
        assert_eq!(FALLBACK.place("lm_head.weight"), Place::Post);
        assert_eq!(FALLBACK.split_layer("x.layers.2.y").map(|s| s.1), Some(2));
        assert_eq!(FALLBACK.split_layer("model.sublayers.1.x"), None);
    }

    #[test]
    fn every_definition_is_consistent() {
        for a in ARCHS {
            assert!(!a.layer_prefixes.is_empty(), "{}", a.name);
            for e in a.embeddings {
                assert!(a.pre.contains(e) || a.post.contains(e), "{} {e}", a.name);
            }
            for (o, i) in a.tied {
                assert!(a.post.contains(o) && a.pre.contains(i), "{} {o}", a.name);
            }
        }
    }
}
