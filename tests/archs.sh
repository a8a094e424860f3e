#!/usr/bin/env bash
# Real architectures, checked as a user would: merges every case of tests/fixtures/archs with
# shardmerge, loads each output in transformers and compares logits (and, where the Rust suite
# cannot compare bit for bit, every tensor) with mergekit's, then does the same for the
# vocabulary cases (tests/fixtures/vocab: tokens and logits), then extracts the LoRA adapters of
# tests/fixtures/extract and loads them with peft against mergekit's. Logits are compared within a
# tolerance that holds across CPUs; tensors bit for bit are coordinator/tests/archs.rs's job.
# See tests/fixtures/archs/README.md. Each case prints ok or FAILED; each suite ends with
# `archs: N passed, N failed in Ts` / `lora: ...` / `vocab: ...` / `extract: ...` (tests/run.sh reads
# those lines).
# The LoRA suite (tests/fixtures/archs/lora_check.py) makes peft adapters on four of the
# architectures and checks `model+adapter` merges against peft and a live mergekit run.
#
# usage: tests/archs.sh [CASE ...]
#
# The first run creates a virtual environment (.venv-archs, or $ARCHS_VENV) with every package
# pinned by tests/fixtures/archs/requirements.txt (torch, transformers, mergekit and all they
# pull in; about 3 GB with torch's CUDA wheels, 1-2 minutes on a fast link); later runs bring
# it back to the pins if it drifted. Set ARCHS_VENV to use another environment.
# The binary checked is the release build (README command 1 builds it; CARGO_TARGET_DIR is
# respected).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
VENV=$(realpath -m "${ARCHS_VENV:-.venv-archs}")
REQ=tests/fixtures/archs/requirements.txt

[[ -x $VENV/bin/python ]] || {
    echo "tests/archs.sh: creating $VENV with the pinned packages of $REQ" >&2
    python3 -m venv "$VENV"
}
# every run: brings the venv to the pins (pip only reads what is installed when it matches)
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"

bin=$(tests/shardmerge-bin.sh)
# transformers' and mergekit's progress bars and notices are not what this checks
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
status=0
"$VENV/bin/python" tests/fixtures/archs/check.py "$bin" "$@" || status=$?
if [[ $# -eq 0 ]]; then
    echo "== tests/fixtures/archs/lora_check.py (LoRA adapters made by peft, against peft and mergekit)"
    "$VENV/bin/python" tests/fixtures/archs/lora_check.py "$bin" || status=$?
    echo "== tests/fixtures/vocab/check.sh (tokenizers and logits against mergekit)"
    ARCHS_VENV=$VENV tests/fixtures/vocab/check.sh "$bin" || status=$?
    echo "== tests/fixtures/extract/check.py (extract-lora adapters loaded by peft, against mergekit's)"
    "$VENV/bin/python" tests/fixtures/extract/check.py "$bin" || status=$?
fi
exit "$status"
