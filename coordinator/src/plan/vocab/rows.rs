//! Row maps: where each output row of an embedding comes from, per input, and the part of a
//! row map one task needs.

use shardmerge_proto as pb;

use super::Vocab;
use crate::error::{Error, Result};
use crate::recipe::TokenSource;

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
                    Error::plan(tensor, format!("model {m} has no vocabulary (plan error)"))
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
                        return Err(Error::input("", format!(
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
                Error::recipe(
                    format!("tokenizer.tokens.{tok}"),
                    format!("model {m} is not among the models merged into {tensor}"),
                )
            })
        };
        Ok(match src {
            TokenSource::Zero => Vec::new(),
            TokenSource::Model(m) => {
                let i = input_of(m)?;
                let row = perms[i][j as usize].ok_or_else(|| {
                    Error::recipe(format!("tokenizer.tokens.{tok}"), format!("model {m} has no token {tok:?} (give a model that has it, or {{kind: model_token, ...}})"))
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
                        Error::recipe(
                            format!("tokenizer.tokens.{tok}"),
                            format!("model {model}'s tokenizer has no token {t:?}"),
                        )
                    })?,
                    (None, None) => {
                        return Err(Error::recipe(
                            format!("tokenizer.tokens.{tok}"),
                            "give `token_id` or `token`",
                        ))
                    }
                };
                if row >= in_rows[i] {
                    return Err(Error::recipe(
                        format!("tokenizer.tokens.{tok}"),
                        format!(
                            "token id {row} is past model {model}'s {} rows of {tensor}",
                            in_rows[i]
                        ),
                    ));
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
pub(super) fn push_run(runs: &mut Vec<pb::RowRun>, out: u64, src: u64) {
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

/// Row map `map` as a task over rows `[start, end)` needs it: cut to the runs and default
/// rows of that range (whole when the range reaches padding rows, which are means over every
/// real row).
pub fn for_rows(map: &pb::RowMap, start: u64, end: u64) -> pb::RowMap {
    if map.pad_from > 0 && end > map.pad_from {
        return map.clone();
    }
    pb::RowMap {
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
    }
}
