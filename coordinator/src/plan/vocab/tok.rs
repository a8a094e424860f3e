//! One model's tokenizer as the vocabulary planner needs it: parsed from `tokenizer.json`, cut
//! to the model's rows, extended by added tokens, and mergekit's union of several.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::vocab_size;
use crate::error::{Error, Result};
use crate::plan::ModelInfo;

/// One model's tokenizer, from its `tokenizer.json`.
#[derive(Clone, Debug)]
pub(super) struct Tok {
    pub(super) json: Value,
    /// Every token (model vocabulary and added tokens) → id.
    pub(super) vocab: HashMap<String, u64>,
    /// The added tokens in id order: (id, entry as written).
    pub(super) added: Vec<(u64, Value)>,
    /// The id a new token gets: one past the largest.
    pub(super) next_id: u64,
}

impl Tok {
    pub(super) fn parse(json: Value, uri: &str) -> Result<Tok> {
        let bad = |why: &str| {
            Error::input(
                uri,
                format!("{why} (a Hugging Face `tokenizers` file is expected)"),
            )
        };
        let mut vocab = HashMap::new();
        match json.pointer("/model/vocab") {
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let id = v
                        .as_u64()
                        .ok_or_else(|| bad("model.vocab has a non-integer id"))?;
                    vocab.insert(k.clone(), id);
                }
            }
            // Unigram: [[token, score], ...], the id is the position
            Some(Value::Array(a)) => {
                for (i, e) in a.iter().enumerate() {
                    let t = e
                        .get(0)
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad("model.vocab has an entry without a token"))?;
                    vocab.insert(t.to_string(), i as u64);
                }
            }
            _ => return Err(bad("no model.vocab")),
        }
        let mut added = Vec::new();
        if let Some(a) = json.get("added_tokens").and_then(Value::as_array) {
            for e in a {
                let id = e.get("id").and_then(Value::as_u64);
                let content = e.get("content").and_then(Value::as_str);
                let (Some(id), Some(content)) = (id, content) else {
                    return Err(bad("an added token has no id or content"));
                };
                vocab.insert(content.to_string(), id);
                added.push((id, e.clone()));
            }
        }
        added.sort_by_key(|(id, _)| *id);
        let next_id = vocab.values().max().map_or(0, |m| m + 1);
        Ok(Tok {
            json,
            vocab,
            added,
            next_id,
        })
    }

    /// The tokenizer without the tokens whose ids are `vocab_size` or more (rows the model's
    /// embedding doesn't have), as mergekit strips the base's.
    pub(super) fn stripped(&self, vocab_size: u64, uri: &str) -> Result<Tok> {
        let gone: HashSet<&str> = self
            .vocab
            .iter()
            .filter(|(_, id)| **id >= vocab_size)
            .map(|(t, _)| t.as_str())
            .collect();
        if gone.is_empty() {
            return Ok(self.clone());
        }
        let mut j = self.json.clone();
        if j.pointer("/model/type").and_then(Value::as_str) != Some("BPE") {
            return Err(Error::input(uri, format!("the tokenizer has tokens past the model's {vocab_size} embedding rows, and only a BPE tokenizer can be cut down to them")));
        }
        if let Some(Value::Object(v)) = j.pointer_mut("/model/vocab") {
            v.retain(|k, _| !gone.contains(k.as_str()));
        }
        if let Some(Value::Array(a)) = j.get_mut("added_tokens") {
            a.retain(|e| {
                e.get("id")
                    .and_then(Value::as_u64)
                    .is_some_and(|i| i < vocab_size)
            });
        }
        if let Some(Value::Array(m)) = j.pointer_mut("/model/merges") {
            m.retain(|e| {
                let parts: Vec<&str> = match e {
                    Value::String(s) => s.split(' ').collect(),
                    Value::Array(p) => p.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                };
                // mergekit drops merges of removed tokens; one making a removed token goes too
                // (tokenizers refuses a merge whose result is not in the vocabulary)
                !parts.iter().any(|p| gone.contains(p)) && !gone.contains(parts.concat().as_str())
            });
        }
        Tok::parse(j, uri)
    }
}

pub(super) fn content(e: &Value) -> &str {
    e.get("content").and_then(Value::as_str).unwrap_or_default()
}

/// Adds `token` at the next id unless the tokenizer has it: `entry` as given (an added token
/// of another model), else a plain (normalized, not special) added token, as transformers'
/// `add_tokens` does.
pub(super) fn add_token(t: &mut Tok, token: &str, entry: Option<&Value>) {
    if t.vocab.contains_key(token) {
        return;
    }
    let id = t.next_id;
    t.next_id += 1;
    let mut e = entry.cloned().unwrap_or_else(|| {
        json!({"content": token, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": true, "special": false})
    });
    if let Value::Object(o) = &mut e {
        o.insert("id".into(), json!(id));
    }
    // the order transformers writes an added token's keys in
    let e = json!({
        "id": id,
        "content": token,
        "single_word": e.get("single_word").cloned().unwrap_or(json!(false)),
        "lstrip": e.get("lstrip").cloned().unwrap_or(json!(false)),
        "rstrip": e.get("rstrip").cloned().unwrap_or(json!(false)),
        "normalized": e.get("normalized").cloned().unwrap_or(json!(true)),
        "special": e.get("special").cloned().unwrap_or(json!(false)),
    });
    if let Value::Object(o) = &mut t.json {
        match o.get_mut("added_tokens") {
            Some(Value::Array(a)) => a.push(e.clone()),
            _ => {
                o.insert("added_tokens".into(), Value::Array(vec![e.clone()]));
            }
        }
    }
    t.vocab.insert(token.to_string(), id);
    t.added.push((id, e));
}

/// mergekit's union: the (stripped) base tokenizer, then every other model's tokens it lacks
/// appended as added tokens, then the added tokens of every model it lacks. Models are taken
/// in recipe order (base first) and each one's tokens by id: mergekit's own order follows
/// Python set and hash-map iteration, which changes from run to run.
pub(super) fn union(
    toks: &[(&str, Tok, Option<Value>)],
    models: &HashMap<String, ModelInfo>,
) -> Result<Tok> {
    let mut out = toks[0].1.clone();
    let any_added: HashSet<&str> = toks
        .iter()
        .flat_map(|(_, t, _)| t.added.iter().map(|(_, e)| content(e)))
        .collect();
    let mut added: Vec<&Value> = Vec::new();
    let mut seen_added: HashSet<&str> = HashSet::new();
    for (name, tok, _) in toks {
        let vs = vocab_size(&models[*name], tok);
        let mut by_id: Vec<(&String, u64)> = tok.vocab.iter().map(|(t, &i)| (t, i)).collect();
        by_id.sort_by_key(|&(_, i)| i);
        for (t, i) in by_id {
            if i >= vs {
                tracing::warn!(
                    "model {name}: token {t:?} has id {i}, past its {vs} embedding rows: left out"
                );
                continue;
            }
            if any_added.contains(t.as_str()) {
                continue;
            }
            add_token(&mut out, t, None);
        }
        for (i, e) in &tok.added {
            if *i < vs && seen_added.insert(content(e)) {
                added.push(e);
            }
        }
    }
    for e in added {
        add_token(&mut out, content(e), Some(e));
    }
    Ok(out)
}
