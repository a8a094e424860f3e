//! The merge commands: `run` (embedded), `plan` and `submit`, of one recipe or of each picked
//! point of a sweep.

use std::path::PathBuf;

use crate::recipe::stages;

use clap::builder::NonEmptyStringValueParser;

use super::args::{ClientSecurityArgs, EngineArgs, SubmitJobArgs};
use super::summary::{run_one, summary_lines};
use super::{read_recipe, stages as cli_stages, sweep};
use crate::embedded::{self, GridPoint, RunOptions};
use crate::error::{Error, Result};
use crate::job::SubmitOptions;
use crate::planinfo;
use crate::progress::stdout;
use crate::recipe::sweep::{expand, Point, Sweep};
use crate::remote::{self, SubmitArgs};
use shardmerge_proto as pb;
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
        tap: None,
    })
}

/// The flags that make one recipe several merges: sweep points, stages.
pub(super) struct Ways<'a> {
    pub(super) points: &'a sweep::PointArgs,
    pub(super) stages: &'a cli_stages::StageArgs,
    /// `--scratch`: where a multi-stage run's intermediates go.
    pub(super) scratch: Option<&'a PathBuf>,
}

impl<'a> Ways<'a> {
    pub(super) fn new(
        points: &'a sweep::PointArgs,
        stages: &'a cli_stages::StageArgs,
        engine: &'a EngineArgs,
    ) -> Self {
        Ways {
            points,
            stages,
            scratch: engine.scratch.scratch.as_ref(),
        }
    }
}

/// The recipe's stages when it is a multi-stage file (which sweeps nothing: `--points` is
/// refused); `--keep-intermediates` is refused for any other recipe.
fn stages_of(text: &str, w: &Ways<'_>) -> Result<Option<stages::Stages>> {
    let st = stages::split(text)?;
    if st.is_some() && !w.points.points.is_empty() {
        return Err(Error::usage(
            "--points",
            "picks points of a sweep, and a multi-stage recipe is no sweep",
        ));
    }
    if st.is_none() && w.stages.keep_intermediates.is_some() {
        return Err(Error::usage(
            "--keep-intermediates",
            "keeps the intermediate stages of a multi-stage recipe (several `---`-separated recipes with `name:`), and this recipe has one stage",
        ));
    }
    Ok(st)
}

/// `--report` of a multi-stage recipe: refused before anything runs (the report reads one
/// recipe's inputs; a stage's inputs may not exist before it runs).
pub(super) fn refuse_report(report: bool, text: &str) -> Result<()> {
    if report && stages::split(text)?.is_some() {
        return Err(Error::usage(
            "--report",
            "is not available for a multi-stage recipe yet: run `shardmerge report` on a stage's recipe",
        ));
    }
    Ok(())
}

/// `shardmerge run`: the embedded merge of a recipe, of each stage of a multi-stage recipe,
/// or of each picked point of a sweep.
pub(super) async fn run(
    text: &str,
    out: &str,
    o: &RunOptions,
    w: &Ways<'_>,
    resolver: Resolver,
) -> Result<()> {
    if let Some(st) = stages_of(text, w)? {
        return cli_stages::run(&st, out, o, w.stages, w.scratch, &resolver).await;
    }
    let sweep = expand(text)?;
    match sweep::points(&sweep, w.points)? {
        None => run_one(text, out, o, resolver).await,
        Some((s, picked)) => run_sweep(s, &picked, out, o, &resolver).await,
    }
}

