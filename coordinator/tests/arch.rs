//! Architectures beyond the Llama layout: tiny synthetic checkpoints with each family's tensor
//! names and config keys, merged end to end (real files, the embedded runner), checking which
//! input each output tensor comes from and every layer-indexed config field.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use serde_json::{json, Value};
use shardmerge_worker::format::dtype::{self, DType};
use shardmerge_worker::format::safetensors::LayoutEntry;

const H: u64 = 8;
const VOCAB: u64 = 16;

/// A tensor of `shape` whose values are all distinct and say which model (`seed`) they came
/// from.
fn tensor(shape: &[u64], seed: u64, salt: u64) -> Tensor {
    let n: u64 = shape.iter().product();
    let values = (0..n)
        .map(|i| (seed * 1000 + salt * 7 + i % 97) as f32 / 1024.0)
        .collect();
    Tensor {
        dtype: DType::F32,
        shape: shape.to_vec(),
        values,
        raw: Vec::new(),
    }
}

/// Writes a model of `names` (with shapes) and `config` into `dir`.
fn model(dir: &Path, config: &Value, names: &[(String, Vec<u64>)], seed: u64) {
    let t: BTreeMap<String, Tensor> = names
        .iter()
        .enumerate()
        .map(|(k, (n, s))| (n.clone(), tensor(s, seed, k as u64)))
        .collect();
    write(dir, &t, DType::F32, None, None);
    std::fs::write(dir.join("config.json"), serde_json::to_vec(config).unwrap()).unwrap();
}

/// Writes a checkpoint of tensors given as (dtype, shape, raw bytes) into `dir`.
fn write_raw(dir: &Path, tensors: &BTreeMap<String, (DType, Vec<u64>, Vec<u8>)>) {
    let entries: Vec<LayoutEntry> = tensors
        .iter()
        .map(|(n, (dt, shape, _))| writer::entry(n, *dt, shape))
        .collect();
    let raw: Vec<&[u8]> = tensors.values().map(|(_, _, b)| b.as_slice()).collect();
    writer::write_checkpoint(dir, &entries, None, &mut |i, start, out| {
        let at = start as usize * entries[i].dtype.size();
        out.copy_from_slice(&raw[i][at..at + out.len()]);
    })
    .unwrap();
}

/// A Pythia-style GPT-NeoX model: f32 weights plus, in every layer, a BOOL causal mask
/// (`attention.bias`) and an I64 buffer, whose values are `mask_seed`-dependent when nonzero.
fn neox_with_buffers(dir: &Path, seed: u64, mask_seed: u8, ids: DType) {
    std::fs::create_dir_all(dir).unwrap();
    let mut t = BTreeMap::new();
    for (k, (n, shape)) in neox_names(2).into_iter().enumerate() {
        let v = tensor(&shape, seed, k as u64).values;
        let mut b = vec![0u8; v.len() * 4];
        dtype::encode(DType::F32, &v, &mut b);
        t.insert(n, (DType::F32, shape, b));
    }
    for l in 0..2 {
        let mask: Vec<u8> = (0..16u8)
            .map(|i| ((i % 4 <= i / 4) as u8) ^ (mask_seed & (i == 3) as u8))
            .collect();
        t.insert(
            format!("gpt_neox.layers.{l}.attention.bias"),
            (DType::Bool, vec![1, 1, 4, 4], mask),
        );
        let vals: Vec<f32> = (0..6).map(|i| i as f32 - 2.0).collect();
        let mut b = vec![0u8; 6 * ids.size()];
        dtype::encode(ids, &vals, &mut b);
        t.insert(
            format!("gpt_neox.layers.{l}.position_ids"),
            (ids, vec![6], b),
        );
    }
    write_raw(dir, &t);
    let cfg = json!({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
                     "num_hidden_layers": 2, "torch_dtype": "float32"});
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
}

