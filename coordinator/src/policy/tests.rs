use super::*;

#[tokio::test]
async fn hub_ids_need_an_hf_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let recipe =
        "merge_method: linear\nmodels:\n  - model: org/name@v1\n    parameters: {weight: 1.0}\n";
    let out = dir.path().join("out").to_string_lossy().into_owned();
    let local = dir.path().to_string_lossy().into_owned();
    let p = Policy::new(std::slice::from_ref(&local), false).unwrap();
    // not a local path under the allowed folder: a Hub repository, refused
    assert!(p.check_job(recipe, &out, dir.path()).await.is_err());
    let p = Policy::new(&[local.clone(), "hf://org/".into()], false).unwrap();
    assert!(p.check_job(recipe, &out, dir.path()).await.is_ok());
    let p = Policy::new(&[local.clone(), "hf://org/name".into()], false).unwrap();
    assert!(p.check_job(recipe, &out, dir.path()).await.is_ok());
    let p = Policy::new(&[local.clone(), "hf://org/other".into()], false).unwrap();
    assert!(p.check_job(recipe, &out, dir.path()).await.is_err());
    let p = Policy::new(&[local, "hf://other/".into()], false).unwrap();
    assert!(p.check_job(recipe, &out, dir.path()).await.is_err());
    assert!(Policy::new(&["hf://a b/".into()], false).is_err());
}

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

/// The benchmark-only null:// store: --allow-any lets a job write there with a journal as
/// without one (a journaled coordinator refused it as an unknown scheme); no --allow prefix
/// names it, and it holds no journal.
#[test]
fn null_outputs_need_allow_any_journal_or_not() {
    let base = Path::new("/");
    let dir = tempfile::tempdir().expect("tempdir");
    let journaled = Policy::new(&[], true)
        .and_then(|p| p.protect(dir.path().to_str().expect("utf8")))
        .expect("policy");
    assert!(journaled
        .check_one("output", "null://bench/out", base)
        .is_ok());
    assert!(Policy::any()
        .check_one("output", "null://bench/out", base)
        .is_ok());
    let local = allow(&[dir.path().to_str().expect("utf8")]);
    assert!(local.check_one("output", "null://bench/out", base).is_err());
    assert!(Policy::new(&["null://bench".into()], false).is_err());
    assert!(Policy::any().protect("null://bench/journal").is_err());
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
