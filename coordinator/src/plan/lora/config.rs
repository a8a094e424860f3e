//! `adapter_config.json`: what of it the merge reads, and what it refuses.

use regex::Regex;
use serde_json::Value;

use crate::error::{Error, Result};

/// Options of a PEFT config that change what merging does and that this planner does not do:
/// refused when set (true, or any value but null/false/empty).
const REFUSED: &[(&str, &str)] = &[
    (
        "use_dora",
        "DoRA rescales each column of the merged weight by a learned magnitude",
    ),
    ("lora_bias", "lora_B's bias (lora_bias) is not merged here"),
    (
        "alora_invocation_tokens",
        "activated LoRA applies only after its invocation tokens",
    ),
    ("arrow_config", "Arrow routes among several adapters"),
    ("use_bdlora", "BD-LoRA's block-diagonal factors"),
    ("kasa_config", "KaSA's SVD-based variant"),
    ("velora_config", "VeLoRA's variant"),
    ("monteclora_config", "MonteCLoRA's variant"),
    ("mica", "MiCA's variant"),
    (
        "layer_replication",
        "layer replication changes the model's layers",
    ),
    (
        "target_parameters",
        "LoRA on nn.Parameter targets (MoE experts)",
    ),
    ("trainable_token_indices", "trainable tokens"),
    ("use_qalora", "QA-LoRA pools the input"),
    ("ensure_weight_tying", "tied adapters for tied embeddings"),
];

/// A rank_pattern / alpha_pattern entry: PEFT's regex `(.*\.)?(KEY)$` on the module name.
struct Pattern<T> {
    re: Regex,
    value: T,
}

/// What merging a LoRA adapter needs from its config.
pub(super) struct LoraConfig {
    r: u64,
    alpha: f64,
    pub use_rslora: bool,
    rank_pattern: Vec<Pattern<u64>>,
    alpha_pattern: Vec<Pattern<f64>>,
}

impl LoraConfig {
    /// Parses adapter `reference`'s config, refusing what it can't merge as PEFT does.
    pub fn parse(v: &Value, reference: &str) -> Result<LoraConfig> {
        let bad = |key: &str, why: String| {
            Error::input(
                format!("{reference}/{}", super::CONFIG_FILE),
                format!("adapter {reference}: `{key}`: {why}"),
            )
        };
        let obj = v
            .as_object()
            .ok_or_else(|| bad("", "not a JSON object".into()))?;
        match obj.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(bad(
                    "peft_type",
                    format!("{other:?}: only LoRA adapters (peft_type LORA) are supported"),
                ))
            }
        }
        refuse_unsupported(obj, &bad)?;
        let number = |key: &str| -> Result<Option<f64>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .map(Some)
                    .ok_or_else(|| bad(key, format!("{x} is not a positive number"))),
            }
        };
        let rank = |key: &str, f: f64| -> Result<u64> {
            if f.fract() != 0.0 || f > u32::MAX as f64 {
                return Err(bad(key, format!("{f} is not a whole rank")));
            }
            Ok(f as u64)
        };
        let r = rank("r", number("r")?.unwrap_or(8.0))?;
        let alpha = number("lora_alpha")?.unwrap_or(8.0);
        let use_rslora = matches!(obj.get("use_rslora"), Some(Value::Bool(true)));
        let mut rank_pattern = Vec::new();
        for (k, x) in patterns(obj, "rank_pattern").map_err(|w| bad("rank_pattern", w))? {
            let key = format!("rank_pattern.{k}");
            let f = x
                .as_f64()
                .filter(|f| *f > 0.0)
                .ok_or_else(|| bad(&key, format!("{x} is not a rank")))?;
            rank_pattern.push(Pattern {
                re: regex(k).map_err(|w| bad(&key, w))?,
                value: rank(&key, f)?,
            });
        }
        let mut alpha_pattern = Vec::new();
        for (k, x) in patterns(obj, "alpha_pattern").map_err(|w| bad("alpha_pattern", w))? {
            let key = format!("alpha_pattern.{k}");
            let f = x
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| bad(&key, format!("{x} is not a number")))?;
            alpha_pattern.push(Pattern {
                re: regex(k).map_err(|w| bad(&key, w))?,
                value: f,
            });
        }
        Ok(LoraConfig {
            r,
            alpha,
            use_rslora,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// Module `module`'s rank and alpha: the first matching pattern's, else the defaults.
    pub fn rank_alpha(&self, module: &str) -> (u64, f64) {
        let r = first(&self.rank_pattern, module).unwrap_or(self.r);
        let a = first(&self.alpha_pattern, module).unwrap_or(self.alpha);
        (r, a)
    }
}

/// Refuses the options of [`REFUSED`] that are set.
fn refuse_unsupported(
    obj: &serde_json::Map<String, Value>,
    bad: &dyn Fn(&str, String) -> Error,
) -> Result<()> {
    for (key, why) in REFUSED {
        let set = match obj.get(*key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(bad(key, format!("not supported ({why})")));
        }
    }
    Ok(())
}

fn first<T: Copy>(ps: &[Pattern<T>], module: &str) -> Option<T> {
    ps.iter().find(|p| p.re.is_match(module)).map(|p| p.value)
}

/// The entries of a pattern map, in file order (PEFT takes the first that matches).
fn patterns<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
) -> std::result::Result<Vec<(&'a String, &'a Value)>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => Ok(m.iter().collect()),
        Some(x) => Err(format!("{x} is not a map of module patterns")),
    }
}