/// GPT-2's tensors (tied output head: no `lm_head.weight`).
fn gpt2_names(layers: u64) -> Vec<(String, Vec<u64>)> {
    let mut v = vec![
        ("transformer.wte.weight".to_string(), vec![VOCAB, H]),
        ("transformer.wpe.weight".to_string(), vec![32, H]),
    ];
    for l in 0..layers {
        for (p, s) in [
            ("attn.c_attn.weight", vec![H, 3 * H]),
            ("attn.c_attn.bias", vec![3 * H]),
            ("attn.c_proj.weight", vec![H, H]),
            ("ln_1.weight", vec![H]),
            ("ln_2.weight", vec![H]),
            ("mlp.c_fc.weight", vec![H, 4 * H]),
            ("mlp.c_proj.weight", vec![4 * H, H]),
        ] {
            v.push((format!("transformer.h.{l}.{p}"), s));
        }
    }
    v.push(("transformer.ln_f.weight".into(), vec![H]));
    v.push(("transformer.ln_f.bias".into(), vec![H]));
    v
}

fn neox_names(layers: u64) -> Vec<(String, Vec<u64>)> {
    let mut v = vec![("gpt_neox.embed_in.weight".to_string(), vec![VOCAB, H])];
    for l in 0..layers {
        for (p, s) in [
            ("attention.query_key_value.weight", vec![3 * H, H]),
            ("attention.dense.weight", vec![H, H]),
            ("input_layernorm.weight", vec![H]),
            ("mlp.dense_h_to_4h.weight", vec![4 * H, H]),
        ] {
            v.push((format!("gpt_neox.layers.{l}.{p}"), s));
        }
    }
    v.push(("gpt_neox.final_layer_norm.weight".into(), vec![H]));
    v.push(("embed_out.weight".into(), vec![VOCAB, H]));
    v
}

/// Llama-layout names (Qwen2, Gemma2, Mixtral, ... share them); `lm_head` unless tied.
fn llama_names(layers: u64, lm_head: bool) -> Vec<(String, Vec<u64>)> {
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, H])];
    for l in 0..layers {
        for p in [
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        ] {
            let s = if p.contains("norm") {
                vec![H]
            } else {
                vec![H, H]
            };
            v.push((format!("model.layers.{l}.{p}"), s));
        }
    }
    v.push(("model.norm.weight".into(), vec![H]));
    if lm_head {
        v.push(("lm_head.weight".into(), vec![VOCAB, H]));
    }
    v
}

fn config_of(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.shape == b.shape && a.values == b.values
}

async fn merge(dir: &Path, recipe: &str) -> std::path::PathBuf {
    let out = dir.join("out");
    run(recipe, dir, &out, 2, 1 << 20, 1 << 26).await.unwrap();
    out
}

/// GPT-2 names its layers `transformer.h.N.` and counts them in `n_layer`: slices work, layers
/// come from the right inputs, `n_layer` is the output's count, the position embedding comes
/// from the first slice and the final norm from the last.
#[tokio::test]
async fn gpt2_slices() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 4,
                     "n_embd": H, "vocab_size": VOCAB, "torch_dtype": "float32"});
    model(&dir.path().join("a"), &cfg, &gpt2_names(4), 1);
    model(&dir.path().join("b"), &cfg, &gpt2_names(4), 2);
    let recipe = "merge_method: passthrough\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 3]\n- sources:\n  - model: b\n    layer_range: [1, 4]\n";
    let out = merge(dir.path(), recipe).await;
    let (a, b, o) = (
        load(&dir.path().join("a")),
        load(&dir.path().join("b")),
        load(&out),
    );
    assert_eq!(config_of(&out)["n_layer"], 6);
    assert!(config_of(&out).get("num_hidden_layers").is_none());
    for (j, (src, l)) in [(&a, 0), (&a, 1), (&a, 2), (&b, 1), (&b, 2), (&b, 3)]
        .into_iter()
        .enumerate()
    {
        for p in [
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "mlp.c_proj.weight",
        ] {
            let got = &o[&format!("transformer.h.{j}.{p}")];
            assert!(
                same(got, &src[&format!("transformer.h.{l}.{p}")]),
                "{j} {p}"
            );
        }
    }
    assert!(same(
        &o["transformer.wpe.weight"],
        &a["transformer.wpe.weight"]
    ));
    assert!(same(
        &o["transformer.wte.weight"],
        &a["transformer.wte.weight"]
    ));
    assert!(same(
        &o["transformer.ln_f.bias"],
        &b["transformer.ln_f.bias"]
    ));
    assert_eq!(o.len(), 2 + 6 * 7 + 2);
}

