//! Output safety, checked when a job is submitted, before any storage is written:
//!
//! - the output must not be, contain, or sit inside an input model's folder (compared as
//!   resolved locations: the same store, and a path-prefix relation between normalised paths;
//!   local paths are canonicalised so that symlinks and `..` cannot hide the relation);
//! - an output that already holds files is refused unless the job asks to overwrite it.
//!
//! How an overwrite keeps the old checkpoint whole until the new one is committed lives in the
//! job manager (`job::JobManager::commit`) and `commit::commit_checkpoint`.

use std::path::{Path, PathBuf};

use shardmerge_worker::storage::Location;

use crate::error::{Error, Result};
use crate::plan::{ModelInfo, Plan};

/// Refuses an output that overlaps an input model (before anything, even the output's claim,
/// is written there).
pub fn check_overlap(plan: &Plan, out: &Location) -> Result<()> {
    check_overlap_models(&plan.models.iter().collect::<Vec<_>>(), out)
}

/// [`check_overlap`] for the models `models` (a job without a recipe: `extract-lora`).
pub fn check_overlap_models(models: &[&ModelInfo], out: &Location) -> Result<()> {
    let out_key = key(out);
    for m in models {
        let in_key = key(&m.loc);
        if in_key.0 != out_key.0 {
            continue;
        }
        let relation = if in_key.1 == out_key.1 {
            Some("is")
        } else if is_under(&out_key.1, &in_key.1) {
            Some("is inside")
        } else if is_under(&in_key.1, &out_key.1) {
            Some("contains")
        } else {
            None
        };
        if let Some(rel) = relation {
            return Err(Error::input(
                "",
                format!(
                    "output {} {rel} the folder of input model {} ({}): a merge never writes over \
                 its inputs, even with --overwrite; pick an output folder outside every input",
                    out.uri(),
                    m.name,
                    m.loc.uri()
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses an output that holds files without `overwrite`. Returns the names of the files the
/// output holds now.
pub async fn check_held(out: &Location, overwrite: bool) -> Result<Vec<String>> {
    let held = match out.store.list(&out.path).await {
        // (claims are not files of a checkpoint: this job's own is there already)
        Ok(names) => names
            .into_iter()
            .filter(|n| !crate::claim::is_claim(n))
            .collect::<Vec<_>>(),
        Err(e) if e.not_found => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if !held.is_empty() && !overwrite {
        let mut shown: Vec<&str> = held.iter().take(3).map(String::as_str).collect();
        if held.len() > 3 {
            shown.push("...");
        }
        return Err(Error::AlreadyExists {
            path: out.uri(),
            reason: format!(
                "{} already holds {} file(s) ({}); pick a new or empty output folder, or pass \
             --overwrite to replace them (the files there stay as they are until the new \
             checkpoint is complete)",
                out.uri(),
                held.len(),
                shown.join(", ")
            ),
        });
    }
    Ok(held)
}

/// A location as (store, normalised path) for comparisons: local paths canonicalised (as far
/// as they exist), object keys without leading or trailing slashes.
fn key(l: &Location) -> (String, String) {
    let root = l.store.scheme_root();
    if l.store.is_local() {
        let p = canonical(Path::new(&l.path));
        (root, p.to_string_lossy().trim_end_matches('/').to_string())
    } else {
        (root, l.path.trim_matches('/').to_string())
    }
}

/// `p` with symlinks resolved: its longest existing ancestor canonicalised, and the rest (which
/// does not exist yet) appended.
fn canonical(p: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = p.to_path_buf();
    loop {
        if let Ok(c) = std::fs::canonicalize(&at) {
            let mut out = c;
            for part in missing.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (at.file_name().map(|n| n.to_os_string()), at.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name);
                at = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// Whether path `inner` lies strictly inside folder `outer` (whole components only).
fn is_under(inner: &str, outer: &str) -> bool {
    if outer.is_empty() {
        return !inner.is_empty();
    }
    inner.len() > outer.len()
        && inner.starts_with(outer)
        && (inner.as_bytes()[outer.len()] == b'/' || outer.ends_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_compares_whole_components() {
        assert!(is_under("/a/b/c", "/a/b"));
        assert!(!is_under("/a/bc", "/a/b"));
        assert!(!is_under("/a/b", "/a/b"));
        assert!(is_under("models/x", ""));
        assert!(!is_under("", ""));
    }

    #[test]
    fn canonical_resolves_symlinks_of_missing_paths() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let c = canonical(&link.join("new/out"));
        assert_eq!(
            c,
            std::fs::canonicalize(&real)
                .unwrap()
                .join("new")
                .join("out")
        );
    }
}
