//! Unit tests of the model-family generator (`family.rs`), kept apart from it so that the
//! coordinator's suites, which include `family.rs` by path, do not run them again.

use std::fs;
use std::path::Path;

use serde_json::{json, Value};
use shardmerge_worker::format::dtype::{decode, DType};
use shardmerge_worker::format::safetensors::{header_len, parse_header, Header};

use crate::family::*;
use crate::writer::split_shards;

fn spec(dtype: DType) -> FamilySpec {
    FamilySpec {
        hidden: 32,
        intermediate: 48,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 40,
        dtype,
        seed: 7,
        rms_norm_eps: 1e-5,
    }
}

fn read(path: &Path) -> (Header, Vec<u8>) {
    let b = fs::read(path).unwrap();
    let n = header_len(&b, b.len() as u64).unwrap();
    (
        parse_header(&b[8..8 + n as usize], b.len() as u64).unwrap(),
        b,
    )
}

fn tensor(path: &Path, name: &str, dtype: DType) -> Vec<f32> {
    let (h, b) = read(path);
    let t = &h.tensors[name];
    let raw = &b[t.start as usize..t.end as usize];
    let mut out = vec![0f32; raw.len() / dtype.size()];
    decode(dtype, raw, &mut out);
    out
}

#[test]
fn values_have_the_intended_statistics() {
    let s = spec(DType::F32);
    let t = TensorSpec {
        name: "x".into(),
        shape: vec![200_000],
        kind: Kind::Weight,
    };
    let mut v = vec![0f32; 200_000];
    TensorGen::new(&s, BASE, &t).fill(0, &mut v);
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
    assert!(mean.abs() < 5e-4, "{mean}");
    assert!((var.sqrt() - 0.02).abs() < 5e-4, "{}", var.sqrt());
    let mut d = vec![0f32; 200_000];
    TensorGen::new(&s, "instruct", &t).fill(0, &mut d);
    let deltas: Vec<f32> = d.iter().zip(&v).map(|(a, b)| a - b).collect();
    let zeros = deltas.iter().filter(|x| **x == 0.0).count();
    assert!((10_000..15_000).contains(&zeros), "{zeros}");
    let dvar = deltas.iter().map(|x| x * x).sum::<f32>() / deltas.len() as f32;
    assert!((dvar.sqrt() - 0.002).abs() < 2e-4, "{}", dvar.sqrt());
    // a chunk started in the middle gives the same values
    let mut part = vec![0f32; 1000];
    TensorGen::new(&s, "instruct", &t).fill(5000, &mut part);
    assert_eq!(&part[..], &d[5000..6000]);
}

#[test]
fn shards_like_huggingface() {
    assert_eq!(split_shards(&[4, 4, 4], None), vec![vec![0, 1, 2]]);
    assert_eq!(split_shards(&[4, 4, 4], Some(8)), vec![vec![0, 1], vec![2]]);
    assert_eq!(
        split_shards(&[4, 20, 4, 4], Some(8)),
        vec![vec![1], vec![0, 2], vec![3]]
    );
}

#[test]
fn writes_a_valid_sharded_family() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(DType::BF16);
    let base = write_model(&s, BASE, 40, &dir.path().join("base"), None, 1).unwrap();
    assert_eq!(base.files.len(), 1);
    let ca_dir = dir.path().join("lang_ca");
    let ca = write_model(&s, "lang_ca", 44, &ca_dir, Some(8192), 2).unwrap();
    assert!(ca.files.len() >= 2, "{:?}", ca.files);
    let idx: Value =
        serde_json::from_slice(&fs::read(ca_dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(idx["metadata"]["total_size"], json!(ca.tensor_bytes));
    let wm = idx["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), tensors(&s, 44).len());
    let mut sum = 0;
    for (name, file) in wm {
        let (h, _) = read(&ca_dir.join(file.as_str().unwrap()));
        let t = &h.tensors[name];
        sum += t.end - t.start;
        if name == "lm_head.weight" {
            assert_eq!(t.shape, vec![44, 32]);
        }
    }
    assert_eq!(sum, ca.tensor_bytes);
    let cfg: Value =
        serde_json::from_slice(&fs::read(ca_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], json!(44));
    assert_eq!(cfg["torch_dtype"], json!("bfloat16"));
    let tok: Value =
        serde_json::from_slice(&fs::read(ca_dir.join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(tok["model"]["vocab"].as_object().unwrap().len(), 44);

    // identical tensor, derived tensors differ, shared vocab rows line up
    let bpath = &base.files[0];
    let file_of = |n: &str| ca_dir.join(wm[n].as_str().unwrap());
    let same = IDENTICAL_TENSOR;
    assert_eq!(
        tensor(bpath, same, s.dtype),
        tensor(&file_of(same), same, s.dtype)
    );
    let q = "model.layers.1.self_attn.q_proj.weight";
    let (bq, cq) = (tensor(bpath, q, s.dtype), tensor(&file_of(q), q, s.dtype));
    let eq = bq.iter().zip(&cq).filter(|(a, b)| a == b).count();
    assert!(eq > 0 && eq < bq.len() / 4, "{eq} of {}", bq.len());
    let e = "model.embed_tokens.weight";
    let (be, ce) = (tensor(bpath, e, s.dtype), tensor(&file_of(e), e, s.dtype));
    let diff: f32 = be.iter().zip(&ce).map(|(a, b)| (a - b).abs()).sum::<f32>() / 1280.0;
    assert!(diff < 0.01, "{diff}");

    // deterministic: a second run writes the same bytes
    let again = dir.path().join("again");
    write_model(&s, BASE, 40, &again, None, 3).unwrap();
    assert_eq!(
        fs::read(bpath).unwrap(),
        fs::read(again.join("model.safetensors")).unwrap()
    );
}
