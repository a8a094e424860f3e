#!/usr/bin/env bash
# shardmerge benchmark: a 0.75B-parameter bf16 Llama-layout family (gen-family), merged with
# task arithmetic (base + 2) and TIES (base + 3), against the plain-file-I/O floor and
# mergekit 0.1.5's figures. Run from anywhere; paths are relative to the repository root.
#
# Environment:
#   BENCH_WORKERS=N     pass --workers N to shardmerge
#   BENCH_SKIP_BUILD=1  use the binaries already in target/release
#   BENCH_ONLY=floor    time only the I/O floor (no merges)
#   BENCH_DATA=DIR      data folder (default bench-data; the recipes name bench-data/...)
#   BENCH_BIN=DIR       where the binaries are (default target/release)
#   BENCH_GEN_ARGS=...  gen-family shape options instead of the 0.75B defaults (for trying the
#                       script out at a small size, with BENCH_DATA elsewhere)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=${BENCH_DATA:-bench-data}
REL=${BENCH_BIN:-target/release}
TIME=/usr/bin/time

# mergekit 0.1.5 on a 2-core machine, same recipes and sizes
MK_TA_S=24;   MK_TA_MB=3200
MK_TIES_S=174; MK_TIES_MB=5300

if [[ ! -x $TIME ]]; then
    echo "bench: $TIME not found; install it (Debian/Ubuntu: apt-get install time)" >&2
    exit 2
fi

if [[ -z ${BENCH_SKIP_BUILD:-} ]]; then
    echo "== building (release)"
    cargo build --release -p shardmerge -p shardmerge-tests
fi

# --- data -----------------------------------------------------------------------------------
GEN_ARGS=${BENCH_GEN_ARGS:---hidden 2048 --intermediate 5632 --layers 12 --heads 16 --kv-heads 16 --vocab 32000 --dtype bf16 --seed 0}
MODELS=(base instruct lang_eu lang_ca)
missing=()
for m in "${MODELS[@]}"; do
    [[ -f $DATA/$m/config.json ]] || missing+=("$m")
done
if ((${#missing[@]})); then
    echo "== generating ${missing[*]} in $DATA/ ($GEN_ARGS)"
    # shellcheck disable=SC2086
    "$REL/gen-family" --out "$DATA" $GEN_ARGS --models "$(IFS=,; echo "${missing[*]}")"
fi

files_of() { # model folders -> their safetensors files
    for m in "$@"; do ls "$DATA/$m"/*.safetensors; done
}
bytes_of() {
    local n=0 s
    for f in "$@"; do s=$(stat -c %s "$f"); n=$((n + s)); done
    echo "$n"
}
TA_IN=($(files_of base instruct lang_eu))
TIES_IN=($(files_of base instruct lang_eu lang_ca))
OUT_BYTES=$(bytes_of $(files_of base))   # a merge writes a model shaped like the base

# --- timing ---------------------------------------------------------------------------------
mkdir -p "$DATA/out"
declare -A WALL RSS STATUS
timed() { # key cmd... -> WALL[key] seconds, RSS[key] MB, STATUS[key]
    local key=$1; shift
    local tf rc=0
    tf=$(mktemp)
    echo "== $key: $*"
    "$TIME" -f '%e %M' -o "$tf" "$@" || rc=$?
    local w=- k=0
    read -r w k < <(tail -n 1 "$tf") || true
    rm -f "$tf"
    WALL[$key]=$w
    RSS[$key]=$(awk -v k="$k" 'BEGIN { printf "%.0f", k / 1024 }')
    if ((rc)); then STATUS[$key]="FAILED rc=$rc"; else STATUS[$key]=ok; fi
}
floor() { # key files...
    local key=$1; shift
    timed "$key" "$REL/io-floor" --out "$DATA/out/floor.bin" --bytes "$OUT_BYTES" "$@"
    rm -f "$DATA/out/floor.bin"
}
merge() { # key recipe
    local key=$1 recipe=$2 out=$DATA/out/$1
    rm -rf "$out"
    local extra=()
    [[ -n ${BENCH_WORKERS:-} ]] && extra=(--workers "$BENCH_WORKERS")
    timed "$key" "$REL/shardmerge" run "$recipe" "$out" --quiet "${extra[@]}"
    [[ ${STATUS[$key]} == ok ]] && OUTSIZE[$key]=$(du -sb "$out" | cut -f1)
    rm -rf "$out"
}
declare -A OUTSIZE

sync   # flush the generator's (or an earlier run's) dirty pages before timing anything
floor floor_ta_first "${TA_IN[@]}"
floor floor_ties_first "${TIES_IN[@]}"
if [[ ${BENCH_ONLY:-} != floor ]]; then
    merge task_arithmetic bench/task_arithmetic.yml
    merge ties bench/ties.yml
fi
floor floor_ta_last "${TA_IN[@]}"
floor floor_ties_last "${TIES_IN[@]}"

# --- report ---------------------------------------------------------------------------------
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b ? a : b) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
gb() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e9 }'; }

echo
echo "shardmerge benchmark  ($(nproc) cores; warm page cache; output $(gb "$OUT_BYTES") GB)"
echo "inputs: task_arithmetic $(gb "$(bytes_of "${TA_IN[@]}")") GB, ties $(gb "$(bytes_of "${TIES_IN[@]}")") GB"
echo
printf '%-22s %10s %12s  %s\n' run wall_s peak_rss_MB status
for k in floor_ta_first floor_ties_first task_arithmetic ties floor_ta_last floor_ties_last; do
    [[ -n ${WALL[$k]:-} ]] || continue
    printf '%-22s %10s %12s  %s\n' "$k" "${WALL[$k]}" "${RSS[$k]}" "${STATUS[$k]}"
done
echo
fail=0
for pair in "task_arithmetic ta $MK_TA_S $MK_TA_MB" "ties ties $MK_TIES_S $MK_TIES_MB"; do
    read -r k f mks mkmb <<<"$pair"
    fl=$(min "${WALL[floor_${f}_first]}" "${WALL[floor_${f}_last]}")
    if [[ -z ${WALL[$k]:-} ]]; then
        echo "$k: I/O floor ${fl} s (first ${WALL[floor_${f}_first]} s, last ${WALL[floor_${f}_last]} s); merge not run"
        continue
    fi
    if [[ ${STATUS[$k]} != ok ]]; then
        echo "$k: ${STATUS[$k]}"
        fail=1
        continue
    fi
    echo "$k: ${WALL[$k]} s = $(ratio "${WALL[$k]}" "$fl")x the I/O floor (${fl} s; first ${WALL[floor_${f}_first]}, last ${WALL[floor_${f}_last]}), peak RSS ${RSS[$k]} MB, output $(gb "${OUTSIZE[$k]}") GB"
    echo "$(printf '%*s' ${#k} '')  mergekit 0.1.5: ${mks} s / ${mkmb} MB -> $(ratio "$mks" "${WALL[$k]}")x faster, $(ratio "$mkmb" "${RSS[$k]}")x less memory"
done
exit $fail
