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
//! The journal (`--state`) is the operator's choice and is not policed; neither is the
//! embedded `shardmerge run`, which works on any path its user can reach.

use std::path::{Component, Path, PathBuf};

use crate::error::Error;
use crate::recipe::Recipe;

/// One allowed prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prefix {
    /// A local folder: as given (absolute, normalised) and with its symlinks resolved.
    Local { given: PathBuf, canonical: PathBuf },
    /// `s3://bucket/key...`; an empty key allows the whole bucket.
    S3 { bucket: String, key: Vec<String> },
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
    S3 { bucket: String, key: Vec<String> },
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
    if uri.contains("://") && !uri.starts_with("file://") {
        return Err(format!(
            "`{uri}`: unsupported URI scheme (use a local path, file:// or s3://)"
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
                return Err(Error::Other(
                    "--allow-any and --allow exclude each other: give one".into(),
                ));
            }
            return Ok(Policy::any());
        }
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let mut out = Vec::new();
        for a in allow {
            let p = match target(a, &cwd).map_err(|e| Error::Other(format!("--allow {e}")))? {
                Target::S3 { bucket, key } => Prefix::S3 { bucket, key },
                Target::Local(given) => {
                    let canonical = std::fs::canonicalize(&given).map_err(|e| {
                        Error::Other(format!(
                            "--allow {a}: {e} (a local prefix must be an existing folder; create it first)"
                        ))
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
        let p = match target(uri, &cwd).map_err(|e| Error::Other(format!("--state {e}")))? {
            Target::S3 { bucket, key } => Prefix::S3 { bucket, key },
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
        let recipe = Recipe::parse(recipe_text).map_err(Refusal::Recipe)?;
        let mut refs: Vec<(String, String)> = recipe
            .referenced_models()
            .into_iter()
            .map(|m| ("model".to_string(), m))
            .collect();
        refs.push(("output".to_string(), output.to_string()));
        let policy = self.clone();
        let base_dir = base_dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
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
        let t = target(r, base_dir).map_err(|e| Refusal::Outside(format!("{what} {e}")))?;
        if self.is_protected(&t) {
            return Err(Refusal::Outside(format!(
                "{what} `{r}` is inside the coordinator's journal (--state); pick another location"
            )));
        }
        let prefixes = match &self.allow {
            Allow::Any => return Ok(()),
            Allow::Prefixes(p) => p,
        };
        match t {
            Target::S3 { bucket, key } => {
                let inside = prefixes.iter().any(|p| match p {
                    Prefix::S3 { bucket: b, key: k } => *b == bucket && key.starts_with(k),
                    Prefix::Local { .. } => false,
                });
                if inside {
                    Ok(())
                } else {
                    Err(self.outside(what, r))
                }
            }
            Target::Local(path) => {
                let locals: Vec<(&PathBuf, &PathBuf)> = prefixes
                    .iter()
                    .filter_map(|p| match p {
                        Prefix::Local { given, canonical } => Some((given, canonical)),
                        Prefix::S3 { .. } => None,
                    })
                    .collect();
                // lexically first: a path outside is refused without looking at it
                let Some(&(given, canonical)) = locals
                    .iter()
                    .find(|(g, c)| path.starts_with(g) || path.starts_with(c))
                else {
                    return Err(self.outside(what, r));
                };
                let under = |p: &Path| locals.iter().any(|(_, c)| p.starts_with(c));
                let root = if path.starts_with(given) {
                    given
                } else {
                    canonical
                };
                let real = real_path(&path, root).ok_or_else(|| self.outside(what, r))?;
                if !under(&real) {
                    return Err(self.outside(what, r));
                }
                // the files the job reads or writes sit directly in the folder: no symlink
                // there may lead out
                if let Ok(entries) = std::fs::read_dir(&real) {
                    for e in entries.flatten() {
                        let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
                        if is_link {
                            match std::fs::canonicalize(e.path()) {
                                Ok(t) if under(&t) => {}
                                _ => return Err(self.outside(what, r)),
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(a: &[&str]) -> Policy {
        Policy::new(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false).expect("policy")
    }

    fn check(p: &Policy, r: &str, base: &Path) -> bool {
        p.check_one("model", r, base).is_ok()
    }

    #[test]
    fn s3_prefixes_match_whole_segments() {
        let p = allow(&["s3://team/models", "s3://scratch"]);
        let base = Path::new("/");
        assert!(check(&p, "s3://team/models/a", base));
        assert!(check(&p, "s3://team/models", base));
        assert!(check(&p, "s3://team//models//a/", base));
        assert!(check(&p, "s3://scratch/anything/at/all", base));
        assert!(!check(&p, "s3://team/models-private/a", base));
        assert!(!check(&p, "s3://team/other", base));
        assert!(!check(&p, "s3://teamx/models/a", base));
        assert!(!check(&p, "s3://team/models/../private", base));
        assert!(!check(&p, "s3://team/models/./a", base));
        assert!(!check(&p, "gs://team/models/a", base));
    }

    #[test]
    fn nothing_allowed_refuses_everything_and_any_allows_everything() {
        let none = allow(&[]);
        assert!(!check(&none, "s3://b/k", Path::new("/")));
        assert!(!check(&none, "/tmp", Path::new("/")));
        assert!(check(&Policy::any(), "/etc", Path::new("/")));
        assert!(Policy::new(&["s3://b".into()], true).is_err());
    }

    #[test]
    fn the_journal_is_never_a_jobs() {
        let base = Path::new("/");
        let p = Policy::new(&[], true)
            .and_then(|p| p.protect("s3://b/_journal"))
            .expect("policy");
        assert!(!check(&p, "s3://b/_journal", base));
        assert!(!check(&p, "s3://b/_journal/x", base));
        assert!(check(&p, "s3://b/_journal2/x", base));
        assert!(check(&p, "s3://b/out", base));
        let dir = tempfile::tempdir().expect("tempdir");
        let j = dir.path().join("journal");
        let p = allow(&[dir.path().to_str().expect("utf8")])
            .protect(j.to_str().expect("utf8"))
            .expect("policy");
        assert!(!check(&p, "journal/x", dir.path()));
        assert!(check(&p, "out", dir.path()));
    }

    #[test]
    fn local_paths_resolve_like_the_storage_resolver() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canon");
        let ok = root.join("ok");
        std::fs::create_dir_all(ok.join("m")).expect("mkdir");
        std::fs::create_dir_all(root.join("private/m")).expect("mkdir");
        let p = allow(&[ok.to_str().expect("utf8")]);
        assert!(check(&p, "m", &ok));
        assert!(check(&p, "./m/../m", &ok));
        assert!(check(&p, &format!("file://{}/m", ok.display()), &ok));
        assert!(check(&p, "new-output", &ok));
        assert!(!check(&p, "../private/m", &ok));
        assert!(!check(&p, "m/../../private/m", &ok));
        assert!(!check(&p, &root.join("okay").display().to_string(), &ok));
        assert!(!check(&p, "/etc", &ok));
        // the same resolution as the storage resolver's
        let r = shardmerge_worker::storage::Resolver::new();
        for s in ["m", "./m/../m", "a/b/../../m", "/x/../y"] {
            let want = r.resolve(s, &ok).expect("resolve").path;
            assert_eq!(
                target(s, &ok).expect("target"),
                Target::Local(PathBuf::from(want))
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_an_allowed_folder_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canon");
        let ok = root.join("ok");
        let private = root.join("private");
        std::fs::create_dir_all(&ok).expect("mkdir");
        std::fs::create_dir_all(private.join("m")).expect("mkdir");
        std::fs::write(private.join("m/model.safetensors"), b"x").expect("write");
        // a folder link and a file link, both leading out
        std::os::unix::fs::symlink(private.join("m"), ok.join("link")).expect("symlink");
        std::fs::create_dir_all(ok.join("evil")).expect("mkdir");
        std::os::unix::fs::symlink(
            private.join("m/model.safetensors"),
            ok.join("evil/model.safetensors"),
        )
        .expect("symlink");
        // a link that stays inside is fine
        std::fs::create_dir_all(ok.join("real")).expect("mkdir");
        std::os::unix::fs::symlink(ok.join("real"), ok.join("alias")).expect("symlink");
        let p = allow(&[ok.to_str().expect("utf8")]);
        assert!(!check(&p, "link", &ok));
        assert!(!check(&p, "link/sub/new", &ok));
        assert!(!check(&p, "evil", &ok));
        assert!(check(&p, "alias", &ok));
        assert!(check(&p, "real", &ok));
    }

    #[tokio::test]
    async fn a_job_is_checked_input_by_input_and_output() {
        let p = allow(&["s3://team/in", "s3://team/out"]);
        let recipe = "merge_method: task_arithmetic\nbase_model: s3://team/in/base\n\
                      models:\n- model: s3://team/in/a\n  parameters: {weight: 1.0}\n";
        assert!(p
            .check_job(recipe, "s3://team/out/x", Path::new("/"))
            .await
            .is_ok());
        let bad_base = recipe.replace("s3://team/in/base", "s3://other/base");
        match p
            .check_job(&bad_base, "s3://team/out/x", Path::new("/"))
            .await
        {
            Err(Refusal::Outside(m)) => {
                assert!(m.contains("model `s3://other/base`"), "{m}");
                assert!(m.contains("s3://team/in/"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        let r = p.check_job(recipe, "s3://team/in/a", Path::new("/")).await;
        assert!(
            r.is_ok(),
            "an output under an allowed prefix is allowed: {r:?}"
        );
        match p
            .check_job(recipe, "s3://elsewhere/x", Path::new("/"))
            .await
        {
            Err(Refusal::Outside(m)) => assert!(m.starts_with("output `s3://elsewhere/x`"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