/// GPT-NeoX's output projection `embed_out` sits after the layers: a frankenmerge takes it
/// from the last slice (with the final norm), the input embedding from the first.
#[tokio::test]
async fn neox_embed_out_from_last_slice() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
                     "num_hidden_layers": 4, "hidden_size": H, "vocab_size": VOCAB});
    model(&dir.path().join("a"), &cfg, &neox_names(4), 1);
    model(&dir.path().join("b"), &cfg, &neox_names(4), 2);
    let recipe = "merge_method: passthrough\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 2]\n- sources:\n  - model: b\n    layer_range: [2, 4]\n";
    let out = merge(dir.path(), recipe).await;
    let (a, b, o) = (
        load(&dir.path().join("a")),
        load(&dir.path().join("b")),
        load(&out),
    );
    assert!(same(&o["embed_out.weight"], &b["embed_out.weight"]));
    assert!(same(
        &o["gpt_neox.embed_in.weight"],
        &a["gpt_neox.embed_in.weight"]
    ));
    assert!(same(
        &o["gpt_neox.final_layer_norm.weight"],
        &b["gpt_neox.final_layer_norm.weight"]
    ));
    assert!(same(
        &o["gpt_neox.layers.3.attention.dense.weight"],
        &b["gpt_neox.layers.3.attention.dense.weight"]
    ));
    assert_eq!(config_of(&out)["num_hidden_layers"], 4);
}

/// Qwen2 and Gemma2 keep one `layer_types` entry per layer: a frankenmerge's output has one
/// per output layer, each the entry of the layer it was taken from.
#[tokio::test]
async fn layer_types_follow_the_layers() {
    for (arch, mt, types) in [
        (
            "Qwen2ForCausalLM",
            "qwen2",
            [
                "full_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
            ],
        ),
        (
            "Gemma2ForCausalLM",
            "gemma2",
            [
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention",
            ],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = json!({"architectures": [arch], "model_type": mt, "num_hidden_layers": 4,
                         "layer_types": types, "dtype": "float32"});
        // the second model lists its layers the other way round
        let mut rev = types;
        rev.reverse();
        let cfg_b = json!({"architectures": [arch], "model_type": mt, "num_hidden_layers": 4,
                           "layer_types": rev, "dtype": "float32"});
        model(&dir.path().join("a"), &cfg, &llama_names(4, false), 1);
        model(&dir.path().join("b"), &cfg_b, &llama_names(4, false), 2);
        let recipe = "merge_method: passthrough\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 4]\n- sources:\n  - model: b\n    layer_range: [1, 3]\n";
        let out = merge(dir.path(), recipe).await;
        let c = config_of(&out);
        assert_eq!(c["num_hidden_layers"], 6, "{mt}");
        let want: Vec<&str> = types.iter().copied().chain([rev[1], rev[2]]).collect();
        assert_eq!(c["layer_types"], json!(want), "{mt}");
        // a plain merge keeps them as they are
        let recipe = "merge_method: linear\nmodels:\n- model: a\n  parameters: {weight: 1}\n- model: b\n  parameters: {weight: 1}\n";
        std::fs::remove_dir_all(&out).unwrap();
        let out = merge(dir.path(), recipe).await;
        assert_eq!(config_of(&out)["layer_types"], json!(types), "{mt}");
    }
}

/// A model whose config lists the wrong number of `layer_types` is refused, naming the key.
#[tokio::test]
async fn inconsistent_layer_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                     "num_hidden_layers": 4, "layer_types": ["full_attention"]});
    model(&dir.path().join("a"), &cfg, &llama_names(4, false), 1);
    let recipe =
        "merge_method: passthrough\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 2]\n";
    let e = run(
        recipe,
        dir.path(),
        &dir.path().join("out"),
        1,
        1 << 20,
        1 << 26,
    )
    .await
    .unwrap_err();
    assert!(e.contains("layer_types") && e.contains("4 layers"), "{e}");
}

/// Qwen-MoE's `mlp_only_layers` lists layer indices: renumbered for the output's layers.
#[tokio::test]
async fn layer_index_lists_are_renumbered() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                     "num_hidden_layers": 4, "mlp_only_layers": [1, 3]});
    model(&dir.path().join("a"), &cfg, &llama_names(4, true), 1);
    let recipe = "merge_method: passthrough\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 2]\n- sources:\n  - model: a\n    layer_range: [1, 4]\n";
    let out = merge(dir.path(), recipe).await;
    let c = config_of(&out);
    assert_eq!(c["num_hidden_layers"], 5);
    // output layers come from 0 1 | 1 2 3
    assert_eq!(c["mlp_only_layers"], json!([1, 2, 4]));
}

