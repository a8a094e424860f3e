//! Shared helpers of the engine test suites: run merges in-process on real files, read
//! checkpoints back, and derive fixtures (other dtypes, sharding, odd shapes).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use shardmerge::embedded::{self, RunOptions};
use shardmerge::job::SubmitOptions;
pub use shardmerge_proto as pb;
use shardmerge_worker::format::dtype::{self, DType};
use shardmerge_worker::format::safetensors::{self as st, LayoutEntry, StDtype};
use shardmerge_worker::storage::Resolver;

pub fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden")
}

/// A tensor read back: dtype, shape, values as f32, raw bytes.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub values: Vec<f32>,
    pub raw: Vec<u8>,
}

/// Reads every tensor of a checkpoint folder (index or single file).
pub fn load(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut files: Vec<PathBuf> = Vec::new();
    let idx = dir.join("model.safetensors.index.json");
    if idx.exists() {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&idx).unwrap()).unwrap();
        let mut names: Vec<String> = v["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        names.sort();
        names.dedup();
        files = names.into_iter().map(|n| dir.join(n)).collect();
    } else {
        files.push(dir.join("model.safetensors"));
    }
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let n = st::header_len(&bytes, bytes.len() as u64).unwrap();
        let h = st::parse_header(&bytes[8..8 + n as usize], bytes.len() as u64).unwrap();
        for (name, t) in h.tensors {
            let dt = match t.dtype {
                StDtype::Float(dt) => dt,
                StDtype::Other(n, _) => DType::from_st_name(n).expect("known dtype"),
            };
            let raw = bytes[t.start as usize..t.end as usize].to_vec();
            let mut values = vec![0f32; t.numel() as usize];
            dtype::decode(dt, &raw, &mut values);
            out.insert(
                name,
                Tensor {
                    dtype: dt,
                    shape: t.shape,
                    values,
                    raw,
                },
            );
        }
    }
    out
}

/// Writes tensors as a checkpoint: one file, or shards of at most `shard` bytes with an index.
pub fn write(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    dt: DType,
    shard: Option<u64>,
    config: Option<&Path>,
) {
    std::fs::create_dir_all(dir).unwrap();
    if let Some(c) = config {
        std::fs::copy(c, dir.join("config.json")).unwrap();
    }
    let mut groups: Vec<Vec<&String>> = vec![vec![]];
    let mut cur = 0;
    for (name, t) in tensors {
        let b = t.values.len() as u64 * dt.size() as u64;
        if let Some(s) = shard {
            if cur + b > s && !groups.last().unwrap().is_empty() {
                groups.push(vec![]);
                cur = 0;
            }
        }
        groups.last_mut().unwrap().push(name);
        cur += b;
    }
    let n = groups.len();
    let mut wm = serde_json::Map::new();
    let mut total = 0;
    for (k, g) in groups.iter().enumerate() {
        let fname = if shard.is_none() {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let entries: Vec<LayoutEntry> = g
            .iter()
            .map(|name| LayoutEntry {
                name: (*name).clone(),
                dtype: dt,
                shape: tensors[*name].shape.clone(),
            })
            .collect();
        let l = st::layout_file(&entries, &BTreeMap::new());
        let mut file = l.header.clone();
        for name in g {
            let v = &tensors[*name].values;
            let mut b = vec![0u8; v.len() * dt.size()];
            dtype::encode(dt, v, &mut b);
            total += b.len();
            file.extend_from_slice(&b);
            wm.insert((*name).clone(), serde_json::Value::String(fname.clone()));
        }
        std::fs::write(dir.join(&fname), file).unwrap();
    }
    if shard.is_some() {
        let idx = serde_json::json!({"metadata": {"total_size": total}, "weight_map": wm});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec(&idx).unwrap(),
        )
        .unwrap();
    }
}

/// Runs a recipe in-process with relative paths taken against `base_dir`.
pub async fn run(
    recipe: &str,
    base_dir: &Path,
    out: &Path,
    workers: usize,
    task_size: u64,
    slot_memory: u64,
) -> Result<(), String> {
    run_with(
        recipe,
        base_dir,
        out,
        workers,
        task_size,
        slot_memory,
        pb::Rng::Mergekit,
    )
    .await
}

/// [`run`] with a choice of random draws.
pub async fn run_with(
    recipe: &str,
    base_dir: &Path,
    out: &Path,
    workers: usize,
    task_size: u64,
    slot_memory: u64,
    rng: pb::Rng,
) -> Result<(), String> {
    run_opts(
        recipe,
        out,
        workers,
        SubmitOptions {
            task_size,
            slot_memory,
            base_dir: base_dir.to_path_buf(),
            rng,
            ..Default::default()
        },
    )
    .await
}

