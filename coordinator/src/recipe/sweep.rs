//! Sweeps: a recipe that lists several values for some parameters (`weight: {sweep: [0.5,
//! 1.0]}`, at any of the four parameter levels, inside gradients and filter lists too) or for
//! the method (a top-level `sweep_methods: [task_arithmetic, ties]`) stands for a grid of
//! recipes, one per *point*: the product of the lists, or with `sweep_mode: zip` the lists
//! taken side by side. Each point's recipe is the sweep recipe with that point's values put in
//! and the sweep keys removed: an ordinary recipe, so a point's output is exactly the merge of
//! its expanded recipe run alone.
//!
//! Each point has a name made of its values (`lang_eu.weight=0.75,density=0.5`), used as its
//! output folder; [`Sweep::select`] picks points by values (`--points`).

use serde_yaml::Value;

use crate::error::{Error, Result};

/// The most points one sweep may have (each is a whole merge written to its own folder).
pub const MAX_POINTS: usize = 256;

/// The longest point name (a folder name; most file systems allow 255 bytes).
const MAX_NAME: usize = 200;

/// One swept setting: its label in point names, where it sits, and its values.
#[derive(Clone, Debug)]
pub struct Axis {
    /// `lang_eu.weight`, `density`, `slices[0].t[2]`, `method`.
    pub label: String,
    path: Vec<Step>,
    pub values: Vec<Value>,
}

#[derive(Clone, Debug)]
enum Step {
    Key(Value),
    Index(usize),
}

/// One point of a sweep.
#[derive(Clone, Debug)]
pub struct Point {
    /// The point's folder name: `label=value` for each axis, comma-separated.
    pub name: String,
    /// Each axis's label and this point's value of it, in axis order.
    pub values: Vec<(String, Value)>,
    /// The point's recipe: the sweep recipe with these values and without the sweep keys.
    pub recipe: String,
}

/// A sweep recipe, expanded.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub axes: Vec<Axis>,
    /// `product` or `zip`.
    pub mode: &'static str,
    pub points: Vec<Point>,
}

fn bad(key: impl std::fmt::Display, reason: impl std::fmt::Display) -> Error {
    Error::recipe(key, reason)
}

/// Expands `text` when it is a sweep (it has `sweep_methods`, `sweep_mode` or a `{sweep: ...}`
/// value); `None` for an ordinary recipe, which is left to the recipe parser as it is.
pub fn expand(text: &str) -> Result<Option<Sweep>> {
    if !text.contains("sweep") {
        return Ok(None);
    }
    super::parse::check_text(text)?;
    let doc: Value = serde_yaml::from_str(text)
        .map_err(|e| Error::recipe("", format!("not valid YAML: {e}")))?;
    let Some(top) = doc.as_mapping() else {
        return Ok(None);
    };
    let mut axes = Vec::new();
    let mut base = top.clone();
    if let Some(methods) = base.shift_remove("sweep_methods") {
        if base.contains_key("merge_method") {
            return Err(bad(
                "sweep_methods",
                "the recipe gives merge_method too: keep one (sweep_methods lists the methods)",
            ));
        }
        let Value::Sequence(list) = methods else {
            return Err(bad("sweep_methods", "must be a list of merge methods"));
        };
        if let Some(v) = list.iter().find(|v| !v.is_string()) {
            return Err(bad("sweep_methods", format!("{v:?} is not a method name")));
        }
        let path = vec![Step::Key(Value::from("merge_method"))];
        axes.push(axis("method".into(), path, list)?);
    }
    let mode = match base.shift_remove("sweep_mode") {
        None => "product",
        Some(Value::String(m)) if m == "product" => "product",
        Some(Value::String(m)) if m == "zip" => "zip",
        Some(other) => {
            return Err(bad(
                "sweep_mode",
                format!("{other:?}: use `product` (every combination, the default) or `zip`"),
            ))
        }
    };
    find_axes(
        &Value::Mapping(base.clone()),
        &mut Vec::new(),
        &Ctx::Top,
        &mut axes,
    )?;
    if axes.is_empty() {
        if mode == "zip" || top.contains_key("sweep_mode") {
            return Err(bad("sweep_mode", "the recipe sweeps nothing"));
        }
        return Ok(None);
    }
    unique_labels(&axes)?;
    let combos = combinations(&axes, mode)?;
    let base = Value::Mapping(base);
    let points = combos
        .into_iter()
        .map(|pick| point(&base, &axes, &pick))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Sweep { axes, mode, points }))
}