fn regex(key: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .map_err(|e| format!("not a regular expression this planner reads: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<LoraConfig> {
        let v: Value = serde_json::from_str(&format!(
            r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8 {extra}}}"#
        ))
        .unwrap();
        LoraConfig::parse(&v, "ad")
    }

    #[test]
    fn patterns_match_as_peft_does_first_key_in_file_order() {
        let c = cfg(r#", "rank_pattern": {"layers.1.mlp.down_proj": 6, "q_proj": 2, "layers\\.[23]\\.self_attn\\.k_proj": 3},
               "alpha_pattern": {"o_proj": 3, "model.layers.0.mlp.gate_proj": 32, "gate_proj": 1}"#)
        .unwrap();
        assert_eq!(c.rank_alpha("model.layers.1.mlp.down_proj"), (6, 8.0));
        assert_eq!(c.rank_alpha("model.layers.11.mlp.down_proj"), (4, 8.0));
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.q_proj"), (2, 8.0));
        assert_eq!(c.rank_alpha("model.layers.2.self_attn.k_proj"), (3, 8.0));
        assert_eq!(c.rank_alpha("model.layers.1.self_attn.k_proj"), (4, 8.0));
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.o_proj"), (4, 3.0));
        // `(.*\.)?KEY$`: a key matches whole dotted parts at the end, not a suffix of a part
        assert_eq!(c.rank_alpha("model.layers.0.mlp.xgate_proj"), (4, 8.0));
        // the first key in file order wins
        assert_eq!(c.rank_alpha("model.layers.0.mlp.gate_proj"), (4, 32.0));
        assert_eq!(c.rank_alpha("model.layers.1.mlp.gate_proj"), (4, 1.0));
    }

    #[test]
    fn dora_and_other_types_are_refused_naming_the_adapter_and_key() {
        let e = cfg(r#", "use_dora": true"#).err().unwrap().to_string();
        assert!(
            e.contains("adapter ad") && e.contains("use_dora") && e.contains("DoRA"),
            "{e}"
        );
        let v: Value = serde_json::from_str(r#"{"peft_type": "IA3"}"#).unwrap();
        let e = LoraConfig::parse(&v, "ad").err().unwrap().to_string();
        assert!(e.contains("peft_type") && e.contains("IA3"), "{e}");
        let e = cfg(r#", "layer_replication": [[0, 2]]"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("layer_replication"), "{e}");
        let e = cfg(r#", "rank_pattern": {"q_proj": 2.5}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank_pattern.q_proj"), "{e}");
        // defaults and empty settings pass
        assert!(cfg(r#", "loftq_config": {}, "use_dora": false, "lora_bias": false"#).is_ok());
    }
}