/// A model with tied embeddings (no `lm_head.weight`) merged with one that has an output head:
/// the tied model's head is its input embedding.
#[tokio::test]
async fn tied_head_reads_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "num_hidden_layers": 2});
    model(&dir.path().join("a"), &cfg, &llama_names(2, true), 1);
    model(&dir.path().join("b"), &cfg, &llama_names(2, false), 2);
    let recipe = "merge_method: linear\nmodels:\n- model: a\n  parameters: {weight: 1}\n- model: b\n  parameters: {weight: 1}\n";
    let out = merge(dir.path(), recipe).await;
    let (a, b, o) = (
        load(&dir.path().join("a")),
        load(&dir.path().join("b")),
        load(&out),
    );
    let head = &o["lm_head.weight"].values;
    let want: Vec<f32> = a["lm_head.weight"]
        .values
        .iter()
        .zip(&b["model.embed_tokens.weight"].values)
        .map(|(x, y)| (x + y) / 2.0)
        .collect();
    assert_eq!(head, &want);
}

/// The output's dtype goes under both `dtype` (transformers 5) and `torch_dtype` when the
/// input config has either.
#[tokio::test]
async fn dtype_under_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "num_hidden_layers": 2, "dtype": "bfloat16"});
    model(&dir.path().join("a"), &cfg, &llama_names(2, true), 1);
    let recipe = "merge_method: passthrough\nout_dtype: float32\nmodels:\n- model: a\n";
    let out = merge(dir.path(), recipe).await;
    let c = config_of(&out);
    assert_eq!(c["dtype"], "float32");
    assert_eq!(c["torch_dtype"], "float32");
}

/// Models of architectures whose tensors are named differently can't be merged.
#[tokio::test]
async fn mixed_architectures_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gpt2 = json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2});
    let llama = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                       "num_hidden_layers": 2});
    model(&dir.path().join("a"), &gpt2, &gpt2_names(2), 1);
    model(&dir.path().join("b"), &llama, &llama_names(2, true), 2);
    let recipe = "merge_method: linear\nmodels:\n- model: a\n  parameters: {weight: 1}\n- model: b\n  parameters: {weight: 1}\n";
    let e = run(
        recipe,
        dir.path(),
        &dir.path().join("out"),
        1,
        1 << 20,
        1 << 26,
    )
    .await
    .unwrap_err();
    assert!(e.contains("gpt2") && e.contains("llama"), "{e}");
}

/// BOOL and integer tensors are not merged but copied, byte for byte and in their own dtype,
/// from the base model; the plan lists them.
#[tokio::test]
async fn non_float_tensors_are_copied_from_the_base() {
    let dir = tempfile::tempdir().unwrap();
    neox_with_buffers(&dir.path().join("a"), 1, 0, DType::I64);
    neox_with_buffers(&dir.path().join("b"), 2, 0, DType::I64);
    let recipe = "merge_method: task_arithmetic\nbase_model: a\ndtype: bfloat16\nmodels:\n- model: b\n  parameters: {weight: 0.5}\n";
    let out = merge(dir.path(), recipe).await;
    let (a, o) = (load(&dir.path().join("a")), load(&out));
    for l in 0..2 {
        for n in ["attention.bias", "position_ids"] {
            let name = format!("gpt_neox.layers.{l}.{n}");
            assert_eq!(o[&name].dtype, a[&name].dtype, "{name}");
            assert_eq!(o[&name].raw, a[&name].raw, "{name}");
            assert_eq!(o[&name].shape, a[&name].shape, "{name}");
        }
    }
    assert_eq!(o["embed_out.weight"].dtype, DType::BF16);
    // the plan says so
    let o2 = shardmerge::job::SubmitOptions {
        base_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let info = shardmerge::planinfo::describe(
        recipe,
        &o2,
        1,
        &shardmerge_worker::storage::Resolver::new(),
    )
    .await
    .unwrap();
    let text = info.to_text();
    assert!(text.contains("copied       4 non-float tensors"), "{text}");
    assert_eq!(info.to_json()["copied"].as_array().unwrap().len(), 4);
}

/// Non-float tensors that differ in dtype are refused when planning, and in value when the
/// worker copies them; both errors name the tensor.
#[tokio::test]
async fn disagreeing_non_float_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    neox_with_buffers(&dir.path().join("a"), 1, 0, DType::I64);
    neox_with_buffers(&dir.path().join("b"), 2, 0, DType::I32);
    neox_with_buffers(&dir.path().join("c"), 3, 1, DType::I64);
    let recipe = |m: &str| {
        format!("merge_method: linear\nmodels:\n- model: a\n  parameters: {{weight: 1}}\n- model: {m}\n  parameters: {{weight: 1}}\n")
    };
    let e = run(
        &recipe("b"),
        dir.path(),
        &dir.path().join("o1"),
        1,
        1 << 20,
        1 << 26,
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("gpt_neox.layers.0.position_ids") && e.contains("I32") && e.contains("I64"),
        "{e}"
    );
    let e = run(
        &recipe("c"),
        dir.path(),
        &dir.path().join("o2"),
        1,
        1 << 20,
        1 << 26,
    )
    .await
    .unwrap_err();
    assert!(e.contains("attention.bias") && e.contains("differ"), "{e}");
}

