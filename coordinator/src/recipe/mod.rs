//! mergekit YAML recipes: parsing with errors that name the key and where it is, and parameter
//! resolution (four precedence levels, gradients across layers, filters).

use std::collections::BTreeMap;

use serde_yaml::Value;
use shardmerge_worker::format::dtype::DType;

use crate::error::{Error, Result};

mod depth;
mod parse;
pub mod stages;
pub mod sweep;

pub use depth::MAX_RECIPE_DEPTH;
pub use parse::max_recipe_bytes;

/// A parameter value as written: a scalar, a gradient across layers, or filtered values.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Scalar(f64),
    Gradient(Vec<f64>),
    /// `- filter: mlp` / `value: ...`; the first matching entry wins (no filter matches all).
    Filtered(Vec<(Option<String>, Setting)>),
}

impl Setting {
    /// mergekit's evaluation: `t` in [0, 1] is the layer's position in its slice.
    pub fn eval(&self, tensor_name: &str, t: f64) -> Option<f64> {
        match self {
            Setting::Scalar(v) => Some(*v),
            Setting::Gradient(g) => {
                let scaled = t * (g.len() - 1) as f64;
                let i0 = (scaled.floor() as usize).min(g.len() - 1);
                let i1 = (i0 + 1).min(g.len() - 1);
                let frac = scaled - i0 as f64;
                Some((1.0 - frac) * g[i0] + frac * g[i1])
            }
            Setting::Filtered(conds) => {
                for (filter, v) in conds {
                    let hit = match filter.as_deref() {
                        None | Some("*") => true,
                        Some(f) => tensor_name.contains(f),
                    };
                    if hit {
                        return v.eval(tensor_name, t);
                    }
                }
                None
            }
        }
    }
}

pub type Params = BTreeMap<String, Setting>;

#[derive(Clone, Debug)]
pub struct Source {
    pub model: String,
    pub layer_range: Option<(u64, u64)>,
    pub params: Params,
}

#[derive(Clone, Debug)]
pub struct Slice {
    pub sources: Vec<Source>,
    pub base_model: Option<String>,
    pub params: Params,
}

/// Where the output vocabulary comes from (`tokenizer_source:` or `tokenizer.source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model's tokenizer, without tokens past its embedding rows.
    Base,
    /// Every model's tokens: the base's, then the others' new ones appended.
    Union,
    /// That model's tokenizer.
    Model(String),
}

/// Where one token's embedding comes from (`tokenizer.tokens.TOKEN.source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `{kind: zero}`: a row of zeros.
    Zero,
    /// A model's row for this same token.
    Model(String),
    /// `{kind: model_token, model, token_id | token}`: a model's row for another token.
    ModelToken {
        model: String,
        token_id: Option<u64>,
        token: Option<String>,
    },
}

/// One entry of `tokenizer.tokens`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenConfig {
    pub source: Option<TokenSource>,
    /// Every model takes the source's row, even one that has the token.
    pub force: bool,
}

/// The `tokenizer:` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizerConfig {
    pub source: TokenizerSource,
    /// Tokens in the order written (added to the output vocabulary when new).
    pub tokens: Vec<(String, TokenConfig)>,
    pub pad_to_multiple_of: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Recipe {
    pub merge_method: String,
    pub base_model: Option<String>,
    pub models: Option<Vec<Source>>,
    pub slices: Option<Vec<Slice>>,
    pub params: Params,
    pub dtype: Option<DType>,
    pub out_dtype: Option<DType>,
    pub tokenizer_source: Option<TokenizerSource>,
    /// The `tokenizer:` section (never together with `tokenizer_source`).
    pub tokenizer: Option<TokenizerConfig>,
    pub random_seed: Option<u64>,
    /// The recipe as written, for the model card.
    pub text: String,
}

