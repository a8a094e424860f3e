//! `shardmerge report RECIPE OUT`, and the report of `run --report`.

use std::path::PathBuf;
use std::time::Instant;

use super::args::EngineArgs;
use crate::embedded::RunOptions;
use crate::error::Result;
use crate::report::{self, ReportOptions};
use crate::size;
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
        report(&text, out, e, self.overwrite, self.quiet, resolver).await
    }
}

/// Computes the report of `text` and writes it into the folder `out`.
pub(super) async fn report(
    text: &str,
    out: &str,
    engine: &EngineArgs,
    overwrite: bool,
    quiet: bool,
    resolver: &Resolver,
) -> Result<()> {
    let loc = resolver.resolve(out, &crate::paths::cwd())?;
    report::write::check_free(&loc, overwrite).await?;
    let o = ReportOptions {
        submit: engine.submit_options(),
        workers: engine.workers(),
    };
    let start = Instant::now();
    let r = report::compute(text, &loc, &o, resolver).await?;
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
    }
    Ok(())
}

/// `run --report`: the report of the recipe just merged into `out`, into `OUT/report`.
pub(super) async fn after_run(
    asked: bool,
    text: &str,
    out: &str,
    engine: &EngineArgs,
    o: &RunOptions,
    resolver: &Resolver,
) -> Result<()> {
    if !asked {
        return Ok(());
    }
    let at = format!("{}/report", out.trim_end_matches('/'));
    report(text, &at, engine, o.submit.overwrite, o.quiet, resolver).await
}
