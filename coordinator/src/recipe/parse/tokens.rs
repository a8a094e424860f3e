//! The recipe's `tokenizer:` section: the vocabulary's source, per-token embedding sources and
//! padding, as mergekit reads it.

use super::*;
use super::{as_map, bad, keys, kind, model_ref, string, tokenizer_source};

/// `tokenizer:` — `source` (default `union`), `tokens`, `pad_to_multiple_of`.
pub(super) fn tokenizer_section(v: &Value) -> Result<TokenizerConfig> {
    let m = keys(
        as_map(v, "tokenizer")?,
        "tokenizer",
        &["source", "tokens", "pad_to_multiple_of"],
    )?;
    let source = match m.get("source").filter(|v| !v.is_null()) {
        Some(v) => tokenizer_source(v, "tokenizer.source")?,
        None => TokenizerSource::Union,
    };
    let mut tokens = Vec::new();
    if let Some(t) = m.get("tokens").filter(|v| !v.is_null()) {
        for (k, val) in as_map(t, "tokenizer.tokens")? {
            let name = k
                .as_str()
                .ok_or_else(|| bad("tokenizer.tokens", format!("token {k:?} is not a string")))?;
            let p = format!("tokenizer.tokens.{name}");
            tokens.push((name.to_string(), token_config(val, &p)?));
        }
    }
    let pad_to_multiple_of = match m.get("pad_to_multiple_of").filter(|v| !v.is_null()) {
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 && n <= 1 << 20 => Some(n),
            _ => {
                return Err(bad(
                    "tokenizer.pad_to_multiple_of",
                    "expected a positive integer (at most 1048576)",
                ))
            }
        },
        None => None,
    };
    Ok(TokenizerConfig {
        source,
        tokens,
        pad_to_multiple_of,
    })
}

/// One `tokens` entry: `source` and `force`.
fn token_config(v: &Value, path: &str) -> Result<TokenConfig> {
    let m = keys(as_map(v, path)?, path, &["source", "force"])?;
    let force = match m.get("force") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(
                &format!("{path}.force"),
                format!("expected true or false, got {}", kind(other)),
            ))
        }
    };
    let source = m
        .get("source")
        .filter(|v| !v.is_null())
        .map(|v| token_source(v, &format!("{path}.source")))
        .transpose()?;
    if source.is_none() {
        return Err(bad(
            path,
            "missing `source` (a model, {kind: zero} or {kind: model_token, model: ..., token: ...})",
        ));
    }
    Ok(TokenConfig { source, force })
}

/// A token's `source`: a model, `{kind: zero}` or `{kind: model_token, ...}`.
fn token_source(v: &Value, path: &str) -> Result<TokenSource> {
    if v.is_string() {
        return Ok(TokenSource::Model(model_ref(v, path)?));
    }
    let m = keys(
        as_map(v, path)?,
        path,
        &["kind", "model", "token_id", "token"],
    )?;
    let k = string(
        m.get("kind")
            .ok_or_else(|| bad(path, "missing `kind` (zero or model_token)"))?,
        &format!("{path}.kind"),
    )?;
    match k.as_str() {
        "zero" => {
            if m.len() > 1 {
                return Err(bad(path, "`kind: zero` takes no other keys"));
            }
            Ok(TokenSource::Zero)
        }
        "model_token" => {
            let model = model_ref(
                m.get("model").ok_or_else(|| bad(path, "missing `model`"))?,
                &format!("{path}.model"),
            )?;
            let token_id = m
                .get("token_id")
                .map(|v| {
                    v.as_u64().ok_or_else(|| {
                        bad(
                            &format!("{path}.token_id"),
                            "expected a non-negative integer",
                        )
                    })
                })
                .transpose()?;
            let token = m
                .get("token")
                .map(|v| string(v, &format!("{path}.token")))
                .transpose()?;
            if token_id.is_some() == token.is_some() {
                return Err(bad(path, "give exactly one of `token_id` or `token`"));
            }
            Ok(TokenSource::ModelToken {
                model,
                token_id,
                token,
            })
        }
        other => Err(bad(
            &format!("{path}.kind"),
            format!("unknown kind `{other}` (expected zero or model_token)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_section_reads_like_mergekit() {
        let r = Recipe::parse(
            "merge_method: linear\nmodels:\n- model: a\ntokenizer:\n  pad_to_multiple_of: 8\n  tokens:\n    <x>:\n      source:\n        kind: zero\n    <y>:\n      source: a\n      force: true\n    <z>:\n      source: {kind: model_token, model: a, token_id: 3}\n",
        )
        .unwrap();
        let t = r.tokenizer.unwrap();
        assert_eq!(t.source, TokenizerSource::Union);
        assert_eq!(t.pad_to_multiple_of, Some(8));
        assert_eq!(t.tokens.len(), 3);
        assert_eq!(t.tokens[0].0, "<x>");
        assert_eq!(t.tokens[0].1.source, Some(TokenSource::Zero));
        assert!(t.tokens[1].1.force);
        assert_eq!(
            t.tokens[2].1.source,
            Some(TokenSource::ModelToken {
                model: "a".into(),
                token_id: Some(3),
                token: None
            })
        );
        let u =
            Recipe::parse("merge_method: linear\ntokenizer_source: union\nmodels:\n- model: a\n")
                .unwrap();
        assert_eq!(u.vocab_source(), Some(&TokenizerSource::Union));
        for (text, want) in [
            (
                "tokenizer_source: base\ntokenizer: {source: base}\n",
                "not both",
            ),
            (
                "tokenizer: {tokens: {x: {force: true}}}\n",
                "missing `source`",
            ),
            (
                "tokenizer: {tokens: {x: {source: {kind: one}}}}\n",
                "unknown kind",
            ),
            (
                "tokenizer: {tokens: {x: {source: {kind: model_token, model: a}}}}\n",
                "exactly one",
            ),
            ("tokenizer: {pad_to_multiple_of: 0}\n", "positive"),
            ("tokenizer: {sauce: union}\n", "unknown key"),
        ] {
            let e = Recipe::parse(&format!(
                "merge_method: linear\nmodels:\n- model: a\n{text}"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{want:?} missing from: {e}");
        }
    }
}
