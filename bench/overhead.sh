#!/usr/bin/env bash
# Per-task overhead of the embedded runner: the same merge (task arithmetic of base + 2 over a
# family of 9,003 tiny tensors, 1,000 layers of hidden size 64) cut into about 10,000 tasks
# (--task-size 8KiB) and into 9 (64MiB), in alternation; the CPU time (user + system) of the
# difference, divided by the difference in tasks, is the overhead of one task (leasing,
# reading its inputs, handing work to threads, writing its part, completing it). Both runs do
# the same arithmetic on the same bytes. Run from anywhere.
#
# Environment:
#   BENCH_SKIP_BUILD=1  use the release binaries already built
#   BENCH_BIN=DIR       where the binaries are (default: release/ in cargo's target directory)
#   OVERHEAD_DATA=DIR   data folder (default: a fresh temporary folder, removed at the end)
#   OVERHEAD_RUNS=N     pairs of runs (default 3)
set -euo pipefail

cd "$(dirname "$0")/.."
REL=${BENCH_BIN:-$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release}
TIME=/usr/bin/time
RUNS=${OVERHEAD_RUNS:-3}
if [[ ! -x $TIME ]]; then
    echo "overhead: $TIME not found; install it (Debian/Ubuntu: apt-get install time)" >&2
    exit 2
fi
if [[ -z ${BENCH_SKIP_BUILD:-} ]]; then
    cargo build --release -p shardmerge -p shardmerge-tests
fi
DATA=${OVERHEAD_DATA:-$(mktemp -d)}
cleanup() { [[ -n ${OVERHEAD_DATA:-} ]] || rm -rf "$DATA"; }
trap cleanup EXIT
if [[ ! -f $DATA/lang_eu/config.json ]]; then
    "$REL/gen-family" --out "$DATA" --hidden 64 --intermediate 128 --layers 1000 --heads 4 \
        --kv-heads 4 --vocab 256 --models base,instruct,lang_eu >/dev/null
fi
cat >"$DATA/ta.yml" <<EOF
merge_method: task_arithmetic
base_model: $DATA/base
models:
  - model: $DATA/instruct
    parameters: {weight: 0.5}
  - model: $DATA/lang_eu
    parameters: {weight: 0.5}
dtype: bfloat16
EOF
tasks_of() { "$REL/shardmerge" plan "$DATA/ta.yml" --task-size "$1" | awk '/^tasks/ { print $2 }'; }
cpu_of() { # task size -> CPU seconds (user + system) of one run
    local tf
    tf=$(mktemp)
    rm -rf "$DATA/out"
    "$TIME" -f '%U %S' -o "$tf" "$REL/shardmerge" run "$DATA/ta.yml" "$DATA/out" --quiet \
        --task-size "$1"
    rm -rf "$DATA/out"
    awk '{ printf "%.2f", $1 + $2 }' "$tf"
    rm -f "$tf"
}
small=$(tasks_of 8KiB)
large=$(tasks_of 64MiB)
echo "per-task overhead: $small tasks (--task-size 8KiB) against $large (64MiB), $RUNS pairs ($(nproc) cores)"
for ((i = 1; i <= RUNS; i++)); do
    s=$(cpu_of 8KiB)
    l=$(cpu_of 64MiB)
    awk -v s="$s" -v l="$l" -v ns="$small" -v nl="$large" \
        'BEGIN { printf "  8KiB %5.2f CPU-s, 64MiB %5.2f CPU-s: %4.0f us per task\n", s, l, (s - l) / (ns - nl) * 1e6 }'
done
