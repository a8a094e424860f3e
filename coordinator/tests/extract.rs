//! `shardmerge extract-lora` against mergekit 0.1.5's `mergekit-extract-lora` on the cases of
//! tests/fixtures/extract (made by its make.py): the same tensors, ranks and adapter config;
//! every module's reconstructed delta `B A` equal to mergekit's within a stated tolerance
//! (singular vectors may differ in sign, so products are compared, not factors); tensors
//! saved whole byte for byte; and every singular value of every task vector equal to torch's.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::Tensor;
use serde_json::Value;
use shardmerge_worker::format::dtype::{self, DType};
use shardmerge_worker::format::safetensors::{self as st, StDtype};
use shardmerge_worker::kernels::lowrank::{self, LowRank};
use shardmerge_worker::kernels::round::Work;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/extract")
}

fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    names
}

fn args_of(case: &str) -> Vec<String> {
    let p = fixtures().join("cases").join(case).join("args.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Every tensor of one safetensors file.
fn load_file(p: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let n = st::header_len(&bytes, bytes.len() as u64).unwrap();
    let h = st::parse_header(&bytes[8..8 + n as usize], bytes.len() as u64).unwrap();
    h.tensors
        .into_iter()
        .map(|(name, t)| {
            let StDtype::Float(dt) = t.dtype else {
                panic!("{name}: not a float")
            };
            let raw = bytes[t.start as usize..t.end as usize].to_vec();
            let mut values = vec![0f32; t.numel() as usize];
            dtype::decode(dt, &raw, &mut values);
            let shape = t.shape;
            (
                name,
                Tensor {
                    dtype: dt,
                    shape,
                    values,
                    raw,
                },
            )
        })
        .collect()
}

/// `B A` in f64 (`b` is `out x r`, `a` is `r x in`).
fn product(b: &Tensor, a: &Tensor) -> Vec<f64> {
    let (out, r, inn) = (
        b.shape[0] as usize,
        a.shape[0] as usize,
        a.shape[1] as usize,
    );
    assert_eq!(b.shape[1] as usize, r);
    let mut p = vec![0f64; out * inn];
    for i in 0..out {
        for t in 0..r {
            let x = b.values[i * r + t] as f64;
            for j in 0..inn {
                p[i * inn + j] += x * a.values[t * inn + j] as f64;
            }
        }
    }
    p
}

/// Largest difference of the reconstructed deltas, relative to the largest entry of mergekit's,
/// for a module of singular values `s` kept at rank `r`: 1e-5, plus 2^-6 for bfloat16 factors
/// (each entry rounded to 8 significant bits, in both tools), plus what f32 rounding moves the
/// kept subspace by, `2e-6 * s_1 / (s_r - s_r+1)`. The fixtures' deltas are random, the worst
/// case for a truncated SVD: neighbouring singular values lie within 1% of each other
/// (measured: 1.8e-4 where `s_1 / (s_r - s_r+1)` is 307).
fn tolerance(dt: DType, s: &[f64], r: usize) -> f64 {
    let cond = match (s.first(), s.get(r.wrapping_sub(1)), s.get(r)) {
        (Some(s1), Some(a), Some(b)) if a > b => s1 / (a - b),
        (_, _, Some(_)) => f64::INFINITY,
        _ => 1.0,
    };
    let bits = if dt == DType::F32 { 0.0 } else { 1.0 / 64.0 };
    1e-5 + bits + 2e-6 * cond
}

fn singular_of(case: &str) -> BTreeMap<String, Vec<f64>> {
    let p = fixtures().join("cases").join(case).join("singular.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn run_extract(case: &str, out: &Path) {
    let mut args: Vec<String> = vec!["extract-lora".into(), "-q".into()];
    args.extend(args_of(case));
    args.push(out.to_str().unwrap().into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::shardmerge_in(&fixtures(), &refs);
    assert_eq!(code, 0, "{case}: {err}");
}

fn compare_config(case: &str, got: &Value, want: &Value) {
    let sets = ["target_modules", "modules_to_save"];
    let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
    assert_eq!(
        g.keys().collect::<BTreeSet<_>>(),
        w.keys().collect::<BTreeSet<_>>(),
        "{case}"
    );
    for (k, v) in w {
        if sets.contains(&k.as_str()) {
            let set = |x: &Value| -> BTreeSet<String> {
                x.as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect()
            };
            assert_eq!(set(&g[k]), set(v), "{case}: {k}");
        } else {
            assert_eq!(&g[k], v, "{case}: {k}");
        }
    }
}

/// Compares the adapter in `got` with mergekit's; returns the largest relative difference of
/// a reconstructed delta.
fn compare_adapter(case: &str, got: &Path, want: &Path) -> f64 {
    let (g, w) = (
        load_file(&got.join("adapter_model.safetensors")),
        load_file(&want.join("adapter_model.safetensors")),
    );
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "{case}"
    );
    let sv = singular_of(case);
    let mut worst = 0f64;
    for (name, wt) in &w {
        let gt = &g[name];
        assert_eq!(
            (gt.dtype, &gt.shape),
            (wt.dtype, &wt.shape),
            "{case}: {name}"
        );
        let b_of = |n: &str| {
            n.replace("lora_A.weight", "lora_B.weight")
                .replace("lora_embedding_A", "lora_embedding_B")
        };
        if name.ends_with("lora_A.weight") || name.ends_with("lora_embedding_A") {
            let (pg, pw) = (product(&g[&b_of(name)], gt), product(&w[&b_of(name)], wt));
            let scale = pw.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
            let diff = pg
                .iter()
                .zip(&pw)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            let rel = diff / scale;
            let module = name
                .trim_start_matches("base_model.model.")
                .split(".lora_")
                .next()
                .unwrap();
            let tol = tolerance(wt.dtype, &sv[module], wt.shape[0] as usize);
            assert!(rel <= tol, "{case}: {name}: B A differs by {rel:.2e} of its largest entry (tolerance {tol:.2e})");
            worst = worst.max(rel);
        } else if !name.ends_with("lora_B.weight") && !name.ends_with("lora_embedding_B") {
            // saved whole, or a bias delta: the same bytes
            assert!(gt.raw == wt.raw, "{case}: {name} differs");
        }
    }
    let cfg = |d: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(d.join("adapter_config.json")).unwrap()).unwrap()
    };
    compare_config(case, &cfg(got), &cfg(want));
    worst
}

#[test]
fn every_case_matches_mergekit_extract_lora() {
    for case in cases() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("adapter");
        run_extract(&case, &out);
        let want = fixtures().join("cases").join(&case).join("expected");
        let worst = compare_adapter(&case, &out, &want);
        eprintln!("{case}: B A within {worst:.2e} of mergekit's (relative to its largest entry)");
        assert!(out.join("README.md").exists());
        assert!(
            !out.join(".shardmerge-extract").exists(),
            "{case}: parts left behind"
        );
    }
}

