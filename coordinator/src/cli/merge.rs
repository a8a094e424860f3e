//! The merge commands: `run` (embedded), `plan` and `submit`, of one recipe or of each picked
//! point of a sweep.

use std::path::PathBuf;

use clap::builder::NonEmptyStringValueParser;

use super::args::{ClientSecurityArgs, EngineArgs, SubmitJobArgs};
use super::{read_recipe, sweep};
use crate::embedded::{self, RunOptions};
use crate::error::{Error, Result};
use crate::job::SubmitOptions;
use crate::progress::stdout;
use crate::recipe::sweep::{expand, Point, Sweep};
use crate::remote::{self, SubmitArgs};
use crate::{planinfo, size};
use shardmerge_worker::storage::Resolver;

/// The embedded run's options from the command line.
pub(super) fn run_options(engine: &EngineArgs, overwrite: bool, quiet: bool) -> Result<RunOptions> {
    Ok(RunOptions {
        workers: engine.workers(),
        submit: SubmitOptions {
            overwrite,
            ..engine.submit_options()
        },
        quiet,
        cache: engine.scratch.cache()?,
    })
}

/// `shardmerge run`: the embedded merge of a recipe, or of each picked point of a sweep.
pub(super) async fn run(
    text: &str,
    out: &str,
    o: &RunOptions,
    points: &sweep::PointArgs,
    resolver: Resolver,
) -> Result<()> {
    let sweep = expand(text)?;
    match sweep::points(&sweep, points)? {
        None => run_one(text, out, o, resolver).await,
        Some((s, picked)) => run_sweep(s, &picked, out, o, &resolver).await,
    }
}

/// The embedded merge of one recipe, with its summary lines.
async fn run_one(text: &str, out: &str, o: &RunOptions, resolver: Resolver) -> Result<()> {
    let s = embedded::run(text, out, o, resolver).await?;
    if !o.quiet {
        let peak = size::peak_rss().map_or(String::new(), |b| {
            format!(", peak memory {}", size::human(b))
        });
        eprintln!(
            "merged {} tensors into {} file(s), {}{peak} -> {}",
            s.plan.tensors.len(),
            s.plan.files.len(),
            size::bytes_in(s.plan.bytes_out(), s.status.elapsed_seconds),
            s.status.output_uri
        );
        eprintln!(
            "{}",
            crate::progress::reads_line(&s.status, Some(s.plan.bytes_in()))
        );
    }
    Ok(())
}

/// `shardmerge run` of a sweep: each picked point into `OUT/NAME`, one after another, and
/// `OUT/index.json` rewritten after each.
async fn run_sweep(
    s: &Sweep,
    picked: &[&Point],
    out: &str,
    o: &RunOptions,
    resolver: &Resolver,
) -> Result<()> {
    let prior = sweep::prior_points(out, o.submit.overwrite, resolver).await?;
    let mut done = Vec::new();
    for (k, p) in picked.iter().enumerate() {
        if !o.quiet {
            eprintln!("point {}/{}: {}", k + 1, picked.len(), p.name);
        }
        if let Err(e) = run_one(&p.recipe, &sweep::point_out(out, p), o, resolver.clone()).await {
            eprintln!(
                "point {} failed (the points before it are done and listed):",
                p.name
            );
            return Err(e);
        }
        done.push(*p);
        sweep::write_index(out, s, &prior, &done, resolver).await?;
    }
    Ok(())
}

