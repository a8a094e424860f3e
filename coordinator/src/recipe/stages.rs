//! Multi-stage recipes, in mergekit-multi's file format: several `---`-separated recipes, each
//! with a `name:`, a later one naming an earlier one wherever a model goes (`base_model: langs`,
//! `- model: langs`, `tokenizer_source: langs`). At most one recipe has no name: the final
//! output. Stages are put in dependency order; a duplicate name, a second unnamed recipe, a
//! reference cycle or an unusable name is an error naming the stage.
//!
//! A stage's recipe is an ordinary recipe once each stage name in it is replaced by where that
//! stage's checkpoint is ([`Stage::text`]), so a stage's output is exactly the merge of its
//! recipe run alone on its inputs.

use serde_yaml::{Mapping, Value};

use crate::error::{Error, Result};

/// The most stages one file may hold.
pub const MAX_STAGES: usize = 64;

/// One recipe of a multi-stage file.
#[derive(Clone, Debug)]
pub struct Stage {
    /// Its `name:`; none for the final output.
    pub name: Option<String>,
    /// Its position in the file (from 0).
    pub index: usize,
    /// The recipe without `name:`.
    doc: Value,
    /// The stages it names, in order of first mention.
    pub deps: Vec<String>,
}

/// A multi-stage file, its stages in dependency order (each after the stages it names, and
/// otherwise in file order).
#[derive(Clone, Debug)]
pub struct Stages {
    pub stages: Vec<Stage>,
}

fn bad(stage: &str, reason: impl std::fmt::Display) -> Error {
    Error::recipe(stage, reason)
}

impl Stage {
    /// `stage `langs`` or `the final (unnamed) stage`, for messages.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("stage `{n}`"),
            None => "the final (unnamed) stage".into(),
        }
    }

    /// The stage's recipe with each stage name replaced by `locate(name)` (its checkpoint's
    /// location); a `+lora` suffix stays where it was.
    pub fn text(&self, locate: &dyn Fn(&str) -> String) -> String {
        let mut doc = self.doc.clone();
        model_refs(&mut doc, &mut |s: &mut String| {
            let (model, rest) = split_ref(s);
            if self.deps.iter().any(|d| d == model) {
                *s = format!("{}{rest}", locate(model));
            }
        });
        serde_yaml::to_string(&doc).unwrap_or_default()
    }

    /// The recipe as written in the file, without `name:` (stage names left as they are).
    pub fn raw_text(&self) -> String {
        serde_yaml::to_string(&self.doc).unwrap_or_default()
    }
}

impl Stages {
    /// The unnamed stage, if the file has one.
    pub fn final_stage(&self) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name.is_none())
    }

    pub fn get(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name.as_deref() == Some(name))
    }

    /// The stages `target` needs, itself included, in dependency order.
    pub fn needed_for(&self, target: &Stage) -> Vec<&Stage> {
        let mut want: Vec<&str> = target.deps.iter().map(String::as_str).collect();
        let mut i = 0;
        while i < want.len() {
            if let Some(s) = self.get(want[i]) {
                for d in &s.deps {
                    if !want.contains(&d.as_str()) {
                        want.push(d);
                    }
                }
            }
            i += 1;
        }
        self.stages
            .iter()
            .filter(|s| {
                s.index == target.index || s.name.as_deref().is_some_and(|n| want.contains(&n))
            })
            .collect()
    }
}

/// `langs+adapter` → (`langs`, `+adapter`); `langs@rev` → (`langs`, `@rev`).
fn split_ref(s: &str) -> (&str, &str) {
    let cut = s.find(['+', '@']).unwrap_or(s.len());
    (&s[..cut], &s[cut..])
}

/// Calls `f` on every string in a model's place in a recipe: `base_model`, `models[].model`,
/// `slices[].base_model`, `slices[].sources[].model`, `tokenizer_source`, `tokenizer.source`
/// and `tokenizer.tokens.*.source` (a model, or `{kind: model_token, model}`).
fn model_refs(doc: &mut Value, f: &mut dyn FnMut(&mut String)) {
    let Some(top) = doc.as_mapping_mut() else {
        return;
    };
    at(top, "base_model", f);
    at(top, "tokenizer_source", f);
    for m in list(top, "models") {
        at(m, "model", f);
    }
    for s in list(top, "slices") {
        at(s, "base_model", f);
        for src in list(s, "sources") {
            at(src, "model", f);
        }
    }
    if let Some(Value::Mapping(t)) = top.get_mut("tokenizer") {
        at(t, "source", f);
        if let Some(Value::Mapping(tokens)) = t.get_mut("tokens") {
            for (_, tok) in tokens.iter_mut() {
                let Some(tm) = tok.as_mapping_mut() else {
                    continue;
                };
                if let Some(Value::Mapping(src)) = tm.get_mut("source") {
                    at(src, "model", f);
                    continue;
                }
                at(tm, "source", f);
            }
        }
    }
}

/// `f` on `m[key]` when it is a string (not the `union`/`base` keywords of a tokenizer source).
fn at(m: &mut Mapping, key: &str, f: &mut dyn FnMut(&mut String)) {
    if let Some(Value::String(s)) = m.get_mut(key) {
        if s != "union" && s != "base" {
            f(s);
        }
    }
}