impl Recipe {
    /// Every model the recipe names, each once, in order of first mention.
    pub fn referenced_models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |m: &str| {
            if !out.iter().any(|x| x == m) {
                out.push(m.to_string());
            }
        };
        if let Some(ms) = &self.models {
            ms.iter().for_each(|s| add(&s.model));
        }
        if let Some(ss) = &self.slices {
            for s in ss {
                s.sources.iter().for_each(|x| add(&x.model));
                if let Some(b) = &s.base_model {
                    add(b);
                }
            }
        }
        if let Some(b) = &self.base_model {
            add(b);
        }
        if let Some(TokenizerSource::Model(m)) = self.vocab_source() {
            add(m);
        }
        out
    }

    /// The output vocabulary's source, from `tokenizer_source` or `tokenizer.source`.
    pub fn vocab_source(&self) -> Option<&TokenizerSource> {
        self.tokenizer
            .as_ref()
            .map(|t| &t.source)
            .or(self.tokenizer_source.as_ref())
    }

    /// Every place a parameter is set: (where, name, setting), for the planner to check
    /// against the method's declared parameters.
    pub fn parameter_sites<'a>(&'a self) -> Vec<(String, &'a str, &'a Setting)> {
        let mut out = Vec::new();
        let mut add = |site: String, p: &'a Params| {
            for (k, v) in p {
                out.push((site.clone(), k.as_str(), v));
            }
        };
        add("parameters".into(), &self.params);
        if let Some(ms) = &self.models {
            for (i, s) in ms.iter().enumerate() {
                add(format!("models[{i}].parameters"), &s.params);
            }
        }
        if let Some(ss) = &self.slices {
            for (i, s) in ss.iter().enumerate() {
                add(format!("slices[{i}].parameters"), &s.params);
                for (j, x) in s.sources.iter().enumerate() {
                    add(format!("slices[{i}].sources[{j}].parameters"), &x.params);
                }
            }
        }
        out
    }
}

/// Resolves a parameter with mergekit's precedence: the slice source's (for `model`), the
/// output slice's, then the global `parameters`.
pub fn resolve(
    recipe: &Recipe,
    slice: &Slice,
    name: &str,
    model: Option<&str>,
    tensor_name: &str,
    t: f64,
) -> Option<f64> {
    if let Some(m) = model {
        for s in &slice.sources {
            if s.model == m {
                if let Some(v) = s.params.get(name).and_then(|x| x.eval(tensor_name, t)) {
                    return Some(v);
                }
            }
        }
    }
    if let Some(v) = slice.params.get(name).and_then(|x| x.eval(tensor_name, t)) {
        return Some(v);
    }
    recipe.params.get(name).and_then(|x| x.eval(tensor_name, t))
}

#[cfg(test)]
mod tests {
    use super::parse::alias_line;
    use super::*;