fn axis(label: String, path: Vec<Step>, values: Vec<Value>) -> Result<Axis> {
    if values.is_empty() {
        return Err(bad(&label, "`sweep:` needs at least one value"));
    }
    if let Some(v) = values.iter().find(|v| v.is_mapping() || v.is_sequence()) {
        return Err(bad(
            &label,
            format!("a swept value must be a number, a string or a boolean, not {v:?}"),
        ));
    }
    Ok(Axis {
        label,
        path,
        values,
    })
}

/// Where the walk is, for labels and for where `sweep:` may appear.
#[derive(Clone)]
enum Ctx {
    Top,
    /// Inside a model entry or slice source: the model's short name, and the slice's label.
    Model(String, String),
    /// Inside a slice (not in a source): its label (`slices[0]`).
    Slice(String),
    /// Inside a `parameters` mapping: the label so far (`lang_eu.weight[0]`).
    Param(String),
}

/// The last path segment of a model reference (`org/lang_eu@rev` -> `lang_eu`), with anything
/// but letters, digits, `.`, `_` and `-` made `_`, so that it can go into a folder name.
fn short_name(model: &str) -> String {
    let m = model
        .split('@')
        .next()
        .unwrap_or(model)
        .trim_end_matches('/');
    let last = m.rsplit('/').next().unwrap_or(m);
    last.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The context of the value of `key` in a mapping at `ctx`.
fn child_of_key(ctx: &Ctx, key: &str) -> Ctx {
    match ctx {
        // a filter item's `value` adds nothing to the label
        Ctx::Param(l) if key == "value" => Ctx::Param(l.clone()),
        Ctx::Param(l) => Ctx::Param(join(l, &short_name(key))),
        Ctx::Top if key == "parameters" => Ctx::Param(String::new()),
        Ctx::Slice(s) if key == "parameters" => Ctx::Param(s.clone()),
        Ctx::Model(m, s) if key == "parameters" => Ctx::Param(join(s, m)),
        other => other.clone(),
    }
}

/// The context of item `i` of the list under `key`, whose own context is `ctx` (`parent` is
/// the context of the mapping that holds `key`).
fn child_of_item(parent: &Ctx, ctx: &Ctx, key: &str, i: usize, item: &Value) -> Ctx {
    let model = || {
        item.get("model")
            .and_then(Value::as_str)
            .map(short_name)
            .unwrap_or_else(|| format!("{key}[{i}]"))
    };
    match (parent, ctx) {
        (_, Ctx::Param(l)) => {
            // a filter list's items by their filter, a gradient's by position
            let tag = item
                .get("filter")
                .and_then(Value::as_str)
                .map(short_name)
                .unwrap_or_else(|| i.to_string());
            Ctx::Param(format!("{l}[{tag}]"))
        }
        (Ctx::Top, _) if key == "models" => Ctx::Model(model(), String::new()),
        (Ctx::Top, _) if key == "slices" => Ctx::Slice(format!("slices[{i}]")),
        (Ctx::Slice(s), _) if key == "sources" => Ctx::Model(model(), s.clone()),
        (_, c) => c.clone(),
    }
}

/// A `{sweep: [...]}` mapping's list.
fn sweep_list(v: &Value) -> Option<&Value> {
    let m = v.as_mapping()?;
    if m.len() == 1 {
        m.get("sweep")
    } else {
        None
    }
}

fn find_axes(v: &Value, path: &mut Vec<Step>, ctx: &Ctx, axes: &mut Vec<Axis>) -> Result<()> {
    if let Some(list) = sweep_list(v) {
        let Ctx::Param(label) = ctx else {
            return Err(bad(
                describe(path),
                "`sweep:` may only give a parameter's values (under `parameters:`); \
                 sweep the method with a top-level `sweep_methods:`",
            ));
        };
        let Value::Sequence(values) = list else {
            return Err(bad(label, "`sweep:` must be a list of values"));
        };
        axes.push(axis(label.clone(), path.clone(), values.clone())?);
        return Ok(());
    }
    let Value::Mapping(m) = v else {
        return Ok(());
    };
    for (k, child) in m {
        let key = k.as_str().unwrap_or_default();
        let cctx = child_of_key(ctx, key);
        path.push(Step::Key(k.clone()));
        if let Value::Sequence(items) = child {
            for (i, item) in items.iter().enumerate() {
                let ictx = child_of_item(ctx, &cctx, key, i, item);
                path.push(Step::Index(i));
                find_axes(item, path, &ictx, axes)?;
                path.pop();
            }
        } else {
            find_axes(child, path, &cctx, axes)?;
        }
        path.pop();
    }
    Ok(())
}

/// `models[0].parameters.weight`: a path in the recipe, for messages.
fn describe(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k.as_str().unwrap_or("?"));
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn unique_labels(axes: &[Axis]) -> Result<()> {
    for (i, a) in axes.iter().enumerate() {
        if let Some(b) = axes[..i].iter().find(|b| b.label == a.label) {
            return Err(bad(
                describe(&a.path),
                format!(
                    "swept like {} and both would be named `{}` in point names; \
                     give the models distinct folder names",
                    describe(&b.path),
                    a.label
                ),
            ));
        }
    }
    Ok(())
}

/// The index of each axis's value at each point, in order (the first axis varies slowest).
fn combinations(axes: &[Axis], mode: &str) -> Result<Vec<Vec<usize>>> {
    if mode == "zip" {
        let n = axes[0].values.len();
        if let Some(a) = axes.iter().find(|a| a.values.len() != n) {
            return Err(bad(
                "sweep_mode",
                format!(
                    "zip takes the lists side by side, so they need one length: {} has {n} values, {} has {}",
                    axes[0].label,
                    a.label,
                    a.values.len()
                ),
            ));
        }
        return Ok((0..n).map(|i| vec![i; axes.len()]).collect());
    }
    let total = axes
        .iter()
        .try_fold(1usize, |acc, a| acc.checked_mul(a.values.len()))
        .filter(|&t| t <= MAX_POINTS);
    let Some(total) = total else {
        return Err(too_many(axes));
    };
    let mut out = Vec::with_capacity(total);
    for mut k in 0..total {
        let mut pick = vec![0; axes.len()];
        for (j, a) in axes.iter().enumerate().rev() {
            pick[j] = k % a.values.len();
            k /= a.values.len();
        }
        out.push(pick);
    }
    Ok(out)
}

fn too_many(axes: &[Axis]) -> Error {
    let sizes: Vec<String> = axes
        .iter()
        .map(|a| format!("{} ({})", a.label, a.values.len()))
        .collect();
    bad(
        "sweep",
        format!(
            "the grid {} has more than {MAX_POINTS} points; sweep fewer values, or split it \
             into several recipes",
            sizes.join(" x ")
        ),
    )
}

/// A value as it appears in point names: numbers in their shortest form (`0.75`, `1`).
pub fn show(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        other => format!("{other:?}"),
    }
}

