//! `run`, `plan` and `submit` of a multi-stage recipe (`recipe::stages`, mergekit-multi's file
//! format). The stages run one after another, each an ordinary job whose recipe names the
//! checkpoints of the stages it uses:
//!
//! - with an unnamed (final) stage, it is written to OUT; the named stages it needs are
//!   intermediates, written into a scratch folder removed at the end (`--keep-intermediates
//!   DIR`: into `DIR/NAME`, kept, and reused by a later run only when their content key
//!   matches, see `key`); a named stage the final one does not need runs only with
//!   `--keep-intermediates` (mergekit-multi runs every named stage);
//! - without one (every stage named, as mergekit-multi allows), every stage is an output,
//!   written into `OUT/NAME`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::embedded::RunOptions;
use crate::error::{Error, Result};
use crate::job::SubmitOptions;
use crate::plan::{self, ModelInfo};
use crate::planinfo::{self, PlanInfo};
use crate::recipe::stages::{Stage, Stages};
use crate::recipe::Recipe;
use shardmerge_worker::storage::Resolver;

mod key;
mod scratch;
mod show;
mod stream;

use scratch::Scratch;

/// `--keep-intermediates`.
#[derive(clap::Args, Clone, Debug, Default)]
pub(super) struct StageArgs {
    /// Of a multi-stage recipe: write the intermediate stages into DIR/NAME and keep them; a
    /// later run reuses one only when its content key (its recipe, its inputs' headers and
    /// checksums, the options that shape its bytes) is unchanged
    #[arg(long, value_name = "DIR")]
    pub(super) keep_intermediates: Option<String>,
}

/// What becomes of a stage's checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// The final (unnamed) stage: OUT.
    Final,
    /// Every stage is named: OUT/NAME.
    Output,
    /// An intermediate kept in `--keep-intermediates DIR`.
    Kept,
    /// An intermediate in the scratch folder, removed at the end.
    Scratch,
    /// An intermediate streamed into the final job: computed in its tasks, never written.
    Streamed,
}

/// One stage to run: where it writes and its recipe with the stages it names located.
struct StageJob<'a> {
    stage: &'a Stage,
    out: String,
    role: Role,
    text: String,
    /// Why an intermediate is written rather than streamed.
    why: Option<String>,
}

/// The stages a run leaves out, each with why.
type Skipped<'a> = Vec<(&'a Stage, &'static str)>;

fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// A location as a recipe will name it: local paths made absolute (recipes resolve relative
/// paths against the working directory).
fn absolute(loc: &str, base: &Path) -> String {
    if loc.contains("://") || Path::new(loc).is_absolute() {
        loc.to_string()
    } else {
        base.join(loc).display().to_string()
    }
}

/// The stages to run, in order, with their outputs; the stages left out, with why.
fn schedule<'a>(
    st: &'a Stages,
    out: &str,
    keep: Option<&str>,
    scratch: &str,
    base: &Path,
) -> Result<(Vec<StageJob<'a>>, Skipped<'a>)> {
    let fin = st.final_stage();
    if fin.is_none() && keep.is_some() {
        return Err(Error::usage(
            "--keep-intermediates",
            "every stage of this recipe has a name, so each one is an output, written into OUT/NAME: there is no intermediate to keep",
        ));
    }
    let needed: Vec<usize> = fin.map_or_else(Vec::new, |f| {
        st.needed_for(f).iter().map(|s| s.index).collect()
    });
    let (mut jobs, mut skipped): (Vec<StageJob>, Vec<_>) = (Vec::new(), Vec::new());
    for s in &st.stages {
        let name = s.name.as_deref().unwrap_or_default();
        let (out, role) = match (fin, keep) {
            (None, _) => (join(out, name), Role::Output),
            (Some(_), _) if s.name.is_none() => (out.to_string(), Role::Final),
            (Some(_), Some(k)) => (join(&absolute(k, base), name), Role::Kept),
            (Some(_), None) if needed.contains(&s.index) => (join(scratch, name), Role::Scratch),
            (Some(_), None) => {
                skipped.push((
                    s,
                    "the final stage does not use it; --keep-intermediates DIR runs and keeps it",
                ));
                continue;
            }
        };
        jobs.push(StageJob {
            stage: s,
            out,
            role,
            text: String::new(),
            why: None,
        });
    }
    let locs: Vec<(String, String)> = jobs
        .iter()
        .filter_map(|j| Some((j.stage.name.clone()?, absolute(&j.out, base))))
        .collect();
    for j in &mut jobs {
        j.text = j.stage.text(&|n| {
            locs.iter()
                .find(|(name, _)| name == n)
                .map_or_else(|| n.to_string(), |(_, l)| l.clone())
        });
        Recipe::parse(&j.text).map_err(|e| in_stage(j.stage, e))?;
    }
    Ok((jobs, skipped))
}

