//! A synthetic Llama-layout model family for tests, examples and benchmarks.
//!
//! Every model is a pure function of (seed, model name, tensor name, element index), so the
//! generator never holds a model in memory and never reads one back: a derived model's element
//! is `base(i) + delta_model(i)`, both recomputed from a counter-based hash. Files are written
//! tensor by tensor, in chunks, through a buffered writer.
//!
//! Values: weights ~N(0, 0.02) (Irwin-Hall of four uniforms, so bounded at about 3.5 sigma),
//! norms ~1.0 +- 0.05. Deltas are 0.1x the tensor's scale, seeded per model. To exercise ties in
//! sparsification, about 1/16 of each delta's elements are exactly zero, and
//! `model.layers.0.input_layernorm.weight` is identical to the base in every model.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use shardmerge_worker::format::dtype::{encode, DType};
use shardmerge_worker::format::safetensors::{layout_file, LayoutEntry};

/// The name of the model every other model is derived from.
pub const BASE: &str = "base";
/// The tensor that is bit-identical to the base in every derived model.
pub const IDENTICAL_TENSOR: &str = "model.layers.0.input_layernorm.weight";
/// Deltas are this fraction of the tensor's scale.
pub const DELTA_SCALE: f32 = 0.1;
const WEIGHT_STD: f32 = 0.02;
const NORM_SPREAD: f32 = 0.05;
/// Elements generated per chunk (per thread-split), 4 Mi.
const CHUNK: usize = 1 << 22;

/// Shapes and element type of a family.
#[derive(Clone, Debug)]
pub struct FamilySpec {
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub vocab: u64,
    pub dtype: DType,
    pub seed: u64,
    pub rms_norm_eps: f64,
}