    #[test]
    fn gradients_interpolate_like_mergekit() {
        let g = Setting::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]);
        assert_eq!(g.eval("x", 0.0), Some(0.0));
        assert_eq!(g.eval("x", 1.0), Some(1.0));
        let v = g.eval("x", 1.0 / 3.0).unwrap();
        assert!((v - (0.5 + (0.3 - 0.5) * (4.0 / 3.0 - 1.0))).abs() < 1e-12);
        let f = Setting::Filtered(vec![
            (Some("mlp".into()), Setting::Scalar(0.9)),
            (None, Setting::Scalar(0.4)),
        ]);
        assert_eq!(f.eval("model.layers.0.mlp.up_proj.weight", 0.0), Some(0.9));
        assert_eq!(f.eval("model.norm.weight", 0.0), Some(0.4));
    }

    #[test]
    fn errors_name_the_key() {
        let e = Recipe::parse("merge_method: ties\nmodels:\n- model: a\n  paramters: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("models[0]") && e.contains("paramters"), "{e}");
        let e = Recipe::parse("merge_method: [").unwrap_err().to_string();
        assert!(e.contains("YAML"), "{e}");
        let e = Recipe::parse("merge_method: linear\nmodels: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let e = Recipe::parse("merge_method: linear\ndtype: int8\nmodels:\n- model: a\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype") && e.contains("int8"), "{e}");
        let e = Recipe::parse("merge_method: linear\nchat_template: x\nmodels:\n- model: a\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported yet"), "{e}");
    }

    #[test]
    fn bad_numbers_are_refused_with_key_and_model() {
        let cases = [
            // (recipe, what the error must contain)
            (
                "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: .nan\n",
                &["models[0].parameters.weight", "model a", ".nan"][..],
            ),
            (
                "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: .inf\n",
                &["models[0].parameters.weight", "model a", ".inf"],
            ),
            (
                "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: -.inf\n",
                &["weight", "-.inf"],
            ),
            (
                "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: 1e39\n",
                &["models[0].parameters.weight", "model a", "1e39", "32-bit float"],
            ),
            (
                "merge_method: linear\nparameters:\n  weight: [0.1, .nan, 0.3]\nmodels:\n- model: a\n",
                &["parameters.weight[1]", ".nan"],
            ),
            (
                "merge_method: linear\nparameters:\n  weight:\n  - filter: mlp\n    value: -1e40\n  - value: 1\nmodels:\n- model: a\n",
                &["parameters.weight[0].value", "-1e40"],
            ),
            (
                "merge_method: slerp\nbase_model: a\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 2]\n  - model: b\n    layer_range: [0, 2]\n    parameters:\n      t: [0, .inf]\n",
                &["slices[0].sources[1].parameters.t[1]", "model b", ".inf"],
            ),
            (
                "merge_method: slerp\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 2]\n  parameters:\n    t: .NaN\n",
                &["slices[0].parameters.t", ".nan"],
            ),
        ];
        for (text, want) in cases {
            let e = Recipe::parse(text).unwrap_err().to_string();
            for w in want {
                assert!(e.contains(w), "{w:?} missing from: {e}");
            }
        }
        // the largest f32 and booleans are fine
        Recipe::parse("merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: 3.4e38\n    normalize: true\n").unwrap();
    }

    #[test]
    fn aliases_are_refused_anchors_and_stars_in_text_are_not() {
        let bomb = "merge_method: linear\na: &a [x, x]\nb: &b [*a, *a]\nmodels:\n- model: m\n";
        let e = Recipe::parse(bomb).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("aliases"), "{e}");
        assert_eq!(alias_line("x: *a"), Some(1));
        assert_eq!(alias_line("- *a"), Some(1));
        for ok in [
            "x: a*b",
            "x: '*a'",
            "x: \"*a\"",
            "x: 1 # *a",
            "filter: \"*\"",
            "x: 2 * 3",
        ] {
            assert_eq!(alias_line(ok), None, "{ok}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        // 800 KB of `[` (under the size cap) took 394 s to refuse in the YAML scanner
        let text = format!(
            "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: {}\n",
            "[".repeat(400_000)
        );
        let t = std::time::Instant::now();
        let e = Recipe::parse(&text).unwrap_err().to_string();
        assert!(
            t.elapsed() < std::time::Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!(e.contains("line 5") && e.contains("deeper than 64"), "{e}");
        let compact = format!(
            "merge_method: linear\nmodels:\n{}model: a\n",
            "- ".repeat(100)
        );
        let e = Recipe::parse(&compact).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("deeper than 64"), "{e}");
        // a deep value within the cap is parsed (and refused for what it is, not its depth)
        let ok = format!(
            "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: {}1{}\n",
            "[".repeat(50),
            "]".repeat(50)
        );
        let e = Recipe::parse(&ok).unwrap_err().to_string();
        assert!(!e.contains("deeper"), "{e}");
    }

    #[test]
    fn oversized_recipe_is_refused() {
        let text = format!(
            "# {}\nmerge_method: linear\nmodels:\n- model: a\n",
            "x".repeat(max_recipe_bytes())
        );
        let e = Recipe::parse(&text).unwrap_err().to_string();
        assert!(e.contains("SHARDMERGE_MAX_RECIPE_BYTES"), "{e}");
    }
}
