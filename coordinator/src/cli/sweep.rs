//! `run`, `plan` and `submit` of a sweep recipe (`recipe::sweep`): one merge per point, each
//! into its own folder `OUT/NAME`, and `OUT/index.json` listing the points written so far with
//! their values and recipes.

use std::path::Path;

use crate::error::{Error, Result};
use crate::recipe::sweep::{Point, Sweep};
use crate::size::human;
use shardmerge_worker::storage::{Location, Resolver};

/// `--points`: which points of a sweep to run.
#[derive(clap::Args, Clone, Debug, Default)]
pub(super) struct PointArgs {
    /// Of a sweep recipe, run only the points with these values: LABEL=VALUE[,LABEL=VALUE...]
    /// (all must match; repeat the flag for more points; `plan` lists the labels)
    #[arg(long = "points", value_name = "LABEL=VALUE,...")]
    pub(super) points: Vec<String>,
}

/// The recipe's sweep and the points `a` picks, or `None` for an ordinary recipe.
pub(super) fn points<'s>(
    sweep: &'s Option<Sweep>,
    a: &PointArgs,
) -> Result<Option<(&'s Sweep, Vec<&'s Point>)>> {
    match sweep {
        Some(s) => Ok(Some((s, s.select(&a.points)?))),
        None if a.points.is_empty() => Ok(None),
        None => Err(Error::usage(
            "--points",
            "picks points of a sweep, and this recipe sweeps nothing (no `{sweep: [...]}` value, no sweep_methods)",
        )),
    }
}

/// `OUT/NAME`: a point's output folder.
pub(super) fn point_out(out: &str, p: &Point) -> String {
    format!("{}/{}", out.trim_end_matches('/'), p.name)
}

/// The points an earlier run of a sweep into `out` listed in `OUT/index.json` (they stay listed
/// when more points are added). An `index.json` that is not a sweep's index is the user's:
/// refused unless `overwrite`.
pub(super) async fn prior_points(
    out: &str,
    overwrite: bool,
    resolver: &Resolver,
) -> Result<Vec<serde_json::Value>> {
    let loc = index_location(out, resolver)?;
    if !loc.store.exists(&loc.path).await? {
        return Ok(Vec::new());
    }
    let bytes = loc.store.read_all(&loc.path).await?;
    let old: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    match old.as_ref().and_then(|v| v.get("points")?.as_array()) {
        Some(points) if old.as_ref().is_some_and(|v| v.get("sweep_mode").is_some()) => {
            Ok(points.clone())
        }
        _ if overwrite => Ok(Vec::new()),
        _ => Err(Error::AlreadyExists {
            path: loc.uri(),
            reason: format!(
                "{}: a file that is not a shardmerge sweep index is there, and a sweep writes \
                 its index.json there; pick another output folder, or pass --overwrite to \
                 replace it",
                loc.uri()
            ),
        }),
    }
}

fn index_location(out: &str, resolver: &Resolver) -> Result<Location> {
    let base = std::env::current_dir().unwrap_or_else(|_| Path::new(".").to_path_buf());
    Ok(resolver.resolve(out, &base)?.join("index.json"))
}

/// Writes `OUT/index.json`: the `prior` points not run again, then `done`.
pub(super) async fn write_index(
    out: &str,
    s: &Sweep,
    prior: &[serde_json::Value],
    done: &[&Point],
    resolver: &Resolver,
) -> Result<()> {
    let loc = index_location(out, resolver)?;
    let mut index = s.index_json(done);
    let mut points: Vec<serde_json::Value> = prior
        .iter()
        .filter(|old| {
            let name = old.get("name").and_then(|n| n.as_str());
            !done.iter().any(|p| Some(p.name.as_str()) == name)
        })
        .cloned()
        .collect();
    if let Some(new) = index.get("points").and_then(|p| p.as_array()) {
        points.extend(new.iter().cloned());
    }
    index["points"] = serde_json::Value::Array(points);
    let text = serde_json::to_string_pretty(&index).unwrap_or_default() + "\n";
    loc.store.put(&loc.path, text.into_bytes().into()).await?;
    Ok(())
}

/// The line `plan` starts a sweep with.
pub(super) fn header(s: &Sweep, picked: usize) -> String {
    let sizes: Vec<String> = s
        .axes
        .iter()
        .map(|a| format!("{} ({})", a.label, a.values.len()))
        .collect();
    let join = if s.mode == "zip" { " zip " } else { " x " };
    format!(
        "sweep        {} point(s) of {}: {}\n",
        picked,
        s.points.len(),
        sizes.join(join)
    )
}

/// One point's line in `plan`: its name and what it reads and writes.
pub(super) fn point_line(p: &Point, read: u64, written: u64) -> String {
    format!(
        "point        {}/  reads {}, writes {}\n",
        p.name,
        human(read),
        human(written)
    )
}

/// What `plan` says of the whole sweep: what its points would read run one by one, what
/// `run` and `submit` read running them together, and each point's share of a worker slot.
pub(super) fn total_line(points: usize, read: u64, once: u64, written: u64, share: u64) -> String {
    format!(
        "total        {points} merges: writes {}; run together they read {} (the inputs once for \
         all points; {} one by one), each point's tasks cut to {} of a worker slot\n",
        human(written),
        human(once),
        human(read),
        human(share)
    )
}