impl FamilySpec {
    pub fn check(&self) -> Result<(), String> {
        let nz = [
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv-heads", self.kv_heads),
            ("vocab", self.vocab),
        ];
        for (n, v) in nz {
            if v == 0 {
                return Err(format!("--{n} must be positive"));
            }
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(format!(
                "--hidden {} is not a multiple of --heads {}",
                self.hidden, self.heads
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "--heads {} is not a multiple of --kv-heads {}",
                self.heads, self.kv_heads
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> u64 {
        self.hidden / self.heads
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// RMSNorm gain: around 1.0.
    Norm,
    /// Projection or embedding: around 0.
    Weight,
}

#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
    pub kind: Kind,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The tensors of one model, in the order transformers' `state_dict()` lists them.
pub fn tensors(spec: &FamilySpec, vocab: u64) -> Vec<TensorSpec> {
    let (h, i, kv) = (
        spec.hidden,
        spec.intermediate,
        spec.kv_heads * spec.head_dim(),
    );
    let w = |name: String, shape: Vec<u64>| TensorSpec {
        name,
        shape,
        kind: Kind::Weight,
    };
    let n = |name: String| TensorSpec {
        name,
        shape: vec![h],
        kind: Kind::Norm,
    };
    let mut v = vec![w("model.embed_tokens.weight".into(), vec![vocab, h])];
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        v.push(w(format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
        v.push(w(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        v.push(w(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        v.push(w(format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
        v.push(w(format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        v.push(w(format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        v.push(w(format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        v.push(n(format!("{p}.input_layernorm.weight")));
        v.push(n(format!("{p}.post_attention_layernorm.weight")));
    }
    v.push(n("model.norm.weight".into()));
    v.push(w("lm_head.weight".into(), vec![vocab, h]));
    v
}

/// SplitMix64's finalizer: a good 64-bit mix, cheap enough to run once per element.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, to turn names into stream keys.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn stream_key(seed: u64, model: &str, tensor: &str) -> u64 {
    mix(seed ^ mix(fnv(model) ^ mix(fnv(tensor))))
}

/// The `i`-th hash of a stream.
#[inline(always)]
fn hash(key: u64, i: u64) -> u64 {
    mix(key.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// Unit-variance, zero-mean, normal-ish value from the low 60 bits of `h` (sum of four 15-bit
/// uniforms).
#[inline(always)]
fn normalish(h: u64) -> f32 {
    let s = (h & 0x7fff) + ((h >> 15) & 0x7fff) + ((h >> 30) & 0x7fff) + ((h >> 45) & 0x7fff);
    // each uniform is (k + 0.5) / 32768; four of them have mean 2 and variance 1/3
    (s as f32 + 2.0 - 65536.0) * (1.732_050_8 / 32768.0)
}

/// Generates elements `[start, start + out.len())` of one tensor of one model.
pub struct TensorGen {
    base_key: u64,
    delta_key: Option<u64>,
    center: f32,
    scale: f32,
}

impl TensorGen {
    pub fn new(spec: &FamilySpec, model: &str, t: &TensorSpec) -> TensorGen {
        let (center, scale) = match t.kind {
            Kind::Norm => (1.0, NORM_SPREAD),
            Kind::Weight => (0.0, WEIGHT_STD),
        };
        let derived = model != BASE && t.name != IDENTICAL_TENSOR;
        TensorGen {
            base_key: stream_key(spec.seed, BASE, &t.name),
            delta_key: derived.then(|| stream_key(spec.seed, model, &t.name)),
            center,
            scale,
        }
    }

    pub fn fill(&self, start: u64, out: &mut [f32]) {
        let (c, s) = (self.center, self.scale);
        for (j, o) in out.iter_mut().enumerate() {
            *o = c + s * normalish(hash(self.base_key, start + j as u64));
        }
        if let Some(dk) = self.delta_key {
            let ds = s * DELTA_SCALE;
            for (j, o) in out.iter_mut().enumerate() {
                let h = hash(dk, start + j as u64);
                // top 4 bits zero: the delta is exactly zero (1 in 16)
                let keep = if h >> 60 == 0 { 0.0 } else { 1.0 };
                *o += keep * ds * normalish(h);
            }
        }
    }
}

/// What `write_model` wrote.
#[derive(Debug, Default)]
pub struct ModelStats {
    pub files: Vec<PathBuf>,
    pub params: u64,
    pub tensor_bytes: u64,
    pub file_bytes: u64,
}

/// Splits tensors into shards the way huggingface_hub does: a tensor starts a new shard when it
/// would push the current one past `max`; a tensor bigger than `max` gets a shard of its own.
pub fn split_shards(sizes: &[u64], max: Option<u64>) -> Vec<Vec<usize>> {
    let Some(max) = max else {
        return vec![(0..sizes.len()).collect()];
    };
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_size = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if s > max {
            shards.push(vec![i]);
            continue;
        }
        if cur_size + s > max && !cur.is_empty() {
            shards.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur.push(i);
        cur_size += s;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// Writes one model's safetensors file(s) (and the index when sharded) into `dir`.
pub fn write_weights(
    spec: &FamilySpec,
    model: &str,
    vocab: u64,
    dir: &Path,
    shard_size: Option<u64>,
    threads: usize,
) -> io::Result<ModelStats> {
    fs::create_dir_all(dir)?;
    let ts = tensors(spec, vocab);
    let esize = spec.dtype.size() as u64;
    let sizes: Vec<u64> = ts.iter().map(|t| t.numel() * esize).collect();
    let shards = split_shards(&sizes, shard_size);
    let n = shards.len();
    let mut stats = ModelStats::default();
    let mut weight_map = BTreeMap::new();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut fbuf = vec![0f32; CHUNK];
    let mut bbuf = vec![0u8; CHUNK * spec.dtype.size()];
    for (k, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let entries: Vec<LayoutEntry> = shard
            .iter()
            .map(|&i| LayoutEntry {
                name: ts[i].name.clone(),
                dtype: spec.dtype,
                shape: ts[i].shape.clone(),
            })
            .collect();
        let layout = layout_file(&entries, &meta);
        let path = dir.join(&fname);
        let partial = dir.join(format!("{fname}.partial"));
        let mut w = BufWriter::with_capacity(8 << 20, File::create(&partial)?);
        w.write_all(&layout.header)?;
        for &i in shard {
            let t = &ts[i];
            let g = TensorGen::new(spec, model, t);
            let numel = t.numel();
            let mut start = 0u64;
            while start < numel {
                let len = (numel - start).min(CHUNK as u64) as usize;
                fill_encode(
                    &g,
                    spec.dtype,
                    start,
                    &mut fbuf[..len],
                    &mut bbuf[..len * spec.dtype.size()],
                    threads,
                );
                w.write_all(&bbuf[..len * spec.dtype.size()])?;
                start += len as u64;
            }
            weight_map.insert(t.name.clone(), fname.clone());
            stats.params += numel;
            stats.tensor_bytes += numel * esize;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&partial, &path)?;
        stats.file_bytes += layout.total_size;
        stats.files.push(path);
    }
    let index = dir.join("model.safetensors.index.json");
    if n > 1 {
        let v = json!({
            "metadata": {"total_size": stats.tensor_bytes},
            "weight_map": weight_map,
        });
        write_json(&index, &v)?;
    } else if index.exists() {
        fs::remove_file(&index)?;
    }
    // stale shards of an earlier run with another sharding
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
        if name.ends_with(".safetensors") && !stats.files.contains(&p) {
            fs::remove_file(&p)?;
        }
    }
    Ok(stats)
}

fn fill_encode(
    g: &TensorGen,
    dtype: DType,
    start: u64,
    f: &mut [f32],
    b: &mut [u8],
    threads: usize,
) {
    let threads = threads.max(1);
    let per = f.len().div_ceil(threads).max(1 << 16);
    if threads == 1 || f.len() <= per {
        g.fill(start, f);
        encode(dtype, f, b);
        return;
    }
    std::thread::scope(|s| {
        let es = dtype.size();
        for (k, (fc, bc)) in f.chunks_mut(per).zip(b.chunks_mut(per * es)).enumerate() {
            s.spawn(move || {
                g.fill(start + (k * per) as u64, fc);
                encode(dtype, fc, bc);
            });
        }
    });
}

/// Writes `v` as transformers does: two-space indent, trailing newline.
pub fn write_json(path: &Path, v: &Value) -> io::Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
    s.push('\n');
    fs::write(path, s)
}

/// `config.json` for a LlamaForCausalLM of this spec.
pub fn config_json(spec: &FamilySpec, vocab: u64) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": spec.head_dim(),
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": 2048,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": spec.dtype.torch_name(),
        "transformers_version": "4.44.2",
        "use_cache": true,
        "vocab_size": vocab,
    })
}

/// A tiny but valid `tokenizers` WordLevel tokenizer with `vocab` entries.
pub fn tokenizer_json(vocab: u64) -> Value {
    let specials = ["<unk>", "<s>", "</s>"];
    let mut v = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        if (i as u64) < vocab {
            v.insert((*s).into(), json!(i));
        }
    }
    for i in specials.len() as u64..vocab {
        v.insert(format!("tok{i}"), json!(i));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .filter(|(i, _)| (*i as u64) < vocab)
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": v, "unk_token": "<unk>"},
    })
}

/// Writes config, generation config and tokenizer files. `name_or_path` in the tokenizer config
/// names the model, so a test can tell which model's tokenizer was copied.
pub fn write_support_files(model: &str, vocab: u64, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"_from_model_config": true, "bos_token_id": 1, "eos_token_id": 2,
                "transformers_version": "4.44.2"}),
    )?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json(vocab))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": true,
            "add_eos_token": false,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": false,
            "eos_token": "</s>",
            "model_max_length": 2048,
            "name_or_path": format!("shardmerge-family/{model}"),
            "pad_token": null,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": "<unk>",
        }),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    )?;
    Ok(())
}

/// Writes a whole model folder. `config.json` is written last, so its presence means the folder
/// is complete.
pub fn write_model(
    spec: &FamilySpec,
    model: &str,
    vocab: u64,
    dir: &Path,
    shard_size: Option<u64>,
    threads: usize,
) -> io::Result<ModelStats> {
    let cfg = dir.join("config.json");
    if cfg.exists() {
        fs::remove_file(&cfg)?;
    }
    let stats = write_weights(spec, model, vocab, dir, shard_size, threads)?;
    write_support_files(model, vocab, dir)?;
    write_json(&cfg, &config_json(spec, vocab))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmerge_worker::format::dtype::decode;
    use shardmerge_worker::format::safetensors::{header_len, parse_header, Header};

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
}