/// `shardmerge plan`: what a recipe would do, without merging.
pub(super) async fn plan(
    text: &str,
    engine: &EngineArgs,
    json: bool,
    points: &sweep::PointArgs,
    resolver: &Resolver,
) -> Result<()> {
    let sweep = expand(text)?;
    let Some((s, picked)) = sweep::points(&sweep, points)? else {
        let info = describe(text, engine, resolver).await?;
        stdout(&if json {
            format!(
                "{}\n",
                serde_json::to_string_pretty(&info.to_json()).unwrap_or_default()
            )
        } else {
            info.to_text()
        });
        return Ok(());
    };
    let (mut text_out, mut plans) = (sweep::header(s, picked.len()), Vec::new());
    let (mut read, mut written) = (0, 0);
    for p in &picked {
        let info = match describe(&p.recipe, engine, resolver).await {
            Ok(info) => info,
            Err(e) => {
                eprintln!("point {}:", p.name);
                return Err(e);
            }
        };
        read += info.bytes_read();
        written += info.plan.bytes_out();
        text_out += &sweep::point_line(p, info.bytes_read(), info.plan.bytes_out());
        plans.push(serde_json::json!({"name": p.name, "plan": info.to_json()}));
    }
    text_out += &sweep::total_line(picked.len(), read, written);
    if json {
        let j = serde_json::json!({
            "sweep": s.index_json(&picked),
            "plans": plans,
            "bytes_read": read,
            "bytes_written": written,
        });
        stdout(&format!(
            "{}\n",
            serde_json::to_string_pretty(&j).unwrap_or_default()
        ));
    } else {
        stdout(&text_out);
    }
    Ok(())
}

/// The plan of one recipe, with the reads of the row cache the flags give.
async fn describe(
    text: &str,
    engine: &EngineArgs,
    resolver: &Resolver,
) -> Result<planinfo::PlanInfo> {
    let mut info =
        planinfo::describe(text, &engine.submit_options(), engine.workers(), resolver).await?;
    if engine.scratch.scratch_limit == 0 {
        // no row cache: every statistics pass reads its rows from storage again
        info.reads = crate::reads::planned_reads(&info.plan, &info.cut, true);
    }
    Ok(info)
}

/// `shardmerge submit`: one job, or one job per picked point of a sweep (into `OUT/NAME`),
/// and the sweep's `OUT/index.json` when this client can reach OUT's store.
async fn submit(a: SubmitArgs, points: &sweep::PointArgs, resolver: &Resolver) -> Result<()> {
    let sweep = expand(&a.recipe_yaml)?;
    let Some((s, picked)) = sweep::points(&sweep, points)? else {
        return remote::submit(a).await;
    };
    let out = a.output.clone();
    // a file of the user's in the index's place stops the sweep before any job; a client
    // without access to the output's store submits anyway (the workers write the points)
    let prior = match sweep::prior_points(&out, a.options.overwrite, resolver).await {
        Err(e @ Error::AlreadyExists { .. }) => return Err(e),
        r => r,
    };
    for p in &picked {
        eprintln!("point {}", p.name);
        remote::submit(SubmitArgs {
            recipe_yaml: p.recipe.clone(),
            output: sweep::point_out(&out, p),
            ..a.clone()
        })
        .await?;
    }
    let written = match prior {
        Ok(prior) => sweep::write_index(&out, s, &prior, &picked, resolver).await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        eprintln!(
            "warning: the points were submitted, but {out}/index.json could not be written from here: {e}"
        );
    }
    Ok(())
}

/// `shardmerge submit`'s arguments.
#[derive(clap::Args)]
pub(super) struct SubmitCmd {
    recipe: PathBuf,
    /// Output checkpoint: s3://bucket/prefix (or a path every worker shares)
    out: String,
    /// The coordinator's URL (http://HOST:PORT)
    #[arg(long, env = "SHARDMERGE_COORDINATOR", value_parser = NonEmptyStringValueParser::new())]
    coordinator: String,
    /// Follow the job; exit 0 only when it succeeded
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    job: SubmitJobArgs,
    /// No progress output
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    points: sweep::PointArgs,
    #[command(flatten)]
    security: ClientSecurityArgs,
}

impl SubmitCmd {
    pub(super) async fn run(self, resolver: &Resolver) -> Result<()> {
        let a = SubmitArgs {
            client: self.security.options()?,
            coordinator: self.coordinator,
            recipe_yaml: read_recipe(&self.recipe)?,
            output: self.out,
            options: self.job.options(),
            wait: self.wait,
            quiet: self.quiet,
        };
        submit(a, &self.points, resolver).await
    }
}
