"""Checks a shardmerge report.json against an independent numpy computation.

usage: numpy_check.py REPORT_JSON [SWEEP_OUT]   (run from the folder the recipe's model paths
are relative to; SWEEP_OUT: the folder holding the checkpoints of the report's distance_points)

Reads every model's safetensors (bf16/f16/f32, sharded or not) with numpy alone, computes each
reported tensor's figures and the per-layer, per-kind and whole-model figures from them, and
compares: counts exactly, the rest within a relative 1e-9. Prints `numpy check: N figures
match` and exits 0, or lists the mismatches and exits 1.
"""
import json
import math
import os
import struct
import sys

import numpy as np

REL = 1e-9


def read_tensors(folder):
    """name -> float32 array of every floating-point tensor of a checkpoint folder."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            raw = f.read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        data = raw[8 + n :]
        for t, info in header.items():
            if t == "__metadata__":
                continue
            a, b = info["data_offsets"]
            buf = data[a:b]
            dt = info["dtype"]
            if dt == "BF16":
                u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
                v = u.view(np.float32)
            elif dt == "F16":
                v = np.frombuffer(buf, dtype="<f2").astype(np.float32)
            elif dt == "F32":
                v = np.frombuffer(buf, dtype="<f4").astype(np.float32)
            else:
                continue
            out[t] = v.reshape(-1)
    return out


def tensor_sums(base, xs, densities, points=()):
    """The exact-in-spirit sums and counts of one tensor (f64 sums of f32 deltas); `points`:
    sweep points' tensors, each one's squared distance from the base."""
    b64 = base.astype(np.float64)
    deltas = [(x - base).astype(np.float32) for x in xs]  # float32 subtraction
    d64 = [d.astype(np.float64) for d in deltas]
    m, n = len(xs), base.size
    s = {"elements": n, "base_sq": float(np.dot(b64, b64))}
    s["sq"] = [float(np.dot(d, d)) for d in d64]
    s["dot"], s["both"], s["agree"] = [], [], []
    for i in range(m):
        for j in range(i + 1, m):
            s["dot"].append(float(np.dot(d64[i], d64[j])))
            both = (deltas[i] != 0) & (deltas[j] != 0)
            same = (deltas[i] > 0) == (deltas[j] > 0)
            s["both"].append(int(both.sum()))
            s["agree"].append(int((both & same).sum()))
    if points:
        dist = [(p - base).astype(np.float32).astype(np.float64) for p in points]
        s["dist_sq"] = [float(np.dot(d, d)) for d in dist]
    s["overlap"], s["conflicts"] = [], []
    for d in densities:
        k = min(max(1, int(d * n)), n)
        pos = np.zeros(n, bool)
        neg = np.zeros(n, bool)
        kept = np.zeros(n, np.int64)
        for delta in deltas:
            # ascending (|delta|, index); the k largest are kept
            order = np.argsort(np.abs(delta), kind="stable")
            t = np.zeros(n, np.float32)
            t[order[n - k :]] = delta[order[n - k :]]
            pos |= t > 0
            neg |= t < 0
            kept += t != 0
        s["overlap"].append(int((kept >= 2).sum()))
        s["conflicts"].append(int((pos & neg).sum()))
    return s


def add(a, b):
    if a is None:
        return json.loads(json.dumps(b))
    out = {}
    for k, v in a.items():
        out[k] = [x + y for x, y in zip(v, b[k])] if isinstance(v, list) else v + b[k]
    return out


def ratio(a, b):
    return None if b == 0 else a / b


def figures(s):
    m = len(s["sq"])
    norms = [math.sqrt(x) for x in s["sq"]]
    base = math.sqrt(s["base_sq"])
    cos, agree, k = [], [], 0
    for i in range(m):
        for j in range(i + 1, m):
            cos.append(ratio(s["dot"][k], norms[i] * norms[j]))
            agree.append(ratio(s["agree"][k], s["both"][k]))
            k += 1
    out = {
        "elements": s["elements"],
        "base_norm": base,
        "norm": norms,
        "norm_ratio": [ratio(x, base) for x in norms],
        "cosine": cos,
        "sign_agreement": agree,
        "both_nonzero": s["both"],
        "conflict_rate": [ratio(c, s["elements"]) for c in s["conflicts"]],
        "conflicts": s["conflicts"],
        "overlap": s["overlap"],
    }
    if "dist_sq" in s:
        dist = [math.sqrt(x) for x in s["dist_sq"]]
        out["distance"] = dist
        out["distance_ratio"] = [ratio(x, base) for x in dist]
    return out


def compare(where, got, want, bad):
    count = 0
    for key, w in want.items():
        g = got[key]
        ws = w if isinstance(w, list) else [w]
        gs = g if isinstance(g, list) else [g]
        if len(ws) != len(gs):
            bad.append(f"{where} {key}: {len(gs)} values, numpy has {len(ws)}")
            continue
        for i, (a, b) in enumerate(zip(gs, ws)):
            count += 1
            if a is None or b is None:
                ok = a is None and b is None
            elif isinstance(b, int) and not isinstance(b, bool) and key not in ("base_norm",):
                ok = a == b if isinstance(a, int) else abs(a - b) <= REL * abs(b)
            else:
                ok = abs(a - b) <= REL * max(abs(b), 1e-300)
            if not ok:
                bad.append(f"{where} {key}[{i}]: report {a}, numpy {b}")
    return count


def main():
    with open(sys.argv[1]) as f:
        rep = json.load(f)
    base = read_tensors(rep["base"])
    models = [read_tensors(m) for m in rep["models"]]
    ds = rep["densities"]
    names = rep.get("distance_points", [])
    if names and len(sys.argv) < 3:
        sys.exit("the report measured sweep points: pass the sweep's folder as SWEEP_OUT")
    points = [read_tensors(os.path.join(sys.argv[2], p)) for p in names]
    bad, count = [], 0
    groups = {}
    for t in rep["tensors"]:
        name = t["name"]
        s = tensor_sums(base[name], [m[name] for m in models], ds, [p[name] for p in points])
        count += compare(f"tensor {name}", t, figures(s), bad)
        keys = [("kind", t["kind"]), ("total", "all")]
        if t["layer"] is not None:
            keys.append(("layer", t["layer"]))
        for k in keys:
            groups[k] = add(groups.get(k), s)
    for e in rep["layers"]:
        count += compare(f"layer {e['layer']}", e, figures(groups[("layer", e["layer"])]), bad)
    for e in rep["kinds"]:
        count += compare(f"kind {e['kind']}", e, figures(groups[("kind", e["kind"])]), bad)
    count += compare("total", rep["total"], figures(groups[("total", "all")]), bad)
    if len(rep["layers"]) != len([k for k in groups if k[0] == "layer"]):
        bad.append("the report's layers are not the tensors' layers")
    if bad:
        print("\n".join(bad[:50]))
        print(f"numpy check: {len(bad)} of {count} figures differ")
        sys.exit(1)
    print(f"numpy check: {count} figures match")


main()
