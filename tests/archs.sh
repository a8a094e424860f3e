#!/usr/bin/env bash
# Real architectures, checked as a user would: merges every case of tests/fixtures/archs with
# shardmerge, loads each output in transformers and compares logits (and, where the Rust suite
# cannot compare bit for bit, every tensor) with mergekit's, then does the same for the
# vocabulary cases (tests/fixtures/vocab: tokens and logits). See tests/fixtures/archs/README.md.
#
# usage: tests/archs.sh [CASE ...]
#
# The first run creates a virtual environment (.venv-archs, or $ARCHS_VENV) with the pinned
# torch, transformers and mergekit from PyPI (about 3 GB with torch's CUDA wheels; 1-2 minutes
# on a fast link). Set ARCHS_VENV to reuse another environment that has them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
VENV=$(realpath -m "${ARCHS_VENV:-.venv-archs}")
REQ=tests/fixtures/archs/requirements.txt

if ! "$VENV/bin/python" -c 'import torch, transformers, mergekit' 2>/dev/null; then
    echo "tests/archs.sh: creating $VENV with $(grep -v '^#' "$REQ" | tr '\n' ' ')" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
fi

cargo build --quiet -p shardmerge --bin shardmerge
# transformers' and mergekit's progress bars and notices are not what this checks
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
status=0
"$VENV/bin/python" tests/fixtures/archs/check.py target/debug/shardmerge "$@" || status=$?
if [[ $# -eq 0 ]]; then
    echo "== tests/fixtures/vocab/check.sh (tokenizers and logits against mergekit)"
    ARCHS_VENV=$VENV tests/fixtures/vocab/check.sh "$PWD/target/debug/shardmerge" || status=$?
fi
exit "$status"