fn model_arg(args: &[String], flag: &str) -> PathBuf {
    let v = args
        .iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .unwrap();
    fixtures().join(v)
}

fn work_of(dt: DType) -> Work {
    match dt {
        DType::BF16 => Work::BF16,
        _ => Work::F32,
    }
}

#[test]
fn singular_values_match_torch() {
    let mut secs = 0f64;
    for case in cases() {
        let args = args_of(&case);
        let ft = common::load(&model_arg(&args, "--model"));
        let base = common::load(&model_arg(&args, "--base-model"));
        let want = singular_of(&case);
        for (module, s_want) in &want {
            let w = format!("{module}.weight");
            let (f, b) = (&ft[&w], &base[&w]);
            let mut d = vec![0f32; f.values.len()];
            lowrank::task_vector(&f.values, &b.values, work_of(f.dtype), &mut d);
            let (rows, cols) = (f.shape[0] as usize, f.shape[1] as usize);
            let o = LowRank {
                max_rank: 1,
                sv_epsilon: 0.0,
                distribute_scale: true,
            };
            let start = Instant::now();
            let got = lowrank::factors(&d, rows, cols, module.contains("embed"), &o).unwrap();
            secs += start.elapsed().as_secs_f64();
            assert_eq!(got.singular.len(), s_want.len(), "{case}: {module}");
            for (i, (x, y)) in got.singular.iter().zip(s_want).enumerate() {
                let rel = (*x as f64 - y).abs() / s_want[0];
                assert!(
                    rel < 1e-5,
                    "{case}: {module}: singular value {i}: {x} vs torch's {y}"
                );
            }
        }
    }
    eprintln!("faer SVDs of every fixture module: {secs:.3} s");
}

#[test]
fn an_out_that_holds_files_is_refused_without_overwrite() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("adapter");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let mut args: Vec<String> = vec!["extract-lora".into(), "-q".into()];
    args.extend(args_of("instruct_r8"));
    args.push(out.to_str().unwrap().into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::shardmerge_in(&fixtures(), &refs);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("already holds") && err.contains("--overwrite"),
        "{err}"
    );
    let mut refs = refs.clone();
    refs.push("--overwrite");
    let (code, _, err) = common::shardmerge_in(&fixtures(), &refs);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("adapter_model.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn a_module_larger_than_the_memory_limit_is_refused_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("adapter");
    let mut args: Vec<String> = vec!["extract-lora".into(), "-q".into()];
    args.extend(args_of("instruct_r8"));
    args.extend([
        "--memory-limit".into(),
        "64KiB".into(),
        out.to_str().unwrap().into(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::shardmerge_in(&fixtures(), &refs);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--memory-limit") && err.contains("mlp"),
        "{err}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
}
