//! Which storage a submitted job may read and write: the coordinator's `--allow` prefixes.
//!
//! A job's every input (each model the recipe names, `base_model`, a `tokenizer_source` model)
//! and its output must lie under one of the prefixes, or the job is refused before any storage
//! is touched. References are resolved as the storage resolver resolves them (relative paths
//! against the submitter's folder, `file://`, `s3://bucket/key`) and compared lexically, by
//! whole path segments, after `.` and `..` are taken out; S3 keys with `.` or `..` segments are
//! refused outright. Local paths are then also compared after following symlinks: the allowed
//! folders are canonicalised when the coordinator starts, a reference's longest existing
//! ancestor when the job is submitted, and the symlinks directly inside an input or output
//! folder (where the files the job reads and writes live) must point inside the prefixes too.
//!
//! Refusals name the reference as the submitter wrote it and the allowed prefixes, never
//! anything about what exists outside them: a path outside is refused without looking at it.
//!
//! A model that is neither an existing local path nor a URI is a Hugging Face repository id
//! (`org/name[@rev]`, read as `hf://org/name@rev`, see `shardmerge_worker::storage::hub`):
//! it is allowed only by `--allow hf://org/` (every repository of `org`) or
//! `--allow hf://org/name` (that repository, any revision), and refused by default like any
//! other reference.
//!
//! The benchmark-only `null://BUCKET/PATH` store (it discards what it is given) is allowed by
//! `--allow-any` alone, with or without a journal; no `--allow` prefix names it.
//!
//! The journal (`--state`) is the operator's choice and is not policed; neither is the
//! embedded `shardmerge run`, which works on any path its user can reach.

use std::path::{Component, Path, PathBuf};

use shardmerge_worker::storage::{hub, null};

use crate::error::Error;
use crate::recipe::Recipe;

/// One allowed prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prefix {
    /// A local folder: as given (absolute, normalised) and with its symlinks resolved.
    Local { given: PathBuf, canonical: PathBuf },
    /// `s3://bucket/key...`; an empty key allows the whole bucket.
    S3 { bucket: String, key: Vec<String> },
    /// `hf://org/` (every repository of `org`) or `hf://org/name` (that repository, any
    /// revision).
    Hub { org: String, name: Option<String> },
}

/// Which prefixes jobs may use.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Allow {
    /// `--allow-any`: every path and bucket its credentials reach (single-user setups).
    Any,
    /// `--allow PREFIX...`; none given: every job is refused.
    Prefixes(Vec<Prefix>),
}

/// What the coordinator may touch for submitted jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    allow: Allow,
    /// Never a job's, allowed or not: the coordinator's journal.
    protected: Vec<Prefix>,
}

/// Why a job was refused.
#[derive(Debug)]
pub enum Refusal {
    /// The recipe does not parse (the same error the planner gives).
    Recipe(Error),
    /// A reference lies outside the allowed prefixes.
    Outside(String),
}

/// A reference resolved lexically, as the storage resolver would.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Local(PathBuf),
    S3 {
        bucket: String,
        key: Vec<String>,
    },
    Hub {
        org: String,
        name: String,
    },
    /// The benchmark-only discarding store (`null://`).
    Null,
}

/// Removes `.` and `..` without touching the filesystem (`..` at the root stays at the root,
/// as the storage resolver does).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn absolute(p: &Path, base_dir: &Path) -> PathBuf {
    let mut abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    };
    if !abs.is_absolute() {
        if let Ok(cwd) = std::env::current_dir() {
            abs = cwd.join(abs);
        }
    }
    normalize(&abs)
}

fn s3_key(uri: &str, rest: &str) -> Result<(String, Vec<String>), String> {
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("`{uri}`: no bucket in the S3 URI"));
    }
    let key: Vec<String> = key
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if key.iter().any(|s| s == "." || s == "..") {
        return Err(format!(
            "`{uri}`: `.` and `..` segments are not allowed in S3 keys on this coordinator"
        ));
    }
    Ok((bucket.to_string(), key))
}

/// Resolves `uri` lexically: `s3://bucket/key`, `file://PATH`, or a path (relative to
/// `base_dir`). Unknown schemes are refused (the policy fails closed).
fn target(uri: &str, base_dir: &Path) -> Result<Target, String> {
    if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, key) = s3_key(uri, rest)?;
        return Ok(Target::S3 { bucket, key });
    }
    if let Some(rest) = uri.strip_prefix(hub::PREFIX) {
        let (id, _) = hub::RepoId::parse_uri(rest)
            .ok_or_else(|| format!("`{uri}`: not a Hugging Face repository (hf://ORG/NAME)"))?;
        return Ok(Target::Hub {
            org: id.org,
            name: id.name,
        });
    }
    if uri.starts_with(null::PREFIX) {
        return Ok(Target::Null);
    }
    if uri.contains("://") && !uri.starts_with("file://") {
        return Err(format!(
            "`{uri}`: unsupported URI scheme (use a local path, file://, s3:// or hf://)"
        ));
    }
    let p = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
    Ok(Target::Local(absolute(p, base_dir)))
}

