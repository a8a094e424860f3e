//! Naming a Hub repository: `ORG/NAME[@REVISION]` ids, their `hf://` URIs, and when a
//! recipe's model reference names one rather than a local folder.

use std::path::Path;

/// The URI prefix of Hub locations.
pub const PREFIX: &str = "hf://";

/// A Hub repository id and revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoId {
    pub org: String,
    pub name: String,
    pub revision: String,
}

impl RepoId {
    /// `ORG/NAME` or `ORG/NAME@REVISION` (default revision `main`). Characters are checked
    /// strictly: ORG and NAME are letters, digits, `-`, `_`, `.` (not starting or ending with
    /// `.` or `-`, no `..`, at most 96 characters); a revision is letters, digits, `-`, `_`,
    /// `.`, `/` (a branch such as `refs/pr/1`), without `..` or empty segments.
    pub fn parse(s: &str) -> Option<RepoId> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['.', '-'])
                && !p.ends_with(['.', '-'])
                && !p.contains("..")
        };
        let rev_ok = !revision.is_empty()
            && revision.len() <= 256
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            && revision
                .split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
            && !revision.contains("..");
        (part_ok(org) && part_ok(name) && rev_ok).then(|| RepoId {
            org: org.to_string(),
            name: name.to_string(),
            revision: revision.to_string(),
        })
    }

    /// `hf://ORG/NAME@REVISION` (a `/` in the revision written `%2F`).
    pub fn uri(&self) -> String {
        format!(
            "{PREFIX}{}/{}@{}",
            self.org,
            self.name,
            self.revision.replace('/', "%2F")
        )
    }

    /// Parses the part of an `hf://` URI after the prefix: `ORG/NAME[@REVISION][/FILE...]`,
    /// returning the repository and the file path.
    pub fn parse_uri(rest: &str) -> Option<(RepoId, String)> {
        let (org, after) = rest.split_once('/')?;
        let (name_rev, file) = after.split_once('/').unwrap_or((after, ""));
        let id = RepoId::parse(&format!("{org}/{}", name_rev.replace("%2F", "/")))?;
        Some((id, file.trim_matches('/').to_string()))
    }
}

/// Whether `rev` is a full commit hash.
pub(super) fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// What a recipe's model reference names. Precedence, as in mergekit: an existing local path
/// wins; then a URI (`s3://`, `file://`, `hf://`) or an absolute or `./`/`../` path stays as it
/// is; then `ORG/NAME[@REVISION]` is a Hub repository (`hf://ORG/NAME@REVISION`) unless a local
/// folder `ORG` exists (then it is a missing local path); anything else is left as a (missing)
/// local path, so its error says the folder does not exist.
pub fn model_reference(reference: &str, base_dir: &Path) -> String {
    if reference.contains("://")
        || reference.starts_with('/')
        || reference.starts_with("./")
        || reference.starts_with("../")
    {
        return reference.to_string();
    }
    // relative to the folder references resolve against, as the storage resolver does
    if base_dir.join(reference).exists() {
        return reference.to_string();
    }
    // `models/lang_xx` where a local folder `models/` exists is a local path with a typo, not
    // a repository of an organisation that happens to share the folder's name: its error
    // should say the folder is missing rather than come back from the network
    let first = reference.split('/').next().unwrap_or_default();
    if !first.is_empty() && base_dir.join(first).is_dir() {
        return reference.to_string();
    }
    match RepoId::parse(reference) {
        Some(id) => id.uri(),
        None => reference.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        let id = RepoId::parse("meta-llama/Llama-3.1-8B").unwrap();
        assert_eq!(id.revision, "main");
        assert_eq!(id.uri(), "hf://meta-llama/Llama-3.1-8B@main");
        assert_eq!(RepoId::parse("a/b@v1.0").unwrap().revision, "v1.0");
        assert_eq!(
            RepoId::parse("a/b@refs/pr/1").unwrap().revision,
            "refs/pr/1"
        );
        let (id, file) = RepoId::parse_uri("a/b@refs%2Fpr%2F1/sub/x.json").unwrap();
        assert_eq!(
            (id.revision.as_str(), file.as_str()),
            ("refs/pr/1", "sub/x.json")
        );
        assert_eq!(id.uri(), "hf://a/b@refs%2Fpr%2F1");
        let (id, file) = RepoId::parse_uri("a/b").unwrap();
        assert_eq!((id.revision.as_str(), file.as_str()), ("main", ""));
        for bad in [
            "a", "a/b/c", "/b", "a/", "../b", "a/..", "a/b@", "a/b@../x", "a b/c", "a/b c",
            "a/b@x y", ".a/b", "a/b-", "a/b@x//y", "a/b?c", "a/b#c", "a/b%2f",
        ] {
            assert!(RepoId::parse(bad).is_none(), "{bad} should be refused");
        }
    }

    #[test]
    fn local_folder_wins() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("org/name")).unwrap();
        assert_eq!(model_reference("org/name", t.path()), "org/name");
        // a missing folder under an existing local folder is a local path (a typo), not a repo
        assert_eq!(model_reference("org/other", t.path()), "org/other");
        assert_eq!(
            model_reference("acme/other", t.path()),
            "hf://acme/other@main"
        );
        assert_eq!(model_reference("./org/other", t.path()), "./org/other");
        assert_eq!(model_reference("s3://b/k", t.path()), "s3://b/k");
        assert_eq!(model_reference("plain", t.path()), "plain");
    }
}
