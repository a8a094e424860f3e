//! The storage conformance suite: one contract, which every store runs (local files, the
//! fault-injection wrapper, S3 on a real server, the in-memory store; see `tests/storage.rs`).
//! The engine relies on exactly these behaviours: exact range reads that fail past the end,
//! whole-file puts that replace, flat listings, idempotent deletes, and part uploads that stay
//! invisible until finished and leave nothing when aborted. A new backend calls `conformance`
//! from a test of its own.

use std::sync::Arc;

use bytes::Bytes;
use shardmerge_worker::storage::{Receipt, Storage};

/// `n` bytes of a pattern that differs at every offset of interest.
pub fn pattern(n: usize, salt: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(salt) >> 13) as u8)
        .collect()
}

/// Runs the whole contract against `store`, under the folder (or key prefix) `root`.
pub async fn conformance(store: Arc<dyn Storage>, root: &str) {
    contract(store, root, true).await
}

/// The contract of a store that discards what is written in parts (`null://`, benchmarks
/// only): the whole contract, except that a finished output file, which exists with its size,
/// cannot be read back.
pub async fn conformance_discarding(store: Arc<dyn Storage>, root: &str) {
    contract(store, root, false).await
}

/// The contract; `keeps`: a finished output file can be read back.
async fn contract(store: Arc<dyn Storage>, root: &str, keeps: bool) {
    let p = |name: &str| format!("{root}/{name}");
    let at = store.scheme_root();

    // A missing file: absent, not found, unreadable.
    assert!(!store.exists(&p("missing.bin")).await.unwrap(), "{at}");
    let e = store.size(&p("missing.bin")).await.unwrap_err();
    assert!(
        e.not_found && !e.retryable,
        "{at}: size of a missing file: {e:?}"
    );
    assert!(e.message.contains("missing.bin"), "{at}: {e}");
    assert!(store.read_range(&p("missing.bin"), 0..1).await.is_err());
    assert!(store.read_all(&p("missing.bin")).await.is_err());

    // Whole-file put, then exact reads.
    let data = pattern(100_000, 1);
    let blob = p("a/blob.bin");
    store.put(&blob, Bytes::from(data.clone())).await.unwrap();
    assert!(store.exists(&blob).await.unwrap());
    assert_eq!(store.size(&blob).await.unwrap(), 100_000);
    assert_eq!(store.read_all(&blob).await.unwrap(), data);
    for (a, b) in [
        (0, 1),
        (10, 20),
        (4096, 70_001),
        (99_990, 100_000),
        (0, 100_000),
    ] {
        let got = store.read_range(&blob, a..b).await.unwrap();
        assert_eq!(
            &got[..],
            &data[a as usize..b as usize],
            "{at}: range {a}..{b}"
        );
    }
    assert!(store.read_range(&blob, 500..500).await.unwrap().is_empty());
    let e = store
        .read_range(&blob, 99_990..100_010)
        .await
        .expect_err("a range past the end is an error, not a short read");
    assert!(e.message.contains("blob.bin"), "{at}: {e}");
    assert!(
        !e.retryable,
        "{at}: a range past the end will not succeed on retry: {e:?}"
    );

    // Reading into a buffer replaces its contents and keeps its allocation.
    let buf = vec![0xAAu8; 5000];
    let ptr = buf.as_ptr();
    let got = store.read_range_into(&blob, 1000..3000, buf).await.unwrap();
    assert_eq!(&got[..], &data[1000..3000], "{at}");
    assert_eq!(got.as_ptr(), ptr, "{at}: the buffer was reallocated");
    let got = store.read_range_into(&blob, 7..9, got).await.unwrap();
    assert_eq!(&got[..], &data[7..9], "{at}");
    assert!(store
        .read_range_into(&blob, 99_999..100_001, got)
        .await
        .is_err());

    // A put replaces the whole file.
    let small = pattern(300, 2);
    store.put(&blob, Bytes::from(small.clone())).await.unwrap();
    assert_eq!(store.size(&blob).await.unwrap(), 300);
    assert_eq!(store.read_all(&blob).await.unwrap(), small);

    // Listing names the files directly in a folder, sorted; deletes are idempotent.
    store
        .put(&p("a/x.json"), Bytes::from_static(b"{}"))
        .await
        .unwrap();
    store
        .put(&p("a/sub/y.json"), Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(
        store.list(&p("a")).await.unwrap(),
        vec!["blob.bin".to_string(), "x.json".to_string()],
        "{at}"
    );
    store.delete(&p("a/x.json")).await.unwrap();
    assert!(!store.exists(&p("a/x.json")).await.unwrap());
    store.delete(&p("a/x.json")).await.unwrap();
    assert_eq!(store.list(&p("a")).await.unwrap(), vec!["blob.bin"], "{at}");

    // An output file in parts: written out of order, one part twice (a retried task); not
    // visible until finished, then exactly the parts in order.
    let part = (store.min_part_size() as usize).max(4096);
    let sizes = [part, part + 1, 1234];
    let parts: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, 10 + i as u32))
        .collect();
    let total: usize = sizes.iter().sum();
    let out = p("out/model.safetensors");
    let up = store.begin_upload(&out, total as u64).await.unwrap();
    let offset = |i: usize| sizes[..i].iter().sum::<usize>() as u64;
    let mut receipts: Vec<Option<Receipt>> = vec![None; 3];
    for i in [2, 0, 1, 1] {
        let r = store
            .write_part(&up, i as u32, offset(i), Bytes::from(parts[i].clone()))
            .await
            .unwrap();
        assert_eq!((r.part_index, r.size), (i as u32, sizes[i] as u64), "{at}");
        assert_eq!(
            r.crc32c,
            crc32c::crc32c(&parts[i]),
            "{at}: the receipt's CRC-32C is not the part's"
        );
        receipts[i] = Some(r);
    }
    assert!(
        !store.exists(&out).await.unwrap(),
        "{at}: visible before finish"
    );
    let receipts: Vec<Receipt> = receipts.into_iter().map(Option::unwrap).collect();
    store.finish_upload(&up, &receipts).await.unwrap();
    assert_eq!(store.size(&out).await.unwrap(), total as u64);
    let mid = offset(1) - 10..offset(1) + 10;
    if keeps {
        assert_eq!(store.read_all(&out).await.unwrap(), parts.concat(), "{at}");
        assert_eq!(
            &store.read_range(&out, mid.clone()).await.unwrap()[..],
            &parts.concat()[mid.start as usize..mid.end as usize],
            "{at}: a range across a part boundary"
        );
    } else {
        let e = store.read_range(&out, mid).await.unwrap_err();
        assert!(
            !e.retryable && e.message.contains("model.safetensors"),
            "{at}: {e}"
        );
        assert!(store.read_all(&out).await.is_err(), "{at}");
    }

    // An aborted upload leaves nothing behind.
    let gone = p("out/aborted.safetensors");
    let up = store.begin_upload(&gone, 5000).await.unwrap();
    store
        .write_part(&up, 0, 0, Bytes::from(pattern(5000, 3)))
        .await
        .unwrap();
    store.abort_upload(&up).await.unwrap();
    assert!(!store.exists(&gone).await.unwrap(), "{at}");
    assert_eq!(
        store.list(&p("out")).await.unwrap(),
        vec!["model.safetensors"],
        "{at}: leftovers after finish and abort"
    );
}