impl Policy {
    /// The policy of `--allow PREFIX...` / `--allow-any`. Local prefixes are resolved against
    /// the working directory and must be existing folders (their symlinks are resolved now).
    pub fn new(allow: &[String], allow_any: bool) -> Result<Policy, Error> {
        if allow_any {
            if !allow.is_empty() {
                return Err(Error::usage(
                    "",
                    "--allow-any and --allow exclude each other: give one",
                ));
            }
            return Ok(Policy::any());
        }
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let mut out = Vec::new();
        for a in allow {
            if let Some(org) = a
                .strip_prefix(hub::PREFIX)
                .and_then(|r| r.strip_suffix('/'))
                .filter(|o| !o.contains('/'))
            {
                // `hf://org/`: every repository of the organisation
                if hub::RepoId::parse(&format!("{org}/x")).is_none() {
                    return Err(Error::usage(
                        format!("--allow {a}"),
                        "not a Hugging Face organisation (hf://ORG/ or hf://ORG/NAME)",
                    ));
                }
                out.push(Prefix::Hub {
                    org: org.to_string(),
                    name: None,
                });
                continue;
            }
            let p = match target(a, &cwd).map_err(|e| Error::usage("--allow", e))? {
                Target::S3 { bucket, key } => Prefix::S3 { bucket, key },
                Target::Hub { org, name } => Prefix::Hub {
                    org,
                    name: Some(name),
                },
                Target::Null => return Err(null_prefix(a)),
                Target::Local(given) => {
                    let canonical = std::fs::canonicalize(&given).map_err(|e| {
                        Error::usage(
                            format!("--allow {a}"),
                            format!(
                                "{e} (a local prefix must be an existing folder; create it first)"
                            ),
                        )
                    })?;
                    Prefix::Local { given, canonical }
                }
            };
            out.push(p);
        }
        Ok(Policy {
            allow: Allow::Prefixes(out),
            protected: Vec::new(),
        })
    }

    /// Allows everything (the embedded runner, tests).
    pub fn any() -> Policy {
        Policy {
            allow: Allow::Any,
            protected: Vec::new(),
        }
    }