fn point(base: &Value, axes: &[Axis], pick: &[usize]) -> Result<Point> {
    let mut doc = base.clone();
    let mut values = Vec::with_capacity(axes.len());
    for (a, &i) in axes.iter().zip(pick) {
        let v = a.values[i].clone();
        set(&mut doc, &a.path, v.clone());
        values.push((a.label.clone(), v));
    }
    let name = values
        .iter()
        .map(|(l, v)| format!("{l}={}", show(v)))
        .collect::<Vec<_>>()
        .join(",");
    if name.len() > MAX_NAME || name.contains('/') || name.starts_with('.') {
        return Err(bad(
            "sweep",
            format!("the point name {name:?} cannot be a folder name (too long, or a `/` in a value); sweep fewer settings"),
        ));
    }
    let recipe = serde_yaml::to_string(&doc)
        .map_err(|e| bad("sweep", format!("cannot write a point's recipe: {e}")))?;
    Ok(Point {
        name,
        values,
        recipe,
    })
}

/// Puts `v` at `path` in `doc` (the path was found in a copy of `doc`, so it exists, but for
/// `merge_method`, which `sweep_methods` may add).
fn set(doc: &mut Value, path: &[Step], v: Value) {
    let Some((last, steps)) = path.split_last() else {
        return;
    };
    let mut cur = doc;
    for step in steps {
        let next = match (step, cur) {
            (Step::Key(k), Value::Mapping(m)) => m.get_mut(k),
            (Step::Index(i), Value::Sequence(s)) => s.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match (last, cur) {
        (Step::Key(k), Value::Mapping(m)) => {
            m.insert(k.clone(), v);
        }
        (Step::Index(i), Value::Sequence(s)) => {
            if let Some(slot) = s.get_mut(*i) {
                *slot = v;
            }
        }
        _ => {}
    }
}

mod select;

#[cfg(test)]
mod tests;