/// `shardmerge run` of a sweep: the picked points together, each into `OUT/NAME`, reading
/// the inputs once for all of them (`embedded::run_grid`), then `OUT/index.json` listing the
/// points that were written.
async fn run_sweep(
    s: &Sweep,
    picked: &[&Point],
    out: &str,
    o: &RunOptions,
    resolver: &Resolver,
) -> Result<()> {
    let prior = sweep::prior_points(out, o.submit.overwrite, resolver).await?;
    let outs: Vec<String> = picked.iter().map(|p| sweep::point_out(out, p)).collect();
    let grid: Vec<GridPoint<'_>> = picked
        .iter()
        .zip(&outs)
        .map(|(p, out)| GridPoint {
            recipe: &p.recipe,
            out,
        })
        .collect();
    if !o.quiet {
        eprintln!("{} point(s), reading the inputs once for all", picked.len());
    }
    let outcomes = embedded::run_grid(&grid, o, resolver.clone()).await?;
    let mut done = Vec::new();
    let mut failed = None;
    for (p, r) in picked.iter().zip(outcomes) {
        match r {
            Ok(summary) => {
                if !o.quiet {
                    eprintln!("point {}:", p.name);
                    summary_lines(&summary);
                }
                done.push(*p);
            }
            Err(e) => {
                eprintln!("point {} failed: {e}", p.name);
                failed.get_or_insert(e);
            }
        }
    }
    sweep::write_index(out, s, &prior, &done, resolver).await?;
    match failed {
        None => Ok(()),
        Some(e) => {
            eprintln!("(the points that succeeded are written and listed in index.json)");
            Err(e)
        }
    }
}

/// `shardmerge plan`: what a recipe would do, without merging.
pub(super) async fn plan(
    text: &str,
    engine: &EngineArgs,
    json: bool,
    w: &Ways<'_>,
    resolver: &Resolver,
) -> Result<()> {
    if let Some(st) = stages_of(text, w)? {
        return cli_stages::plan(&st, engine, json, w.stages, resolver).await;
    }
    let sweep = expand(text)?;
    let Some((s, picked)) = sweep::points(&sweep, w.points)? else {
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
    let (mut read, mut written, mut once, mut share) = (0, 0, 0, 0);
    for p in &picked {
        let info = match describe(&p.recipe, engine, resolver).await {
            Ok(info) => info,
            Err(e) => {
                eprintln!("point {}:", p.name);
                return Err(e);
            }
        };
        read += info.bytes_read();
        once = once.max(info.bytes_read());
        written += info.plan.bytes_out();
        let grid = SubmitOptions {
            points: u32::try_from(picked.len()).unwrap_or(u32::MAX),
            ..engine.submit_options()
        };
        share = grid.slot_memory_for(&info.plan)?;
        text_out += &sweep::point_line(p, info.bytes_read(), info.plan.bytes_out());
        plans.push(serde_json::json!({"name": p.name, "plan": info.to_json()}));
    }
    text_out += &sweep::total_line(picked.len(), read, once, written, share);
    if json {
        let j = serde_json::json!({
            "sweep": s.index_json(&picked),
            "plans": plans,
            "bytes_read": read,
            "bytes_read_once": once,
            "point_slot_memory": share,
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
pub(super) async fn describe(
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
async fn submit(a: SubmitArgs, w: &Ways<'_>, resolver: &Resolver) -> Result<()> {
    if let Some(st) = stages_of(&a.recipe_yaml, w)? {
        return cli_stages::submit(&st, a, w.stages, resolver).await;
    }
    let sweep = expand(&a.recipe_yaml)?;
    let Some((s, picked)) = sweep::points(&sweep, w.points)? else {
        return remote::submit(a).await;
    };
    let out = a.output.clone();
    // a file of the user's in the index's place stops the sweep before any job; a client
    // without access to the output's store submits anyway (the workers write the points)
    let prior = match sweep::prior_points(&out, a.options.overwrite, resolver).await {
        Err(e @ Error::AlreadyExists { .. }) => return Err(e),
        r => r,
    };
    // one request: the points are submitted together, linked to read the inputs once
    for p in &picked {
        eprintln!("point {}", p.name);
    }
    let (first, rest) = picked
        .split_first()
        .ok_or_else(|| Error::usage("--points", "picks no point of the sweep"))?;
    let more = rest
        .iter()
        .map(|p| pb::GridPoint {
            recipe_yaml: p.recipe.clone(),
            output_uri: sweep::point_out(&out, p),
        })
        .collect();
    remote::submit_grid(
        SubmitArgs {
            recipe_yaml: first.recipe.clone(),
            output: sweep::point_out(&out, first),
            ..a.clone()
        },
        more,
    )
    .await?;
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
    stages: cli_stages::StageArgs,
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
        let ways = Ways {
            points: &self.points,
            stages: &self.stages,
            scratch: None,
        };
        submit(a, &ways, resolver).await
    }
}