    /// Keeps jobs out of `uri` (the journal, `--state`) even where `--allow` or `--allow-any`
    /// would let them in: no job may read or overwrite the coordinator's own records.
    pub fn protect(mut self, uri: &str) -> Result<Policy, Error> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let p = match target(uri, &cwd).map_err(|e| Error::usage("--state", e))? {
            Target::S3 { bucket, key } => Prefix::S3 { bucket, key },
            Target::Null => {
                return Err(Error::usage(
                    format!("--state {uri}"),
                    "the null:// store discards data; keep the journal in a local folder or s3://",
                ))
            }
            Target::Hub { .. } => {
                return Err(Error::usage(format!("--state {uri}"),
                    "a Hugging Face repository is read-only; keep the journal in a local folder or s3://"
                ))
            }
            Target::Local(given) => {
                let canonical = real_path(&given, Path::new("/")).unwrap_or_else(|| given.clone());
                Prefix::Local { given, canonical }
            }
        };
        self.protected.push(p);
        Ok(self)
    }

    /// One line for the coordinator's start-up message.
    pub fn describe(&self) -> String {
        match &self.allow {
            Allow::Any => "any path or bucket (--allow-any)".into(),
            Allow::Prefixes(p) if p.is_empty() => {
                "nothing: every job is refused (give --allow PREFIX, or --allow-any)".into()
            }
            Allow::Prefixes(p) => p.iter().map(show).collect::<Vec<_>>().join(", "),
        }
    }

    fn allowed_list(&self) -> String {
        match &self.allow {
            Allow::Prefixes(p) if p.is_empty() => {
                "none: this coordinator was started without --allow, so it refuses every job".into()
            }
            _ => self.describe(),
        }
    }

    /// Checks a submitted job: every model the recipe references and the output must lie
    /// under an allowed prefix. Runs before the job touches storage; looks only at paths
    /// inside the allowed local folders.
    pub async fn check_job(
        &self,
        recipe_text: &str,
        output: &str,
        base_dir: &Path,
    ) -> Result<(), Refusal> {
        if *self == Policy::any() {
            return Ok(());
        }
        let policy = self.clone();
        let base_dir = base_dir.to_path_buf();
        let (text, output) = (recipe_text.to_string(), output.to_string());
        // parsing is CPU work a caller controls: off the async runtime, as planning is
        tokio::task::spawn_blocking(move || {
            let recipe = Recipe::parse(&text).map_err(Refusal::Recipe)?;
            let mut refs: Vec<(String, String)> = recipe
                .referenced_models()
                .into_iter()
                .map(|m| ("model".to_string(), m))
                .collect();
            refs.push(("output".to_string(), output));
            for (what, r) in &refs {
                policy.check_one(what, r, &base_dir)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Refusal::Outside(format!("checking the job's paths: {e}")))?
    }

    fn outside(&self, what: &str, r: &str) -> Refusal {
        Refusal::Outside(format!(
            "{what} `{r}` is outside the storage this coordinator may use for jobs (allowed: {}); \
             move it under an allowed prefix, or ask the coordinator's operator to --allow it",
            self.allowed_list()
        ))
    }

    fn check_one(&self, what: &str, r: &str, base_dir: &Path) -> Result<(), Refusal> {
        if self.allow == Allow::Any && self.protected.is_empty() {
            return Ok(());
        }
        // a model that is neither an existing local path nor a URI is a Hub repository id,
        // as the planner reads it
        let reference = if what == "model" {
            hub::model_reference(r, base_dir)
        } else {
            r.to_string()
        };
        let t =
            target(&reference, base_dir).map_err(|e| Refusal::Outside(format!("{what} {e}")))?;
        if self.is_protected(&t) {
            return Err(Refusal::Outside(format!(
                "{what} `{r}` is inside the coordinator's journal (--state); pick another location"
            )));
        }
        let prefixes = match &self.allow {
            Allow::Any => return Ok(()),
            Allow::Prefixes(p) => p,
        };
        let inside = match t {
            Target::S3 { bucket, key } => prefixes.iter().any(|p| match p {
                Prefix::S3 { bucket: b, key: k } => *b == bucket && key.starts_with(k),
                _ => false,
            }),
            Target::Hub { org, name } => prefixes.iter().any(|p| match p {
                Prefix::Hub { org: o, name: n } => {
                    *o == org && n.as_ref().is_none_or(|n| *n == name)
                }
                _ => false,
            }),
            Target::Local(path) => local_inside(prefixes, &path),
            // benchmark-only: --allow-any alone lets a job use it
            Target::Null => false,
        };
        if inside {
            Ok(())
        } else {
            Err(self.outside(what, r))
        }
    }
}

/// Whether a local path is under one of the allowed local prefixes, and stays there once its
/// symlinks (and those of the files directly in it) are followed.
fn local_inside(prefixes: &[Prefix], path: &Path) -> bool {
    let locals: Vec<(&PathBuf, &PathBuf)> = prefixes
        .iter()
        .filter_map(|p| match p {
            Prefix::Local { given, canonical } => Some((given, canonical)),
            _ => None,
        })
        .collect();
    // lexically first: a path outside is refused without looking at it
    let Some(&(given, canonical)) = locals
        .iter()
        .find(|(g, c)| path.starts_with(g) || path.starts_with(c))
    else {
        return false;
    };
    let under = |p: &Path| locals.iter().any(|(_, c)| p.starts_with(c));
    let root = if path.starts_with(given) {
        given
    } else {
        canonical
    };
    let Some(real) = real_path(path, root) else {
        return false;
    };
    if !under(&real) {
        return false;
    }
    // the files the job reads or writes sit directly in the folder: no symlink there may
    // lead out
    if let Ok(entries) = std::fs::read_dir(&real) {
        for e in entries.flatten() {
            let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
            if is_link {
                match std::fs::canonicalize(e.path()) {
                    Ok(t) if under(&t) => {}
                    _ => return false,
                }
            }
        }
    }
    true
}

impl Policy {
    fn is_protected(&self, t: &Target) -> bool {
        self.protected.iter().any(|p| match (p, t) {
            (Prefix::S3 { bucket: b, key: k }, Target::S3 { bucket, key }) => {
                b == bucket && key.starts_with(k)
            }
            (Prefix::Local { given, canonical }, Target::Local(path)) => {
                path.starts_with(given)
                    || path.starts_with(canonical)
                    || real_path(path, Path::new("/")).is_some_and(|r| r.starts_with(canonical))
            }
            _ => false,
        })
    }
}

fn null_prefix(a: &str) -> Error {
    Error::usage(
        format!("--allow {a}"),
        "null:// is a benchmark-only store that discards its data; only --allow-any allows it",
    )
}

/// `path` with the symlinks of its longest existing ancestor (at or below `root`) resolved;
/// `None` when not even `root` resolves.
fn real_path(path: &Path, root: &Path) -> Option<PathBuf> {
    for anc in path.ancestors() {
        if let Ok(c) = std::fs::canonicalize(anc) {
            let rest = path.strip_prefix(anc).ok()?;
            return Some(c.join(rest));
        }
        if anc == root {
            return None;
        }
    }
    None
}

fn show(p: &Prefix) -> String {
    match p {
        Prefix::Local { given, .. } => given.display().to_string(),
        Prefix::S3 { bucket, key } if key.is_empty() => format!("s3://{bucket}/"),
        Prefix::S3 { bucket, key } => format!("s3://{bucket}/{}/", key.join("/")),
        Prefix::Hub { org, name: None } => format!("hf://{org}/"),
        Prefix::Hub { org, name: Some(n) } => format!("hf://{org}/{n}"),
    }
}

#[cfg(test)]
mod tests;
