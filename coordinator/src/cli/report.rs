//! `shardmerge report RECIPE OUT`, and the report of `run --report`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::args::EngineArgs;
use super::sweep::PointArgs;
use crate::embedded::RunOptions;
use crate::error::{Error, Result};
use crate::recipe::sweep::Point;
use crate::report::{self, ReportOptions};
use crate::size;
use shardmerge_worker::exec::ReportTap;
use shardmerge_worker::storage::Resolver;

/// `shardmerge report`'s arguments.
#[derive(clap::Args)]
pub(super) struct ReportCmd {
    /// mergekit YAML recipe (a sweep's: its models, and every density of its points)
    recipe: PathBuf,
    /// Output folder: a local path, file:// or s3://bucket/prefix
    out: String,
    #[command(flatten)]
    engine: EngineArgs,
    /// Of a sweep recipe: the folder a `run` of it wrote; the report then measures each point
    /// its index.json lists, its distance from the base (reading each point's checkpoint once)
    #[arg(long, value_name = "DIR")]
    sweep_out: Option<String>,
    /// Replace report files OUT already holds
    #[arg(long)]
    overwrite: bool,
    /// No summary line
    #[arg(long, short)]
    quiet: bool,
}

impl ReportCmd {
    pub(super) async fn run(&self, resolver: &Resolver) -> Result<()> {
        let text = super::read_recipe(&self.recipe)?;
        let (out, e) = (&self.out, &self.engine);
        let points = match &self.sweep_out {
            None => Vec::new(),
            Some(dir) => listed_points(&text, dir, resolver).await?,
        };
        let how = (self.overwrite, self.quiet, None);
        report(&text, out, e, points, how, resolver).await
    }
}

/// The points of the sweep `text` that `DIR/index.json` lists as written, with their folders.
async fn listed_points(
    text: &str,
    dir: &str,
    resolver: &Resolver,
) -> Result<Vec<(String, String)>> {
    let Some(s) = crate::recipe::sweep::expand(text)? else {
        return Err(Error::usage(
            "--sweep-out",
            "measures the points of a sweep, and this recipe sweeps nothing",
        ));
    };
    let listed = super::sweep::prior_points(dir, false, resolver).await?;
    let names: Vec<&str> = listed
        .iter()
        .filter_map(|v| v.get("name")?.as_str())
        .collect();
    let picked: Vec<&Point> = s
        .points
        .iter()
        .filter(|p| names.contains(&p.name.as_str()))
        .collect();
    if picked.is_empty() {
        return Err(Error::usage(
            "--sweep-out",
            format!("{dir}/index.json lists no point of this recipe's sweep: pass the folder `shardmerge run` wrote this sweep into"),
        ));
    }
    point_folders(dir, &picked, resolver)
}

/// Each point's name and its folder `OUT/NAME`, as a full URI.
fn point_folders(
    out: &str,
    points: &[&Point],
    resolver: &Resolver,
) -> Result<Vec<(String, String)>> {
    let cwd = crate::paths::cwd();
    points
        .iter()
        .map(|p| {
            let at = resolver.resolve(&super::sweep::point_out(out, p), &cwd)?;
            Ok((p.name.clone(), at.uri()))
        })
        .collect()
}

/// Computes the report of `text` and writes it into the folder `out` (`how`: whether to replace
/// a report there, whether quietly, and the tap a merge fed, if any).
pub(super) async fn report(
    text: &str,
    out: &str,
    engine: &EngineArgs,
    points: Vec<(String, String)>,
    (overwrite, quiet, tap): (bool, bool, Option<&ReportTap>),
    resolver: &Resolver,
) -> Result<()> {
    let loc = resolver.resolve(out, &crate::paths::cwd())?;
    report::write::check_free(&loc, overwrite).await?;
    let o = options(engine, points);
    let start = Instant::now();
    let r = report::compute(text, &loc, &o, resolver, tap).await?;
    report::write(&r, &loc).await?;
    if !quiet {
        eprintln!(
            "report of {} tensors ({} models against {}, {} trim densities), {} read in {:.1} s -> {}",
            r.tensors.len(),
            r.models.len(),
            r.base,
            r.densities.len(),
            size::human(r.bytes_read),
            start.elapsed().as_secs_f64(),
            loc.join("report.html").uri()
        );
        if !r.distance_points.is_empty() {
            eprintln!(
                "  with the distance from the base of {} sweep point(s)",
                r.distance_points.len()
            );
        }
    }
    if let Some(note) = &r.distance_note {
        eprintln!("note: {note}");
    }
    Ok(())
}

fn options(engine: &EngineArgs, points: Vec<(String, String)>) -> ReportOptions {
    ReportOptions {
        submit: engine.submit_options(),
        workers: engine.workers(),
        points,
    }
}

/// `run --report`, before the merge: the tap the merge is to feed, so that the report reads
/// no input the merge reads (planned now, so that a recipe the report refuses is refused
/// before the merge runs).
pub(super) async fn before_run(
    asked: bool,
    text: &str,
    engine: &EngineArgs,
    resolver: &Resolver,
) -> Result<Option<Arc<ReportTap>>> {
    if !asked {
        return Ok(None);
    }
    let o = options(engine, Vec::new());
    Ok(Some(Arc::new(report::tap_for(text, &o, resolver).await?)))
}

/// `run --report`: the report of the recipe just merged into `out`, into `OUT/report`, from
/// what the merge fed the tap `o.tap`; of a sweep, with the distance from the base of each
/// point the run wrote.
pub(super) async fn after_run(
    text: &str,
    out: &str,
    (engine, picks): (&EngineArgs, &PointArgs),
    o: &RunOptions,
    resolver: &Resolver,
) -> Result<()> {
    let Some(tap) = &o.tap else {
        return Ok(());
    };
    let sweep = crate::recipe::sweep::expand(text)?;
    let points = match super::sweep::points(&sweep, picks)? {
        Some((_, picked)) => point_folders(out, &picked, resolver)?,
        None => Vec::new(),
    };
    let at = format!("{}/report", out.trim_end_matches('/'));
    let how = (o.submit.overwrite, o.quiet, Some(&**tap));
    report(text, &at, engine, points, how, resolver).await
}
