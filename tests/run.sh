#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the engine suites (parity with mergekit, split
# invariance, layouts, faults, CLI, memory) and the multi-process suites (coordinator + workers
# + a real S3 server on loopback), then tests/archs.sh: every architecture fixture merged,
# loaded in transformers and compared with mergekit (its first run makes a Python venv with
# torch, transformers and mergekit from PyPI). SHARDMERGE_SKIP_ARCHS=1 leaves that out.
#
# The S3 suites use MinIO when a `minio` binary is on PATH, otherwise Garage; when neither is
# installed, this installs Garage from crates.io first (a one-time build of about 10 minutes on
# 2 cores). Nothing else is needed beyond a Rust toolchain: protos compile in pure Rust (protox).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v minio >/dev/null 2>&1 && ! command -v garage >/dev/null 2>&1; then
    echo "tests/run.sh: no S3 server found; installing Garage from crates.io (one time)" >&2
    cargo install --locked garage --version 2.5.0 \
        --no-default-features --features bundled-libs,lmdb
fi

# --no-fail-fast: a failing suite does not hide the results of the ones after it.
# cargo's last "test result" line is the (empty) doc-test run of the last crate; finish with
# the totals over every suite instead.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' "$log"
if [[ -z ${SHARDMERGE_SKIP_ARCHS:-} ]]; then
    echo "== tests/archs.sh (transformers + mergekit)"
    tests/archs.sh || status=$?
fi
exit "$status"
