#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the engine suites (parity with mergekit, split
# invariance, layouts, faults, CLI, memory) and the multi-process suites (coordinator + workers
# + a real S3 server on loopback), then tests/archs.sh: every architecture fixture merged,
# loaded in transformers and compared with mergekit (its first run makes a Python venv with
# torch, transformers and mergekit from PyPI). SHARDMERGE_SKIP_ARCHS=1 leaves that out.
#
# The cargo suites run in the release profile: README command 1 already built it (with
# CARGO_TARGET_DIR, wherever that points), so the dependencies are not built a second time in
# the debug profile. Arguments go to `cargo test` (e.g. `tests/run.sh -- --skip s3`).
#
# It ends with one table (each suite: passed, failed, skipped, time) and a last line
# `N passed, N failed, N skipped`; the exit code is 0 exactly when nothing failed (a suite that
# did not build or crashed counts as a failure).
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

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
rows=$logs/rows # suite, passed, failed, skipped, seconds (tab-separated)
: >"$rows"
start=$SECONDS

# --no-fail-fast: a failing suite does not hide the results of the ones after it.
cargo_rc=0
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$logs/cargo" || cargo_rc=$?
# One row per test binary: "Running tests/cli.rs (.../deps/cli-HASH)" (the package is the one
# of the last `unittests src/lib.rs` seen: cargo runs each package's lib tests first), or
# "Doc-tests CRATE", then its "test result:" line. A binary without a result line crashed.
awk -v OFS='\t' '
    function flush() { if (name != "") print name, 0, 1, 0, 0 "\tcrashed"; name = "" }
    /^ *Running / {
        flush()
        bin = $NF; sub(/^\(/, "", bin); sub(/\)$/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin)
        if ($2 == "unittests" && $3 == "src/lib.rs") pkg = bin
        name = ($2 == "unittests") ? bin " (" $3 ")" : pkg " " $2
        next
    }
    /^ *Doc-tests / { flush(); pkg = $2; name = $2 " (doc-tests)"; next }
    /^test result:/ && name != "" {
        t = $0; sub(/.*finished in /, "", t); sub(/s$/, "", t)
        print name, $4, $6, $8, t; name = ""
    }
    END { flush() }' "$logs/cargo" >>"$rows"
if [[ $cargo_rc -ne 0 ]] && ! awk -F'\t' '$3 > 0 { f = 1 } END { exit !f }' "$rows"; then
    # cargo failed and no suite reports a failure: it did not build (or stopped early)
    printf 'cargo test (exit %d: build failed?)\t0\t1\t0\t0\n' "$cargo_rc" >>"$rows"
fi
cargo_secs=$((SECONDS - start))

if [[ -z ${SHARDMERGE_SKIP_ARCHS:-} ]]; then
    echo "== tests/archs.sh (transformers + mergekit)"
    archs_rc=0
    tests/archs.sh 2>&1 | tee "$logs/archs" || archs_rc=$?
    # "archs: N passed, N failed in Ts", "lora: ...", "vocab: ..." and "extract: ..."
    sed -n 's/^\(archs\|lora\|vocab\|extract\): \([0-9]*\) passed, \([0-9]*\) failed in \([0-9]*\)s$/tests\/archs.sh \1\t\2\t\3\t0\t\4/p' \
        "$logs/archs" >>"$rows"
    if [[ $archs_rc -ne 0 ]] && ! grep -q 'FAILED$' "$logs/archs"; then
        printf 'tests/archs.sh (exit %d before any case failed)\t0\t1\t0\t0\n' "$archs_rc" >>"$rows"
    fi
else
    printf 'tests/archs.sh (skipped: SHARDMERGE_SKIP_ARCHS)\t0\t0\t0\t0\n' >>"$rows"
fi

echo
echo "== summary (cargo suites in the release profile; cargo build + run took ${cargo_secs}s)"
awk -F'\t' -v total="$((SECONDS - start))" '
    BEGIN { fmt = "%-52s %7s %7s %8s %9s\n"; printf fmt, "suite", "passed", "failed", "skipped", "time" }
    $2 + $3 + $4 == 0 && $6 == "" && $1 !~ /^tests\/archs.sh/ { empty++; next }  # no tests in it
    { printf fmt, $1 ($6 != "" ? " " $6 : ""), $2, $3, $4, sprintf("%.1fs", $5)
      p += $2; f += $3; s += $4 }
    END {
        if (empty) printf "(%d more test binaries hold no tests)\n", empty
        printf fmt, "total (wall time, builds included)", p, f, s, total "s"
        printf "%d passed, %d failed, %d skipped\n", p, f, s
        exit (f > 0 ? 1 : 0)
    }' "$rows"
