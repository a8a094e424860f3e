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

use std::fs;
use std::io;
use std::path::Path;

use serde_json::{json, Value};
use shardmerge_worker::format::dtype::{encode, DType};
use shardmerge_worker::format::safetensors::LayoutEntry;

use super::writer::{write_checkpoint, CHUNK};
pub use super::writer::{write_json, ModelStats};

/// The name of the model every other model is derived from.
pub const BASE: &str = "base";
/// The tensor that is bit-identical to the base in every derived model.
pub const IDENTICAL_TENSOR: &str = "model.layers.0.input_layernorm.weight";
/// Deltas are this fraction of the tensor's scale.
pub const DELTA_SCALE: f32 = 0.1;
const WEIGHT_STD: f32 = 0.02;
const NORM_SPREAD: f32 = 0.05;

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

/// Writes one model's safetensors file(s) (and the index when sharded) into `dir`.
pub fn write_weights(
    spec: &FamilySpec,
    model: &str,
    vocab: u64,
    dir: &Path,
    shard_size: Option<u64>,
    threads: usize,
) -> io::Result<ModelStats> {
    write_tensors(spec, model, &tensors(spec, vocab), dir, shard_size, threads)
}

/// Writes `model`'s values of the tensors `ts` (any layout; of `spec` only the seed and dtype
/// count) into `dir`, in that order.
pub fn write_tensors(
    spec: &FamilySpec,
    model: &str,
    ts: &[TensorSpec],
    dir: &Path,
    shard_size: Option<u64>,
    threads: usize,
) -> io::Result<ModelStats> {
    let entries: Vec<LayoutEntry> = ts
        .iter()
        .map(|t| LayoutEntry {
            name: t.name.clone(),
            dtype: spec.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let mut fbuf = vec![0f32; CHUNK];
    let mut current: Option<(usize, TensorGen)> = None;
    write_checkpoint(dir, &entries, shard_size, &mut |i, start, out| {
        if current.as_ref().is_none_or(|(c, _)| *c != i) {
            current = Some((i, TensorGen::new(spec, model, &ts[i])));
        }
        if let Some((_, g)) = &current {
            let len = out.len() / spec.dtype.size();
            fill_encode(g, spec.dtype, start, &mut fbuf[..len], out, threads);
        }
    })
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