/// [`run`] with `--unsafe-truncate-embeddings`: models of different vocabulary sizes merge
/// their common rows.
pub async fn run_truncating(
    recipe: &str,
    base_dir: &Path,
    out: &Path,
    workers: usize,
    task_size: u64,
    slot_memory: u64,
) -> Result<(), String> {
    run_opts(
        recipe,
        out,
        workers,
        SubmitOptions {
            task_size,
            slot_memory,
            base_dir: base_dir.to_path_buf(),
            unsafe_truncate_embeddings: true,
            ..Default::default()
        },
    )
    .await
}

/// Runs a recipe in-process with these options.
pub async fn run_opts(
    recipe: &str,
    out: &Path,
    workers: usize,
    submit: SubmitOptions,
) -> Result<(), String> {
    let o = RunOptions {
        workers,
        submit,
        quiet: true,
    };
    embedded::run(recipe, out.to_str().unwrap(), &o, Resolver::new())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Every output file's bytes, by name (safetensors files only).
pub fn file_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".safetensors") || n == "model.safetensors.index.json" {
            out.insert(n, std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// The golden README's tolerance check; returns the failing tensors.
pub fn compare(ours: &Path, expected: &Path, base: &Path, kind: &str) -> Vec<String> {
    let o = load(ours);
    let e = load(expected);
    let b = if kind.starts_with("stat") {
        load(base)
    } else {
        BTreeMap::new()
    };
    let mut bad = Vec::new();
    for n in e.keys() {
        if !o.contains_key(n) {
            bad.push(format!("{n}: missing"));
        }
    }
    for n in o.keys() {
        if !e.contains_key(n) {
            bad.push(format!("{n}: not in mergekit's output"));
        }
    }
    for (n, et) in &e {
        let Some(ot) = o.get(n) else { continue };
        if ot.shape != et.shape || ot.dtype != et.dtype {
            bad.push(format!(
                "{n}: {:?} {:?} vs {:?} {:?}",
                ot.dtype, ot.shape, et.dtype, et.shape
            ));
            continue;
        }
        if kind == "exact" {
            let (rel, atol) = if et.dtype == DType::F32 {
                (1e-4, 1e-5)
            } else {
                (2f64.powi(-7), 1e-6)
            };
            let off = ot
                .values
                .iter()
                .zip(&et.values)
                .filter(|(a, b)| {
                    {
                        // NaN counts as off
                        let d = ((**a as f64) - (**b as f64)).abs();
                        d.is_nan() || d > atol + rel * (**b as f64).abs()
                    }
                })
                .count();
            if off > (1e-4 * et.values.len() as f64) as usize {
                bad.push(format!("{n}: {off}/{} elements off", et.values.len()));
            }
        } else if let Some(bt) = b.get(n) {
            let stats = |v: &[f32]| {
                let same = v.iter().zip(&bt.values).filter(|(a, b)| a == b).count() as f64
                    / v.len() as f64;
                let l1 = v
                    .iter()
                    .zip(&bt.values)
                    .map(|(a, b)| (a - b).abs() as f64)
                    .sum::<f64>()
                    / v.len() as f64;
                (same, l1)
            };
            let (so, lo) = stats(&ot.values);
            let (se, le) = stats(&et.values);
            // "stat": the golden README's bar (10%). "stat-band", for draws from another
            // generator than mergekit's: that bar is below the sampling noise on tiny tensors
            // (a 64-element norm: one element is 1.6%), so there allow four standard
            // deviations of the binomial share instead, and 25% on the mean delta.
            let n = et.values.len() as f64;
            let (share_tol, l1_rel) = if kind == "stat-band" && n < 1024.0 {
                let sd = (se.max(0.05) * (1.0 - se).max(0.05) / n).sqrt();
                (
                    (4.0 * std::f64::consts::SQRT_2 * sd).max(0.1 * se.max(0.02) + 0.01),
                    0.25,
                )
            } else {
                (0.1 * se.max(0.02) + 0.01, 0.1)
            };
            if (so - se).abs() > share_tol || (lo - le).abs() > l1_rel * le + 1e-9 {
                bad.push(format!(
                    "{n}: kept-at-base {so:.3} vs {se:.3}, mean|out-base| {lo:.4} vs {le:.4}"
                ));
            }
        }
    }
    bad
}

/// Rewrites `models/NAME` references in a recipe to point into another folder.
pub fn retarget(recipe: &str, models_dir: &Path) -> String {
    recipe.replace("models/", &format!("{}/", models_dir.display()))
}
