use super::*;
use shardmerge_worker::storage::Resolver;

fn out(dir: &std::path::Path) -> Location {
    Resolver::new()
        .resolve(dir.join("out").to_str().expect("utf-8"), dir)
        .expect("location")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_local_output_has_one_owner_until_released() {
    let t = tempfile::tempdir().expect("tempdir");
    let o = out(t.path());
    rt().block_on(async {
        let a = Claim::take(&o, "job-a", false, None)
            .await
            .expect("first claim");
        for overwrite in [false, true] {
            let e = Claim::take(&o, "job-b", overwrite, None)
                .await
                .expect_err("a second job on a claimed output")
                .to_string();
            assert!(e.contains("claimed by job job-a"), "{e}");
            assert!(e.contains("shardmerge cancel job-a"), "{e}");
        }
        a.confirm().await.expect("still held");
        a.release().await;
        assert!(!o.store.exists(&o.join(CLAIM).path).await.expect("exists"));
        let b = Claim::take(&o, "job-b", false, None)
            .await
            .expect("free again");
        b.release().await;
    });
}

#[test]
fn a_local_claim_of_a_process_that_died_is_free() {
    let t = tempfile::tempdir().expect("tempdir");
    let o = out(t.path());
    rt().block_on(async {
        // dropped without release, as when its process is killed: the lock goes with it
        let a = Claim::take(&o, "job-a", false, None).await.expect("claim");
        drop(a);
        assert!(o.store.exists(&o.join(CLAIM).path).await.expect("exists"));
        let b = Claim::take(&o, "job-b", false, None).await.expect("taken");
        drop(b);
        // a restarted coordinator takes its own job's claim back, not another job's
        let again = Claim::take(&o, "job-b", false, Some(""))
            .await
            .expect("resumed");
        drop(again);
        let e = Claim::take(&o, "job-a", false, Some(""))
            .await
            .expect_err("job-b's output")
            .to_string();
        assert!(e.contains("taken over by job job-b"), "{e}");
    });
}

#[test]
fn claims_are_not_checkpoint_files() {
    assert!(is_claim(".shardmerge-claim"));
    assert!(is_claim(".shardmerge-claim.0123abcd"));
    assert!(!is_claim("model.safetensors"));
    assert!(!is_claim(".shardmerge-claimed"));
}

// The S3 protocol (claim objects + listing) needs only put, list, read and delete: driven here
// over the local filesystem store, so it is tested without an S3 server too.

fn foreign(o: &Location, nonce: &str, job: &str, expires: f64) {
    let body = json!({ "job": job, "process": "host h pid 1", "expires_unix": expires,
        "created_unix": 1.0, "nonce": nonce });
    let p = o.join(&format!("{CLAIM}.{nonce}")).path;
    std::fs::create_dir_all(&o.path).expect("mkdir");
    std::fs::write(p, body.to_string()).expect("write");
}

fn object_claims(o: &Location) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&o.path)
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".shardmerge-claim."))
        .collect();
    names.sort();
    names
}

#[test]
fn concurrent_object_claims_leave_exactly_one_owner() {
    let t = tempfile::tempdir().expect("tempdir");
    let o = out(t.path());
    std::fs::create_dir_all(&o.path).expect("mkdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let o = o.clone();
                tokio::spawn(async move {
                    ObjectClaim::take(&o, &format!("job-{i}"), i % 2 == 0, None).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    let won: Vec<&ObjectClaim> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "exactly one owner");
    for r in &results {
        if let Err(e) = r {
            assert!(e.to_string().contains("is claimed by job"), "{e}");
        }
    }
    assert_eq!(object_claims(&o), [format!("{CLAIM}.{}", won[0].nonce)]);
}

#[test]
fn a_lapsed_object_claim_is_taken_over_only_with_overwrite() {
    let t = tempfile::tempdir().expect("tempdir");
    let o = out(t.path());
    rt().block_on(async {
        foreign(&o, "dead0", "job-old", 1.0);
        let e = ObjectClaim::take(&o, "job-new", false, None)
            .await
            .err()
            .expect("refused without --overwrite")
            .to_string();
        assert!(
            e.contains("lapsed claim of job job-old") && e.contains("--overwrite"),
            "{e}"
        );
        assert_eq!(
            object_claims(&o),
            [format!("{CLAIM}.dead0")],
            "nothing left behind"
        );
        let c = ObjectClaim::take(&o, "job-new", true, None)
            .await
            .expect("taken over");
        assert_eq!(object_claims(&o), [format!("{CLAIM}.{}", c.nonce)]);
        // one still in force is refused, --overwrite or not
        foreign(&o, "11ee", "job-live", now_unix() + 1000.0);
        let e = ObjectClaim::take(&o, "job-3", true, None)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("claimed by job"), "{e}");
    });
}

#[test]
fn a_resumed_job_takes_its_own_object_claim_back_and_notices_a_takeover() {
    let t = tempfile::tempdir().expect("tempdir");
    let o = out(t.path());
    rt().block_on(async {
        let a = ObjectClaim::take(&o, "job-a", false, None)
            .await
            .expect("claim");
        a.confirm().await.expect("held");
        let again = ObjectClaim::take(&o, "job-a", false, Some(&a.nonce))
            .await
            .expect("resumed with its token");
        assert_eq!(again.nonce, a.nonce);
        assert_eq!(object_claims(&o).len(), 1);
        // taken over (its claim removed): confirm fails, refresh does not bring it back,
        // and a resume is refused
        std::fs::remove_file(a.key().path).expect("remove");
        let e = a.confirm().await.expect_err("lost").to_string();
        assert!(e.contains("no longer holds its claim"), "{e}");
        assert!(again.refresh().await.is_err());
        assert!(
            object_claims(&o).is_empty(),
            "a refresh resurrected the claim"
        );
        let e = ObjectClaim::take(&o, "job-a", false, Some(&a.nonce))
            .await
            .err()
            .expect("gone")
            .to_string();
        assert!(e.contains("claim on its output is gone"), "{e}");
    });
}
