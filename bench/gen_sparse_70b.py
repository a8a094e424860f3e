#!/usr/bin/env python3
"""Writes Llama-3.1-70B-shaped checkpoints as SPARSE files, for planning and runs at 70B scale
without 70B of weights (docs/scaling.md).

Each model is a Hugging Face folder: config.json, model.safetensors.index.json and 30
model-000NN-of-00030.safetensors shards whose safetensors headers are real and whose tensor
data is a hole (the file is extended with truncate), so a 141 GB bf16 checkpoint costs a few
megabytes of disk. Reading a hole yields zeros: merges run and are timed, their output is zeros.

    bench/gen_sparse_70b.py OUT_DIR [--models base,m1,m2,m3] [--layers N]

`--layers N` (default 80) writes the same shapes with only the first N decoder layers (the
embeddings, final norm and lm_head stay), in proportionally fewer shards: a 70B-shaped subset
for runs that cannot move a whole 70B (docs/scaling.md's distributed run over S3).

Shapes: 80 layers, hidden 8192, intermediate 28672, vocab 128256, 64 heads of which 8 for
keys/values (grouped-query attention), untied lm_head; 70.6B parameters, 141.1 GB in bf16.
"""

import argparse
import json
import os
import struct

LAYERS = 80
HIDDEN = 8192
INTERMEDIATE = 28672
VOCAB = 128256
HEADS = 64
KV_HEADS = 8
HEAD_DIM = HIDDEN // HEADS
SHARDS = 30


def tensors(layers=LAYERS):
    """(name, shape) in the order Hugging Face writes a Llama checkpoint."""
    yield "model.embed_tokens.weight", [VOCAB, HIDDEN]
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", [HIDDEN]
        yield p + "mlp.down_proj.weight", [HIDDEN, INTERMEDIATE]
        yield p + "mlp.gate_proj.weight", [INTERMEDIATE, HIDDEN]
        yield p + "mlp.up_proj.weight", [INTERMEDIATE, HIDDEN]
        yield p + "post_attention_layernorm.weight", [HIDDEN]
        yield p + "self_attn.k_proj.weight", [KV_HEADS * HEAD_DIM, HIDDEN]
        yield p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]
        yield p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]
        yield p + "self_attn.v_proj.weight", [KV_HEADS * HEAD_DIM, HIDDEN]
    yield "model.norm.weight", [HIDDEN]
    yield "lm_head.weight", [VOCAB, HIDDEN]


def nbytes(shape):
    n = 2  # bf16
    for d in shape:
        n *= d
    return n


def shards(layers=LAYERS):
    """Splits the tensors into files of about equal size (SHARDS for the whole model, as many
    fewer as there are fewer layers), in order: a tensor goes to the shard its middle byte falls
    in."""
    all_t = list(tensors(layers))
    total = sum(nbytes(s) for _, s in all_t)
    whole = sum(nbytes(s) for _, s in tensors())
    count = max(1, round(SHARDS * total / whole))
    target = total / count
    out = [[] for _ in range(count)]
    cum = 0
    for name, shape in all_t:
        n = nbytes(shape)
        out[min(count - 1, int((cum + n / 2) // target))].append((name, shape))
        cum += n
    return [g for g in out if g], total


def write_model(d, layers=LAYERS):
    os.makedirs(d, exist_ok=True)
    groups, total = shards(layers)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, off = {}, 0
        for name, shape in group:
            n = nbytes(shape)
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
            weight_map[name] = fname
            off += n
        header["__metadata__"] = {"format": "pt"}
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        path = os.path.join(d, fname)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(h)))
            f.write(h)
            f.truncate(8 + len(h) + off)  # the data: a hole
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(groups), total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--models", default="base,m1,m2,m3")
    ap.add_argument("--layers", type=int, default=LAYERS)
    a = ap.parse_args()
    if not 1 <= a.layers <= LAYERS:
        ap.error(f"--layers must be 1-{LAYERS}")
    for m in a.models.split(","):
        n, total = write_model(os.path.join(a.out, m), a.layers)
        params = total // 2
        print(f"{os.path.join(a.out, m)}: {n} shards, {params / 1e9:.2f}B parameters, "
              f"{total / 1e9:.1f} GB (sparse)")


if __name__ == "__main__":
    main()
