//! The output vocabulary of a recipe with `tokenizer_source` or a `tokenizer:` section, as
//! mergekit builds it: which token each output row holds, where every model's embedding rows
//! go (a row map per embedding tensor, sent to the workers, who do the gathering and the
//! averaging), the output's `vocab_size` and its tokenizer files.
//!
//! Only the planning is here: reading each model's `tokenizer.json` and config, choosing rows.
//! No arithmetic; the worker computes default rows (a donor's row, a mean) from the row map.

use std::collections::HashMap;

use serde_json::Value;

mod rows;
mod tok;

pub use rows::for_rows;
use tok::{add_token, union, Tok};

use super::load::read_json;
use super::ModelInfo;
use crate::error::{Error, Result};
use crate::recipe::{Recipe, TokenConfig, TokenizerSource};

/// The output vocabulary and each model's place in it.
#[derive(Debug)]
pub struct Vocab {
    /// The token of each real output row (its id is its position).
    pub tokens: Vec<String>,
    /// Output rows: the tokens, then padding up to `pad_to_multiple_of`.
    pub rows: u64,
    /// Per model: output id → its row for that token (None: it lacks the token).
    perms: HashMap<String, Vec<Option<u64>>>,
    /// Per model: its own token → id (for `model_token` sources given by token).
    vocabs: HashMap<String, HashMap<String, u64>>,
    /// The recipe's `tokenizer.tokens`.
    token_cfg: HashMap<String, TokenConfig>,
    /// The output's `tokenizer.json` and `tokenizer_config.json`.
    pub files: Vec<(String, Vec<u8>)>,
}

/// The model's vocabulary size: its config's `vocab_size`, else its tokenizer's length.
fn vocab_size(m: &ModelInfo, tok: &Tok) -> u64 {
    m.config
        .as_ref()
        .and_then(|c| {
            c.get("vocab_size")
                .or_else(|| c.pointer("/text_config/vocab_size"))
        })
        .and_then(Value::as_u64)
        .unwrap_or(tok.vocab.len() as u64)
}

async fn read_tok(m: &ModelInfo) -> Result<Option<(Tok, Option<Value>)>> {
    let loc = m.loc.join("tokenizer.json");
    let Some(j) = read_json(&loc).await? else {
        return Ok(None);
    };
    let cfg = read_json(&m.loc.join("tokenizer_config.json")).await?;
    Ok(Some((Tok::parse(j, &loc.uri())?, cfg)))
}

/// The tokenizers of a recipe's models: the base's (cut to its rows) first, then each other
/// model's that has one (a model without one is taken to share the base's, as mergekit does).
/// Also the base's tokenizer as it is.
type Toks<'a> = Vec<(&'a str, Tok, Option<Value>)>;

async fn read_tokenizers<'a>(
    names: &'a [String],
    models: &HashMap<String, ModelInfo>,
    donor: &'a str,
) -> Result<(Tok, Toks<'a>)> {
    let base = &models[donor];
    let Some((base_full, base_cfg)) = read_tok(base).await? else {
        return Err(Error::input(base.loc.uri(), "no tokenizer.json, but the recipe's tokenizer settings need the base model's tokenizer (or remove tokenizer_source / tokenizer:)"));
    };
    let base_tok = base_full.stripped(vocab_size(base, &base_full), &base.loc.uri())?;
    let mut toks: Toks = vec![(donor, base_tok, base_cfg)];
    for n in names {
        if n == donor {
            continue;
        }
        match read_tok(&models[n]).await? {
            Some((t, c)) => toks.push((n.as_str(), t, c)),
            None => tracing::warn!(
                "model {n} has no tokenizer.json: taking it to use the base model's ({donor})"
            ),
        }
    }
    Ok((base_full, toks))
}

