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