/// Embeddings of different vocabulary sizes are refused with guidance; with
/// --unsafe-truncate-embeddings the common rows are merged.
#[tokio::test]
async fn vocabulary_mismatch_is_refused_unless_truncating() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "num_hidden_layers": 2});
    model(&dir.path().join("a"), &cfg, &llama_names(2, true), 1);
    let mut big = llama_names(2, true);
    for (n, s) in &mut big {
        if n.contains("embed_tokens") || n.starts_with("lm_head") {
            s[0] = VOCAB + 4;
        }
    }
    model(&dir.path().join("b"), &cfg, &big, 2);
    let recipe = "merge_method: linear\nmodels:\n- model: a\n  parameters: {weight: 1}\n- model: b\n  parameters: {weight: 1}\n";
    let e = run(
        recipe,
        dir.path(),
        &dir.path().join("o1"),
        1,
        1 << 20,
        1 << 26,
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("vocabularies differ")
            && e.contains("tokenizer_source")
            && e.contains("--unsafe-truncate-embeddings"),
        "{e}"
    );
    let out = dir.path().join("o2");
    run_truncating(recipe, dir.path(), &out, 1, 1 << 20, 1 << 26)
        .await
        .unwrap();
    assert_eq!(
        load(&out)["model.embed_tokens.weight"].shape,
        vec![VOCAB, H]
    );
}

/// With `dtype: bfloat16` every task-arithmetic operation rounds to bfloat16, as mergekit's
/// torch code does (inputs loaded in bf16, the delta, the weighted delta and the sum rounded);
/// `compute_float32`
/// (`--compute-dtype float32`) computes in f32 instead.
#[tokio::test]
async fn bf16_recipe_dtype_computes_op_by_op() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "num_hidden_layers": 1});
    model(&dir.path().join("a"), &cfg, &llama_names(1, true), 1);
    model(&dir.path().join("b"), &cfg, &llama_names(1, true), 2);
    let recipe = "merge_method: task_arithmetic\nbase_model: a\ndtype: bfloat16\nout_dtype: float32\nmodels:\n- model: b\n  parameters: {weight: 0.7}\n";
    let out = merge(dir.path(), recipe).await;
    let (a, b, o) = (
        load(&dir.path().join("a")),
        load(&dir.path().join("b")),
        load(&out),
    );
    let bf = |x: f32| {
        let mut b = [0u8; 2];
        dtype::encode(DType::BF16, &[x], &mut b);
        let mut v = [0f32];
        dtype::decode(DType::BF16, &b, &mut v);
        v[0]
    };
    let wb = bf(0.7);
    for (name, t) in &o {
        let want: Vec<f32> = a[name]
            .values
            .iter()
            .zip(&b[name].values)
            .map(|(&x, &y)| bf(bf(x) + bf(bf(bf(y) - bf(x)) * wb)))
            .collect();
        assert_eq!(t.values, want, "{name}");
    }
    let f32_out = dir.path().join("f32");
    run_opts(
        recipe,
        &f32_out,
        1,
        shardmerge::job::SubmitOptions {
            base_dir: dir.path().to_path_buf(),
            compute_float32: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let f = load(&f32_out);
    assert!(o.iter().any(|(n, t)| t.values != f[n].values));
}