/// The mappings of the list `m[key]`.
fn list<'a>(m: &'a mut Mapping, key: &str) -> impl Iterator<Item = &'a mut Mapping> {
    let items = match m.get_mut(key) {
        Some(Value::Sequence(items)) => items.as_mut_slice(),
        _ => &mut [],
    };
    items.iter_mut().filter_map(Value::as_mapping_mut)
}

/// The YAML documents of `text`, empty ones left out.
fn documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v: Value = serde::Deserialize::deserialize(d).map_err(|e| {
            Error::recipe(
                "",
                format!("recipe {} of the file: not valid YAML: {e}", i + 1),
            )
        })?;
        if !v.is_null() {
            docs.push(v);
        }
        if docs.len() > MAX_STAGES {
            return Err(Error::recipe(
                "",
                format!("more than {MAX_STAGES} recipes in one file"),
            ));
        }
    }
    Ok(docs)
}

/// A multi-stage file's stages in dependency order, or `None` for a file of one recipe (left
/// to the recipe parser as it is).
pub fn split(text: &str) -> Result<Option<Stages>> {
    if !text.contains("---") {
        return Ok(None);
    }
    super::parse::check_text(text)?;
    let docs = documents(text)?;
    if docs.len() < 2 {
        return Ok(None);
    }
    let mut stages: Vec<Stage> = Vec::new();
    for (index, mut doc) in docs.into_iter().enumerate() {
        let name = take_name(&mut doc, index)?;
        let dup = stages.iter().find(|s| s.name == name);
        match (&name, dup) {
            (Some(n), Some(_)) => {
                return Err(bad(&format!("stage `{n}`"), format!("recipe {} of the file has the same name as an earlier one: stage names must be unique", index + 1)))
            }
            (None, Some(_)) => return Err(bad("", format!("recipes {} and {} of the file both have no `name:`: at most one recipe (the final output) may be unnamed", dup.map_or(0, |s| s.index) + 1, index + 1))),
            _ => {}
        }
        stages.push(Stage {
            name,
            index,
            doc,
            deps: Vec::new(),
        });
    }
    let names: Vec<String> = stages.iter().filter_map(|s| s.name.clone()).collect();
    for s in &mut stages {
        let mut deps = Vec::new();
        model_refs(&mut s.doc, &mut |r: &mut String| {
            let (model, _) = split_ref(r);
            if names.iter().any(|n| n == model) && !deps.iter().any(|d| d == model) {
                deps.push(model.to_string());
            }
        });
        s.deps = deps;
    }
    Ok(Some(Stages {
        stages: order(stages)?,
    }))
}

/// `name:` taken out of a stage's recipe, checked as a folder name.
fn take_name(doc: &mut Value, index: usize) -> Result<Option<String>> {
    let where_ = format!("recipe {} of the file", index + 1);
    let m = doc
        .as_mapping_mut()
        .ok_or_else(|| bad(&where_, "expected a mapping (key: value pairs)"))?;
    let Some(v) = m.shift_remove("name") else {
        return Ok(None);
    };
    let Value::String(n) = v else {
        return Err(bad(&format!("{where_}.name"), "expected a string"));
    };
    let ok = !n.is_empty()
        && n.len() <= 200
        && n != "."
        && n != ".."
        && !n.starts_with('.')
        && n.chars().all(|c| c.is_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(bad(&format!("{where_}.name"), format!("`{n}` is not usable as a stage name: it names a folder, so use letters, digits, `-`, `_` and `.` (not first), at most 200 bytes")));
    }
    Ok(Some(n))
}

/// The stages in dependency order (file order among independent ones); a cycle is an error
/// naming the stages on it.
fn order(mut left: Vec<Stage>) -> Result<Vec<Stage>> {
    let mut done: Vec<Stage> = Vec::new();
    while !left.is_empty() {
        let ready = left.iter().position(|s| {
            s.deps
                .iter()
                .all(|d| done.iter().any(|x| x.name.as_deref() == Some(d)))
        });
        match ready {
            Some(i) => done.push(left.remove(i)),
            None => return Err(cycle(&left)),
        }
    }
    Ok(done)
}

/// The error for stages none of which can run first: the cycle found by following the
/// first dependency of each.
fn cycle(left: &[Stage]) -> Error {
    let mut path: Vec<&str> = Vec::new();
    let mut cur = &left[0];
    loop {
        let name = cur.name.as_deref().unwrap_or("(unnamed)");
        if let Some(k) = path.iter().position(|p| *p == name) {
            let mut ring: Vec<String> = path[k..].iter().map(|p| format!("`{p}`")).collect();
            ring.push(format!("`{name}`"));
            return bad(
                &format!("stage `{name}`"),
                format!(
                    "the stages name each other in a cycle ({}): no order can run them",
                    ring.join(" -> ")
                ),
            );
        }
        path.push(name);
        let next = cur
            .deps
            .iter()
            .find_map(|d| left.iter().find(|s| s.name.as_deref() == Some(d)));
        match next {
            Some(n) => cur = n,
            None => return bad(&cur.label(), "its stages cannot be ordered"),
        }
    }
}

#[cfg(test)]
mod tests;