/// The output tokenizer and its `tokenizer_config.json`, from the recipe's source.
fn output_tokenizer(
    source: &TokenizerSource,
    base_full: &Tok,
    toks: &Toks,
    models: &HashMap<String, ModelInfo>,
) -> Result<(Tok, Option<Value>)> {
    let donor = toks[0].0;
    Ok(match source {
        TokenizerSource::Base => (toks[0].1.clone(), toks[0].2.clone()),
        TokenizerSource::Model(m) => match toks.iter().find(|(n, _, _)| *n == m.as_str()) {
            // the named model's tokenizer as it is (not cut to its rows), as mergekit loads it
            Some(_) if m == donor => (base_full.clone(), toks[0].2.clone()),
            Some((_, t, c)) => (t.clone(), c.clone()),
            None => {
                return Err(Error::input(
                    "tokenizer_source",
                    format!("model {m} has no tokenizer.json"),
                ))
            }
        },
        TokenizerSource::Union => (union(toks, models)?, toks[0].2.clone()),
    })
}

/// The token of each output id; the ids must be 0..n, since rows are indexed by them.
fn tokens_by_id(out: &Tok) -> Result<Vec<String>> {
    let n = out.vocab.len();
    let mut tokens = vec![String::new(); n];
    for (t, &id) in &out.vocab {
        match tokens.get_mut(id as usize) {
            Some(slot) if slot.is_empty() => *slot = t.clone(),
            _ => {
                return Err(Error::input("", format!(
                    "the output tokenizer's ids are not 0..{n} (token {t:?} has id {id}): its rows can't be laid out"
                )))
            }
        }
    }
    Ok(tokens)
}

/// The output's `tokenizer.json` and `tokenizer_config.json` (its `added_tokens_decoder`, when
/// it has one, extended by the added tokens).
fn output_files(out: &Tok, mut cfg: Option<Value>) -> Result<Vec<(String, Vec<u8>)>> {
    if let Some(Value::Object(c)) = cfg.as_mut() {
        if let Some(Value::Object(d)) = c.get_mut("added_tokens_decoder") {
            for (id, e) in &out.added {
                let mut e = e.clone();
                if let Value::Object(o) = &mut e {
                    o.remove("id");
                }
                d.insert(id.to_string(), e);
            }
        }
    }
    let mut files = vec![(
        "tokenizer.json".to_string(),
        pretty(&out.json, "tokenizer.json")?,
    )];
    if let Some(c) = &cfg {
        files.push((
            "tokenizer_config.json".into(),
            pretty(c, "tokenizer_config.json")?,
        ));
    }
    Ok(files)
}

/// Builds the output vocabulary when the recipe asks for one (`None` otherwise). `donor` is
/// the base model, else the first.
pub async fn build(
    recipe: &Recipe,
    models: &HashMap<String, ModelInfo>,
    donor: &str,
) -> Result<Option<Vocab>> {
    let Some(source) = recipe.vocab_source() else {
        return Ok(None);
    };
    let tcfg = recipe.tokenizer.as_ref();
    let names = recipe.referenced_models();
    let (base_full, toks) = read_tokenizers(&names, models, donor).await?;
    let (mut out, out_cfg) = output_tokenizer(source, &base_full, &toks, models)?;
    for (name, _) in tcfg.map(|t| t.tokens.as_slice()).unwrap_or_default() {
        add_token(&mut out, name, None);
    }
    let tokens = tokens_by_id(&out)?;
    let n = tokens.len() as u64;
    let rows = match tcfg.and_then(|t| t.pad_to_multiple_of) {
        Some(p) => n.div_ceil(p) * p,
        None => n,
    };
    let mut perms = HashMap::new();
    let mut vocabs = HashMap::new();
    for name in &names {
        let tok = toks
            .iter()
            .find(|(n, _, _)| *n == name.as_str())
            .map(|(_, t, _)| t)
            .unwrap_or(&toks[0].1);
        let vs = vocab_size(&models[name], tok);
        let p: Vec<Option<u64>> = tokens
            .iter()
            .map(|t| tok.vocab.get(t).copied().filter(|&i| i < vs))
            .collect();
        perms.insert(name.clone(), p);
        vocabs.insert(name.clone(), tok.vocab.clone());
    }
    Ok(Some(Vocab {
        tokens,
        rows,
        perms,
        vocabs,
        token_cfg: tcfg
            .map(|t| t.tokens.iter().cloned().collect())
            .unwrap_or_default(),
        files: output_files(&out, out_cfg)?,
    }))
}

