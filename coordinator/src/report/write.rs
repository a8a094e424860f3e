//! The report's files: `report.json` (schema in docs/report.md), `report.csv` (one figure a
//! line) and `report.html` (self-contained, inline SVG).

use bytes::Bytes;
use serde_json::{json, Value};
use shardmerge_worker::storage::Location;

use super::{html, Entry, Report};
use crate::error::{Error, Result};

/// The schema's name and version, the first key of `report.json`.
pub const SCHEMA: &str = "shardmerge.report/1";

/// A figure for JSON: a number, or `null` when undefined (NaN).
fn num(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

fn nums(xs: &[f64]) -> Value {
    Value::Array(xs.iter().map(|&x| num(x)).collect())
}

fn entry_json(e: &Entry) -> Value {
    let f = &e.figures;
    json!({
        "name": e.name,
        "layer": e.layer,
        "kind": e.kind,
        "elements": f.elements,
        "base_norm": num(f.base_norm),
        "norm": nums(&f.norms),
        "norm_ratio": nums(&f.ratios),
        "cosine": nums(&f.cosines),
        "sign_agreement": nums(&f.sign_agreement),
        "both_nonzero": f.both_nonzero,
        "conflict_rate": nums(&f.conflict_rate),
        "conflicts": f.conflicts,
        "overlap": f.overlaps,
        "distance": nums(&f.distances),
        "distance_ratio": nums(&f.distance_ratios),
    })
}

/// `report.json`'s content.
pub fn to_json(r: &Report) -> Value {
    json!({
        "schema": SCHEMA,
        "base": r.base,
        "models": r.models,
        "pairs": r.pairs().iter().map(|&(i, j)| json!([r.models[i], r.models[j]])).collect::<Vec<_>>(),
        "densities": r.densities,
        "points": r.points,
        "distance_points": r.distance_points,
        "bytes_read": r.bytes_read,
        "total": entry_json(&r.total),
        "kinds": r.kinds.iter().map(entry_json).collect::<Vec<_>>(),
        "layers": r.layers.iter().map(entry_json).collect::<Vec<_>>(),
        "tensors": r.tensors.iter().map(entry_json).collect::<Vec<_>>(),
    })
}

/// A CSV field: quoted when it holds a comma, a quote or a line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `report.csv`: `scope,name,layer,kind,metric,subject,value`, one figure a line; an
/// undefined figure has an empty value.
pub fn to_csv(r: &Report) -> String {
    let mut out = String::from("scope,name,layer,kind,metric,subject,value\n");
    let pairs: Vec<String> = r
        .pairs()
        .iter()
        .map(|&(i, j)| format!("{}|{}", r.models[i], r.models[j]))
        .collect();
    let densities: Vec<String> = r.densities.iter().map(f64::to_string).collect();
    let scopes = [
        ("total", std::slice::from_ref(&r.total)),
        ("kind", &r.kinds),
        ("layer", &r.layers),
        ("tensor", &r.tensors),
    ];
    for (scope, entries) in scopes {
        for e in entries {
            let f = &e.figures;
            let layer = e.layer.map_or(String::new(), |l| l.to_string());
            let mut line = |metric: &str, subject: &str, v: String| {
                out += &[
                    scope,
                    &field(&e.name),
                    &layer,
                    e.kind,
                    metric,
                    &field(subject),
                    &v,
                ]
                .join(",");
                out.push('\n');
            };
            let fv = |x: f64| {
                if x.is_finite() {
                    x.to_string()
                } else {
                    String::new()
                }
            };
            line("elements", "", f.elements.to_string());
            line("base_norm", "", fv(f.base_norm));
            for (k, m) in r.models.iter().enumerate() {
                line("norm", m, fv(f.norms[k]));
                line("norm_ratio", m, fv(f.ratios[k]));
            }
            for (k, p) in pairs.iter().enumerate() {
                line("cosine", p, fv(f.cosines[k]));
                line("sign_agreement", p, fv(f.sign_agreement[k]));
                line("both_nonzero", p, f.both_nonzero[k].to_string());
            }
            for (k, d) in densities.iter().enumerate() {
                line("conflict_rate", d, fv(f.conflict_rate[k]));
                line("conflicts", d, f.conflicts[k].to_string());
                line("overlap", d, f.overlaps[k].to_string());
            }
            for (k, p) in r.distance_points.iter().enumerate() {
                line("distance", p, fv(f.distances[k]));
                line("distance_ratio", p, fv(f.distance_ratios[k]));
            }
        }
    }
    out
}

/// The report's file names.
pub const FILES: [&str; 3] = ["report.json", "report.csv", "report.html"];

/// Refuses an `out` that already holds a report file, unless `overwrite`.
pub async fn check_free(out: &Location, overwrite: bool) -> Result<()> {
    for name in FILES {
        let at = out.join(name);
        if !overwrite && at.store.exists(&at.path).await? {
            return Err(Error::AlreadyExists {
                path: at.uri(),
                reason: format!(
                    "{} already exists; pick another folder, or pass --overwrite to replace the report",
                    at.uri()
                ),
            });
        }
    }
    Ok(())
}

/// Writes `report.json`, `report.csv` and `report.html` into the folder `loc` (local or
/// s3://).
pub async fn write(r: &Report, loc: &Location) -> Result<()> {
    let json = serde_json::to_string_pretty(&to_json(r)).unwrap_or_default() + "\n";
    for (name, body) in FILES.into_iter().zip([json, to_csv(r), html::page(r)]) {
        let at = loc.join(name);
        at.store.put(&at.path, Bytes::from(body)).await?;
    }
    Ok(())
}
