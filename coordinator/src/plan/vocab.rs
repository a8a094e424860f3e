//! The output vocabulary of a recipe with `tokenizer_source` or a `tokenizer:` section, as
//! mergekit builds it: which token each output row holds, where every model's embedding rows
//! go (a row map per embedding tensor, sent to the workers, who do the gathering and the
//! averaging), the output's `vocab_size` and its tokenizer files.
//!
//! Only the planning is here: reading each model's `tokenizer.json` and config, choosing rows.
//! No arithmetic; the worker computes default rows (a donor's row, a mean) from the row map.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};
use shardmerge_proto as pb;

use super::load::read_json;
use super::ModelInfo;
use crate::error::{Error, Result};
use crate::recipe::{Recipe, TokenConfig, TokenSource, TokenizerSource};

/// One model's tokenizer, from its `tokenizer.json`.
#[derive(Clone, Debug)]
struct Tok {
    json: Value,
    /// Every token (model vocabulary and added tokens) → id.
    vocab: HashMap<String, u64>,
    /// The added tokens in id order: (id, entry as written).
    added: Vec<(u64, Value)>,
    /// The id a new token gets: one past the largest.
    next_id: u64,
}

impl Tok {
    fn parse(json: Value, uri: &str) -> Result<Tok> {
        let bad = |why: &str| {
            Error::Input(format!(
                "{uri}: {why} (a Hugging Face `tokenizers` file is expected)"
            ))
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
    fn stripped(&self, vocab_size: u64, uri: &str) -> Result<Tok> {
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
            return Err(Error::Input(format!(
                "{uri}: the tokenizer has tokens past the model's {vocab_size} embedding rows, and only a BPE tokenizer can be cut down to them"
            )));
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

fn content(e: &Value) -> &str {
    e.get("content").and_then(Value::as_str).unwrap_or_default()
}

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
    // every tokenizer; a model without one is taken to share the base's, as mergekit does
    let base = &models[donor];
    let Some((base_full, base_cfg)) = read_tok(base).await? else {
        return Err(Error::Input(format!(
            "{}: no tokenizer.json, but the recipe's tokenizer settings need the base model's tokenizer (or remove tokenizer_source / tokenizer:)",
            base.loc.uri()
        )));
    };
    let base_vs = vocab_size(base, &base_full);
    let base_tok = base_full.stripped(base_vs, &base.loc.uri())?;
    let mut toks: Vec<(&str, Tok, Option<Value>)> = vec![(donor, base_tok.clone(), base_cfg)];
    for n in &names {
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
    let (mut out, mut out_cfg) = match source {
        TokenizerSource::Base => (base_tok.clone(), toks[0].2.clone()),
        TokenizerSource::Model(m) => match toks.iter().find(|(n, _, _)| *n == m.as_str()) {
            // the named model's tokenizer as it is (not cut to its rows), as mergekit loads it
            Some(_) if m == donor => (base_full.clone(), toks[0].2.clone()),
            Some((_, t, c)) => (t.clone(), c.clone()),
            None => {
                return Err(Error::Input(format!(
                    "tokenizer_source: model {m} has no tokenizer.json"
                )))
            }
        },
        TokenizerSource::Union => (union(&toks, models)?, toks[0].2.clone()),
    };
    if let Some(t) = tcfg {
        for (name, _) in &t.tokens {
            add_token(&mut out, name, None);
        }
    }
    // the output ids must be 0..n: rows are indexed by them
    let n = out.vocab.len() as u64;
    let mut tokens = vec![String::new(); n as usize];
    for (t, &id) in &out.vocab {
        match tokens.get_mut(id as usize) {
            Some(slot) if slot.is_empty() => *slot = t.clone(),
            _ => {
                return Err(Error::Input(format!(
                    "the output tokenizer's ids are not 0..{n} (token {t:?} has id {id}): its rows can't be laid out"
                )))
            }
        }
    }
    let rows = match tcfg.and_then(|t| t.pad_to_multiple_of) {
        Some(p) => n.div_ceil(p) * p,
        None => n,
    };
    let mut perms = HashMap::new();
    let mut vocabs = HashMap::new();
    for name in &names {
        let m = &models[name];
        let tok = toks
            .iter()
            .find(|(n, _, _)| *n == name.as_str())
            .map(|(_, t, _)| t)
            .unwrap_or(&toks[0].1);
        let vs = vocab_size(m, tok);
        let p: Vec<Option<u64>> = tokens
            .iter()
            .map(|t| tok.vocab.get(t).copied().filter(|&i| i < vs))
            .collect();
        perms.insert(name.clone(), p);
        vocabs.insert(name.clone(), tok.vocab.clone());
    }
    if let Some(Value::Object(c)) = out_cfg.as_mut() {
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
    if let Some(c) = &out_cfg {
        files.push((
            "tokenizer_config.json".into(),
            pretty(c, "tokenizer_config.json")?,
        ));
    }
    Ok(Some(Vocab {
        tokens,
        rows,
        perms,
        vocabs,
        token_cfg: tcfg
            .map(|t| t.tokens.iter().cloned().collect())
            .unwrap_or_default(),
        files,
    }))
}

fn pretty(v: &Value, what: &str) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Input(format!("writing {what}: {e}")))
}

/// Adds `token` at the next id unless the tokenizer has it: `entry` as given (an added token
/// of another model), else a plain (normalized, not special) added token, as transformers'
/// `add_tokens` does.
fn add_token(t: &mut Tok, token: &str, entry: Option<&Value>) {
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
fn union(toks: &[(&str, Tok, Option<Value>)], models: &HashMap<String, ModelInfo>) -> Result<Tok> {
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

impl Vocab {
    /// The row map of an embedding tensor whose inputs are `inputs` (model names, in the
    /// job's order), `base` the base model's position among them. `rows` gives each input's
    /// row count, for checking `model_token` ids.
    pub fn row_map(
        &self,
        tensor: &str,
        inputs: &[&str],
        in_rows: &[u64],
        base: Option<usize>,
    ) -> Result<pb::RowMap> {
        let perms: Vec<&Vec<Option<u64>>> = inputs
            .iter()
            .map(|m| {
                self.perms.get(*m).ok_or_else(|| {
                    Error::Input(format!(
                        "tensor {tensor}: model {m} has no vocabulary (plan error)"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let mut runs: Vec<Vec<pb::RowRun>> = vec![Vec::new(); inputs.len()];
        let mut defaults = Vec::new();
        for (j, tok) in self.tokens.iter().enumerate() {
            let j = j as u64;
            let cfg = self.token_cfg.get(tok);
            let force = cfg.is_some_and(|c| c.force);
            let mut lacking = force;
            for (i, p) in perms.iter().enumerate() {
                match p[j as usize] {
                    Some(src) if src >= in_rows[i] => {
                        return Err(Error::Input(format!(
                            "model {}: its tokenizer gives token {tok:?} id {src}, but its {tensor} has {} rows (its config's vocab_size is larger than the tensor: fix the config)",
                            inputs[i], in_rows[i]
                        )))
                    }
                    Some(src) if !force => push_run(&mut runs[i], j, src),
                    _ => lacking = true,
                }
            }
            if !lacking {
                continue;
            }
            let from = match cfg.and_then(|c| c.source.as_ref()) {
                Some(src) => self.token_source(tensor, tok, j, src, inputs, &perms, in_rows)?,
                None => {
                    let have: Vec<usize> = (0..inputs.len())
                        .filter(|&i| perms[i][j as usize].is_some())
                        .collect();
                    let at = |i: usize| pb::RowRef {
                        input: i as u32,
                        row: perms[i][j as usize].unwrap_or_default(),
                    };
                    match (have.len(), base) {
                        (0, _) => Vec::new(),
                        (1, _) => vec![at(have[0])],
                        (_, Some(b)) if perms[b][j as usize].is_some() => vec![at(b)],
                        _ => have.into_iter().map(at).collect(),
                    }
                }
            };
            defaults.push(pb::DefaultRow { out_row: j, from });
        }
        let n = self.tokens.len() as u64;
        Ok(pb::RowMap {
            inputs: runs
                .into_iter()
                .map(|runs| pb::InputRows { runs })
                .collect(),
            defaults,
            pad_from: if self.rows > n { n } else { 0 },
        })
    }

    /// The row a recipe `tokens:` entry takes.
    #[allow(clippy::too_many_arguments)]
    fn token_source(
        &self,
        tensor: &str,
        tok: &str,
        j: u64,
        src: &TokenSource,
        inputs: &[&str],
        perms: &[&Vec<Option<u64>>],
        in_rows: &[u64],
    ) -> Result<Vec<pb::RowRef>> {
        let input_of = |m: &str| {
            inputs.iter().position(|x| *x == m).ok_or_else(|| {
                Error::Recipe(format!(
                    "tokenizer.tokens.{tok}: model {m} is not among the models merged into {tensor}"
                ))
            })
        };
        Ok(match src {
            TokenSource::Zero => Vec::new(),
            TokenSource::Model(m) => {
                let i = input_of(m)?;
                let row = perms[i][j as usize].ok_or_else(|| {
                    Error::Recipe(format!(
                        "tokenizer.tokens.{tok}: model {m} has no token {tok:?} (give a model that has it, or {{kind: model_token, ...}})"
                    ))
                })?;
                vec![pb::RowRef {
                    input: i as u32,
                    row,
                }]
            }
            TokenSource::ModelToken {
                model,
                token_id,
                token,
            } => {
                let i = input_of(model)?;
                let row = match (token_id, token) {
                    (Some(id), _) => *id,
                    (None, Some(t)) => *self.vocabs[model.as_str()].get(t).ok_or_else(|| {
                        Error::Recipe(format!(
                            "tokenizer.tokens.{tok}: model {model}'s tokenizer has no token {t:?}"
                        ))
                    })?,
                    (None, None) => {
                        return Err(Error::Recipe(format!(
                            "tokenizer.tokens.{tok}: give `token_id` or `token`"
                        )))
                    }
                };
                if row >= in_rows[i] {
                    return Err(Error::Recipe(format!(
                        "tokenizer.tokens.{tok}: token id {row} is past model {model}'s {} rows of {tensor}",
                        in_rows[i]
                    )));
                }
                vec![pb::RowRef {
                    input: i as u32,
                    row,
                }]
            }
        })
    }
}

/// Appends output row `out` ← source row `src`, extending the last run when both follow on.
fn push_run(runs: &mut Vec<pb::RowRun>, out: u64, src: u64) {
    if let Some(r) = runs.last_mut() {
        if r.out_start + r.count == out && r.src_start + r.count == src {
            r.count += 1;
            return;
        }
    }
    runs.push(pb::RowRun {
        out_start: out,
        count: 1,
        src_start: src,
    });
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

/// `job` as a task over rows `[start, end)` needs it: its row map cut to the runs and default
/// rows of that range (whole when the range reaches padding rows, which are means over every
/// real row).
pub fn for_rows(job: &pb::TensorJob, start: u64, end: u64) -> pb::TensorJob {
    let Some(map) = &job.row_map else {
        return job.clone();
    };
    if map.pad_from > 0 && end > map.pad_from {
        return job.clone();
    }
    let cut = pb::RowMap {
        inputs: map
            .inputs
            .iter()
            .map(|ir| pb::InputRows {
                runs: ir
                    .runs
                    .iter()
                    .filter_map(|r| {
                        let a = r.out_start.max(start);
                        let b = (r.out_start + r.count).min(end);
                        (a < b).then(|| pb::RowRun {
                            out_start: a,
                            count: b - a,
                            src_start: r.src_start + (a - r.out_start),
                        })
                    })
                    .collect(),
            })
            .collect(),
        defaults: map
            .defaults
            .iter()
            .filter(|d| (start..end).contains(&d.out_row))
            .cloned()
            .collect(),
        pad_from: map.pad_from,
    };
    pb::TensorJob {
        row_map: Some(cut),
        ..job.clone()
    }
}

#[cfg(test)]
mod tests {
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
        let job = pb::TensorJob {
            row_map: Some(pb::RowMap {
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
            }),
            ..Default::default()
        };
        let cut = for_rows(&job, 1, 4).row_map.unwrap();
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