fn pretty(v: &Value, what: &str) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::input("", format!("writing {what}: {e}")))
}

/// Whether tokenizer file `name` of the tokenizer source is not copied: a made file replaces
/// it, or it describes the source's vocabulary (`vocab.json`, `tokenizer.model`, ...), which
/// the output's differs from.
pub fn made_for_output(plan: &super::Plan, name: &str) -> bool {
    !plan.tokenizer_files.is_empty()
        && (plan.tokenizer_files.iter().any(|(n, _)| n == name)
            || [
                "tokenizer.model",
                "vocab.json",
                "merges.txt",
                "added_tokens.json",
            ]
            .contains(&name))
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use shardmerge_proto as pb;

    use super::rows::push_run;
    use super::*;

    #[test]
    fn a_tokenizer_is_cut_to_the_rows_its_model_has() {
        let j = json!({
            "added_tokens": [
                {"id": 0, "content": "<s>", "special": true},
                {"id": 4, "content": "<extra>", "special": true}
            ],
            "model": {
                "type": "BPE",
                "vocab": {"<s>": 0, "a": 1, "b": 2, "ab": 3},
                "merges": [["a", "b"], "b a"]
            }
        });
        let t = Tok::parse(j, "x").unwrap();
        assert_eq!(t.vocab.len(), 5);
        let s = t.stripped(3, "x").unwrap();
        let mut toks: Vec<&String> = s.vocab.keys().collect();
        toks.sort();
        assert_eq!(toks, ["<s>", "a", "b"]);
        assert_eq!(s.json["model"]["merges"], json!(["b a"]));
        assert_eq!(s.added.len(), 1);
        // a new token goes after the last id, as an added token
        let mut s = s;
        add_token(&mut s, "ba", None);
        assert_eq!(s.vocab["ba"], 3);
        assert_eq!(s.json["added_tokens"][1]["content"], "ba");
        assert_eq!(s.json["added_tokens"][1]["normalized"], true);
        // a Unigram vocabulary is a list; its ids are positions
        let u = Tok::parse(json!({"model": {"vocab": [["x", 0.0], ["y", -1.0]]}}), "u").unwrap();
        assert_eq!(u.vocab["y"], 1);
        assert!(Tok::parse(json!({"model": {}}), "bad.json")
            .unwrap_err()
            .to_string()
            .contains("bad.json"));
    }

    #[test]
    fn runs_coalesce_and_cut() {
        let mut runs = Vec::new();
        for (o, s) in [(0, 0), (1, 1), (2, 2), (3, 7), (4, 8), (6, 9)] {
            push_run(&mut runs, o, s);
        }
        let spans: Vec<(u64, u64, u64)> = runs
            .iter()
            .map(|r| (r.out_start, r.count, r.src_start))
            .collect();
        assert_eq!(spans, [(0, 3, 0), (3, 2, 7), (6, 1, 9)]);
        let map = pb::RowMap {
            inputs: vec![pb::InputRows { runs }],
            defaults: vec![
                pb::DefaultRow {
                    out_row: 5,
                    from: vec![],
                },
                pb::DefaultRow {
                    out_row: 1,
                    from: vec![],
                },
            ],
            pad_from: 0,
        };
        let cut = for_rows(&map, 1, 4);
        let spans: Vec<(u64, u64, u64)> = cut.inputs[0]
            .runs
            .iter()
            .map(|r| (r.out_start, r.count, r.src_start))
            .collect();
        assert_eq!(spans, [(1, 2, 1), (3, 1, 7)]);
        assert_eq!(cut.defaults.len(), 1);
        assert_eq!(cut.defaults[0].out_row, 1);
    }
}
