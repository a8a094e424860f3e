//! Picking a sweep's points by value (`--points`), and the sweep's `index.json`.

use serde_yaml::Value;

use super::{show, Point, Sweep};
use crate::error::{Error, Result};

impl Sweep {
    /// The points that match any of `filters` (each `label=value,label=value`: all must
    /// match), all points when there are none. A filter naming no axis, or matching nothing,
    /// is an error that lists what there is.
    pub fn select(&self, filters: &[String]) -> Result<Vec<&Point>> {
        if filters.is_empty() {
            return Ok(self.points.iter().collect());
        }
        let mut conds = Vec::new();
        for f in filters {
            let mut all = Vec::new();
            for c in f.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let Some((label, value)) = c.split_once('=') else {
                    return Err(Error::usage(
                        format!("--points {f:?}"),
                        format!("`{c}` is not LABEL=VALUE (labels: {})", self.labels()),
                    ));
                };
                let Some(axis) = self.axes.iter().position(|a| a.label == label.trim()) else {
                    return Err(Error::usage(
                        format!("--points {f:?}"),
                        format!(
                            "this sweep has no `{}` (labels: {})",
                            label.trim(),
                            self.labels()
                        ),
                    ));
                };
                all.push((axis, value.trim().to_string()));
            }
            conds.push(all);
        }
        let picked: Vec<&Point> = self
            .points
            .iter()
            .filter(|p| {
                conds.iter().any(|all| {
                    all.iter()
                        .all(|(axis, want)| same_value(&p.values[*axis].1, want))
                })
            })
            .collect();
        if picked.is_empty() {
            return Err(Error::usage(
                format!("--points {}", filters.join(" ")),
                format!(
                    "no point matches; the points are: {}",
                    self.points
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            ));
        }
        Ok(picked)
    }

    fn labels(&self) -> String {
        self.axes
            .iter()
            .map(|a| a.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `index.json` of a sweep's output folder: the axes, and each point (name, folder, values,
    /// recipe) that `done` lists.
    pub fn index_json(&self, done: &[&Point]) -> serde_json::Value {
        let value = |v: &Value| serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "sweep_mode": self.mode,
            "axes": self.axes.iter().map(|a| serde_json::json!({
                "label": a.label,
                "values": a.values.iter().map(value).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "points": done.iter().map(|p| serde_json::json!({
                "name": p.name,
                "path": format!("{}/", p.name),
                "values": p.values.iter().map(|(l, v)| (l.clone(), value(v))).collect::<serde_json::Map<_, _>>(),
                "recipe": p.recipe,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Whether a point's value is the one `--points` wrote (numbers compared as numbers: `1`,
/// `1.0` and `1e0` are one value).
fn same_value(v: &Value, want: &str) -> bool {
    match v {
        Value::Number(n) => match (n.as_f64(), want.parse::<f64>()) {
            (Some(a), Ok(b)) => a == b,
            _ => false,
        },
        other => show(other) == want,
    }
}