/// `e` with the stage it happened in.
pub(super) fn in_stage(s: &Stage, e: Error) -> Error {
    let label = s.label();
    match e {
        Error::Recipe { key, reason } if key.is_empty() => Error::Recipe { key: label, reason },
        Error::Recipe { key, reason } => Error::Recipe {
            key: format!("{label}: {key}"),
            reason,
        },
        Error::Input { at, reason } => Error::Input {
            at: format!("{label}: {at}").trim_end_matches(": ").to_string(),
            reason,
        },
        Error::Job { job, reason } => Error::Job {
            job,
            reason: format!("{label}: {reason}"),
        },
        e => {
            eprintln!("{label} failed:");
            e
        }
    }
}

/// Plans every stage from headers before any runs (so an error in a later stage stops the
/// run before the first stage writes anything), each later stage from the plans of the stages
/// it uses. `None` for a stage whose vocabulary settings (`tokenizer_source`, `tokenizer:`)
/// read the tokenizer of a stage not yet written, and for the stages that use it: they are
/// planned when they run.
async fn plan_ahead(
    jobs: &[StageJob<'_>],
    o: &SubmitOptions,
    workers: usize,
    resolver: &Resolver,
) -> Result<Vec<Option<PlanInfo>>> {
    let mut given: HashMap<String, ModelInfo> = HashMap::new();
    let mut out = Vec::new();
    for j in jobs {
        let recipe = Recipe::parse(&j.text).map_err(|e| in_stage(j.stage, e))?;
        let locs: Vec<String> = jobs
            .iter()
            .filter(|d| {
                d.stage
                    .name
                    .as_ref()
                    .is_some_and(|n| j.stage.deps.contains(n))
            })
            .map(|d| absolute(&d.out, &o.base_dir))
            .collect();
        let known = locs.iter().all(|l| given.contains_key(l));
        if !known || (recipe.vocab_source().is_some() && !locs.is_empty()) {
            out.push(None);
            continue;
        }
        let g = Arc::new(given.clone());
        let info = planinfo::describe_given(&j.text, o, workers, resolver, &g)
            .await
            .map_err(|e| in_stage(j.stage, e))?;
        let at = absolute(&j.out, &o.base_dir);
        let loc = resolver.resolve(&at, &o.base_dir)?;
        given.insert(at.clone(), plan::planned_model(&at, loc, &info.plan));
        out.push(Some(info));
    }
    Ok(out)
}

/// The folder for intermediates: under `--scratch` or the system's temporary folder.
fn scratch_parent(scratch: Option<&PathBuf>) -> PathBuf {
    scratch.cloned().unwrap_or_else(std::env::temp_dir)
}

/// Whether stage `k` of `jobs` runs, said on stderr unless `quiet`: `None` when it is kept and
/// its kept copy's content key is unchanged (reused); otherwise the content key to record after
/// it runs (a kept stage) and whether a stale kept copy is replaced.
async fn before_stage(
    jobs: &[StageJob<'_>],
    k: usize,
    o: &SubmitOptions,
    quiet: bool,
    resolver: &Resolver,
) -> Result<Option<(Option<String>, bool)>> {
    let j = &jobs[k];
    let say = |what: &str| {
        if !quiet {
            let (n, label) = (jobs.len(), j.stage.label());
            eprintln!("stage {}/{n}: {label} -> {}{what}", k + 1, j.out);
        }
    };
    if j.role == Role::Streamed {
        if !quiet {
            let (n, label) = (jobs.len(), j.stage.label());
            eprintln!(
                "stage {}/{n}: {label}: streamed into the final stage's job (not written)",
                k + 1
            );
        }
        return Ok(None);
    }
    if j.role != Role::Kept {
        say("");
        return Ok(Some((None, false)));
    }
    let key = key::content_key(j.stage, &j.text, o, resolver).await?;
    let replace = match key::check(&j.out, &key, resolver).await? {
        key::Found::Same => {
            say(" (kept, content key unchanged: reused)");
            return Ok(None);
        }
        key::Found::Stale => true,
        key::Found::Nothing => false,
    };
    say("");
    Ok(Some((Some(key), replace)))
}

/// `shardmerge run` of a multi-stage recipe.
pub(super) async fn run(
    st: &Stages,
    out: &str,
    o: &RunOptions,
    a: &StageArgs,
    scratch_dir: Option<&PathBuf>,
    resolver: &Resolver,
) -> Result<()> {
    let scratch = Scratch::new(&scratch_parent(scratch_dir));
    let base = &o.submit.base_dir;
    let keep = a.keep_intermediates.as_deref();
    let dir = scratch.path().display().to_string();
    let (mut jobs, skipped) = schedule(st, out, keep, &dir, base)?;
    for (s, why) in &skipped {
        if !o.quiet {
            eprintln!("{}: not run ({why})", s.label());
        }
    }
    let infos = plan_ahead(&jobs, &o.submit, o.workers, resolver).await?;
    stream::choose(&mut jobs, &infos, &o.submit, o.workers, resolver).await?;
    if jobs.iter().any(|j| j.role == Role::Scratch) {
        scratch.create()?;
    }
    for (k, j) in jobs.iter().enumerate() {
        let Some((key, replace)) = before_stage(&jobs, k, &o.submit, o.quiet, resolver).await?
        else {
            continue;
        };
        let mut opts = o.clone();
        opts.submit.overwrite |= replace;
        super::summary::run_one(&j.text, &j.out, &opts, resolver.clone())
            .await
            .map_err(|e| in_stage(j.stage, e))?;
        if let Some(key) = key {
            key::write(&j.out, j.stage, &key, resolver).await?;
        }
    }
    Ok(())
}

/// `shardmerge plan` of a multi-stage recipe: the stages in order, each with where it would
/// write and its whole plan (a later stage planned from the plans of the stages it uses).
pub(super) async fn plan(
    st: &Stages,
    engine: &super::args::EngineArgs,
    json: bool,
    a: &StageArgs,
    resolver: &Resolver,
) -> Result<()> {
    let o = engine.submit_options();
    let scratch = Scratch::new(&scratch_parent(engine.scratch.scratch.as_ref()));
    let keep = a.keep_intermediates.as_deref();
    let dir = scratch.path().display().to_string();
    let (mut jobs, skipped) = schedule(st, "OUT", keep, &dir, &o.base_dir)?;
    let mut infos = plan_ahead(&jobs, &o, engine.workers(), resolver).await?;
    stream::choose(&mut jobs, &infos, &o, engine.workers(), resolver).await?;
    if jobs.iter().any(|j| j.role == Role::Streamed) {
        // the final stage's plan is the one job's, the streamed stages in it
        if let Some(k) = jobs.iter().position(|j| j.role == Role::Final) {
            let info = planinfo::describe(&jobs[k].text, &o, engine.workers(), resolver).await?;
            infos[k] = Some(info);
        }
    }
    if engine.scratch.scratch_limit == 0 {
        // no row cache: every statistics pass reads its rows from storage again
        for i in infos.iter_mut().flatten() {
            i.reads = crate::reads::planned_reads(&i.plan, &i.cut, true);
        }
    }
    let rows: Vec<show::Row> = jobs
        .iter()
        .zip(&infos)
        .map(|(j, info)| show::Row {
            stage: j.stage,
            role: j.role,
            why: j.why.as_deref(),
            out: &j.out,
            info: info.as_ref(),
        })
        .collect();
    crate::progress::stdout(&if json {
        show::json(&rows, &skipped)
    } else {
        show::text(&rows, &skipped)
    });
    Ok(())
}

/// `shardmerge submit` of a multi-stage recipe: one job per stage, each submitted when the
/// stages it uses have succeeded (this client follows them). Intermediates go into
/// `--keep-intermediates DIR`, or into a scratch folder next to OUT (`OUT.shardmerge-stages-N`,
/// which every worker can reach as it reaches OUT) that this client removes at the end, so it
/// follows the final job too.
pub(super) async fn submit(
    st: &Stages,
    a: crate::remote::SubmitArgs,
    s: &StageArgs,
    resolver: &Resolver,
) -> Result<()> {
    let base = PathBuf::from(&a.options.base_dir);
    let nonce = Scratch::new(Path::new("")).path().display().to_string();
    let dir = format!("{}.{nonce}", a.output.trim_end_matches('/'));
    let keep = s.keep_intermediates.as_deref();
    let (mut jobs, skipped) = schedule(st, &a.output, keep, &dir, &base)?;
    for (s, why) in &skipped {
        eprintln!("{}: not run ({why})", s.label());
    }
    // the intermediates that stream into the final job, planned from headers here
    let o = crate::job::SubmitOptions::from_proto(&a.options);
    match plan_ahead(&jobs, &o, 1, resolver).await {
        Ok(infos) => stream::choose(&mut jobs, &infos, &o, 1, resolver).await?,
        Err(e) => eprintln!(
            "note: the stages could not be planned here ({e}): every intermediate is written"
        ),
    }
    let scratch: Vec<String> = jobs
        .iter()
        .filter(|j| j.role == Role::Scratch)
        .map(|j| j.out.clone())
        .collect();
    if !scratch.is_empty() {
        // this client removes them: it must reach their store before anything runs
        let loc = resolver.resolve(&dir, &base)?;
        loc.store.exists(&loc.path).await?;
    }
    let result = submit_jobs(&jobs, &a, resolver).await;
    for out in &scratch {
        if let Err(e) = remove_folder(out, &base, resolver).await {
            eprintln!("warning: could not remove the intermediate {out}: {e}");
        }
    }
    result
}

async fn submit_jobs(
    jobs: &[StageJob<'_>],
    a: &crate::remote::SubmitArgs,
    resolver: &Resolver,
) -> Result<()> {
    let last = jobs.len().saturating_sub(1);
    let wait_all = jobs.iter().any(|j| j.role == Role::Scratch);
    let o = submit_options(&a.options);
    for (k, j) in jobs.iter().enumerate() {
        let Some((key, replace)) = before_stage(jobs, k, &o, false, resolver).await? else {
            continue;
        };
        let mut opts = a.options.clone();
        opts.overwrite |= replace;
        crate::remote::submit(crate::remote::SubmitArgs {
            recipe_yaml: j.text.clone(),
            output: j.out.clone(),
            options: opts,
            wait: a.wait || k < last || wait_all,
            ..a.clone()
        })
        .await
        .map_err(|e| in_stage(j.stage, e))?;
        if let Some(key) = key {
            key::write(&j.out, j.stage, &key, resolver).await?;
        }
    }
    Ok(())
}

/// The options of a submitted job, as the content key reads them.
fn submit_options(o: &shardmerge_proto::JobOptions) -> crate::job::SubmitOptions {
    crate::job::SubmitOptions {
        seed: o.seed,
        rng: o.rng(),
        base_dir: PathBuf::from(&o.base_dir),
        unsafe_truncate_embeddings: o.unsafe_truncate_embeddings,
        compute_float32: o.compute_float32,
        ..Default::default()
    }
}

/// Removes every file of the checkpoint folder `out`.
async fn remove_folder(out: &str, base: &Path, resolver: &Resolver) -> Result<()> {
    let loc = resolver.resolve(out, base)?;
    for f in loc.store.list(&loc.path).await? {
        let fl = loc.join(&f);
        fl.store.delete(&fl.path).await?;
    }
    if loc.store.is_local() {
        let _ = std::fs::remove_dir(&loc.path);
    }
    Ok(())
}
