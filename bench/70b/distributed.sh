#!/usr/bin/env bash
# The whole-70B distributed run of docs/scaling.md: task_arithmetic of base + 2 on Llama-3.1-70B
# shaped sparse checkpoints (bench/gen_sparse_70b.py), uploaded to a Garage server on loopback
# (bench/70b/to_s3.py), merged by a coordinator and two workers, each a separate process under
# /usr/bin/time -v, into the benchmark-only discarding store null:// (--allow-any).
#
#   bench/70b/distributed.sh [RUN_DIR]        # default bench-data/70b-dist
#
# Environment: LAYERS (default 80; fewer for a subset of the same shapes), NICE (default 10),
# THREADS per worker (default 1), PORT_BASE (default 39190: it and the next 6 ports), STATE (the coordinator's --state; default a journal folder in
# RUN_DIR, `memory` for none), SHARDMERGE (the binary; default: this checkout's release
# build), KEEP=1 to leave Garage's data folder. Everything lands in RUN_DIR: run.log (phases
# with wall time, Garage CPU and load average), progress.log (status and metrics once a
# minute), *.time (time -v of each process), metrics-*.txt (Prometheus text at the end),
# summary.txt. Needs garage, python3 with boto3, curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-bench-data/70b-dist}
LAYERS=${LAYERS:-80}
NICE=${NICE:-10}
THREADS=${THREADS:-1}
STATE=${STATE:-}
DATA=bench-data/l70b-$LAYERS
if [ -z "${SHARDMERGE:-}" ]; then
    SHARDMERGE=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release/shardmerge
fi
GARAGE=$(command -v garage)
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)
G="$RUN/garage"
P=${PORT_BASE:-39190}
S3P=$((P + 1)) RPCP=$((P + 2)) CP=$((P + 3)) CM=$((P + 4)) W0M=$((P + 5)) W1M=$((P + 6))
KEY=GK0123456789abcdef01234567
SECRET=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3P AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET
export AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
T0=$(date +%s.%N)
log() { echo "$(date -u +%H:%M:%S) +$(echo "$(date +%s.%N) - $T0" | bc | cut -d. -f1)s $*" | tee -a "$RUN/run.log"; }
# user + system CPU seconds of a process and its reaped children, from /proc
cpu() { awk -v t="$(getconf CLK_TCK)" '{printf "%.1f", ($14+$15+$16+$17)/t}' "/proc/$1/stat" 2>/dev/null || echo "?"; }
child() { pgrep -P "$1" | head -1; }
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do c=$(child "$p" || true); [ -n "$c" ] && kill "$c" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] || rm -rf "$G"
}
trap cleanup EXIT

log "binary $SHARDMERGE ($("$SHARDMERGE" --version)); $LAYERS layers; nice $NICE; $THREADS thread(s) per worker"
[ -d "$DATA/m2" ] || python3 bench/gen_sparse_70b.py "$DATA" --models base,m1,m2 --layers "$LAYERS"

# Garage, as tests/src/lib.rs starts it
mkdir -p "$G"
cat >"$G/garage.toml" <<EOF
metadata_dir = "$G/meta"
data_dir = "$G/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPCP"
rpc_public_addr = "127.0.0.1:$RPCP"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$S3P"
root_domain = ".s3.garage.localhost"
EOF
RUST_LOG=warn nice -n "$NICE" /usr/bin/time -v -o "$RUN/garage.time" \
    "$GARAGE" -c "$G/garage.toml" server >"$G/garage.log" 2>&1 &
PIDS+=($!)
sleep 2
GPID=$(child "${PIDS[0]}")
gcli() { "$GARAGE" -c "$G/garage.toml" "$@"; }
for _ in $(seq 100); do gcli status >/dev/null 2>&1 && break; sleep 0.3; done
NODE=$(gcli node id -q | cut -d@ -f1)
gcli layout assign -z dc1 -c 100G "$NODE" >/dev/null
gcli layout apply --version 1 >/dev/null
gcli key import --yes -n bench "$KEY" "$SECRET" >/dev/null
gcli bucket create l70b >/dev/null
gcli bucket allow --read --write --owner l70b --key bench >/dev/null
log "garage up (pid $GPID)"

nice -n "$NICE" python3 bench/70b/to_s3.py l70b "l70b-$LAYERS" "$DATA/base" "$DATA/m1" "$DATA/m2" \
    >"$RUN/upload.log"
log "uploaded 3 models; garage CPU $(cpu "$GPID") s; load $(cut -d' ' -f1-3 /proc/loadavg)"
GUP=$(cpu "$GPID")

cat >"$RUN/recipe.yml" <<EOF
merge_method: task_arithmetic
base_model: s3://l70b/l70b-$LAYERS/base
models:
  - model: s3://l70b/l70b-$LAYERS/m1
    parameters: {weight: 1.0}
  - model: s3://l70b/l70b-$LAYERS/m2
    parameters: {weight: 1.0}
dtype: bfloat16
EOF
"$SHARDMERGE" plan "$RUN/recipe.yml" >"$RUN/plan.txt"

ENDPOINT=http://127.0.0.1:$CP
STATE=${STATE:-$RUN/state}
log "coordinator state $STATE; binary sha256 $(sha256sum "$SHARDMERGE" | cut -c1-16)"
RUST_LOG=warn nice -n "$NICE" /usr/bin/time -v -o "$RUN/coordinator.time" "$SHARDMERGE" coordinator \
    --listen 127.0.0.1:$CP --allow-any --metrics-listen 127.0.0.1:$CM --state "$STATE" \
    >"$RUN/coordinator.log" 2>&1 &
PIDS+=($!)
for w in 0 1; do
    m=$([ $w = 0 ] && echo $W0M || echo $W1M)
    RUST_LOG=warn,shardmerge_worker::storage::null=info nice -n "$NICE" \
        /usr/bin/time -v -o "$RUN/w$w.time" "$SHARDMERGE" worker --coordinator "$ENDPOINT" \
        --threads "$THREADS" --memory-limit 1GiB --id "w$w" --metrics-listen 127.0.0.1:$m \
        >"$RUN/w$w.log" 2>&1 &
    PIDS+=($!)
done
sleep 2
metrics() {
    curl -s 127.0.0.1:$CM/metrics >"$RUN/metrics-coordinator$1.txt" || true
    curl -s 127.0.0.1:$W0M/metrics >"$RUN/metrics-w0$1.txt" || true
    curl -s 127.0.0.1:$W1M/metrics >"$RUN/metrics-w1$1.txt" || true
}
(
    while sleep 60; do
        {
            echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) garage CPU $(cpu "$GPID")"
            "$SHARDMERGE" status --coordinator "$ENDPOINT" 2>&1 | head -20
        } >>"$RUN/progress.log"
        metrics "-last"
    done
) &
MON=$!
log "coordinator and 2 workers up; submitting"
TS=$(date +%s.%N)
set +e
"$SHARDMERGE" submit "$RUN/recipe.yml" null://bench/l70b-dist --coordinator "$ENDPOINT" --wait \
    >"$RUN/submit.log" 2>&1
RC=$?
set -e
TE=$(date +%s.%N)
kill "$MON" 2>/dev/null || true
metrics ""
"$SHARDMERGE" status --coordinator "$ENDPOINT" >"$RUN/status.txt" 2>&1 || true
log "submit --wait exited $RC after $(echo "$TE - $TS" | bc) s; garage CPU $(cpu "$GPID") s ($GUP s at upload end); load $(cut -d' ' -f1-3 /proc/loadavg)"
for p in "${PIDS[@]:1}" "${PIDS[0]}"; do
    c=$(child "$p" || true)
    [ -n "$c" ] && kill -INT "$c" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
done
PIDS=()
{
    echo "run: $(echo "$TE - $TS" | bc) s wall (submit to job end), exit $RC"
    for f in coordinator w0 w1 garage; do
        awk -v n="$f" -F': ' '/User time/{u=$2} /System time/{s=$2} /Maximum resident/{r=$2}
            END {printf "%-12s user %s s, system %s s, peak RSS %.0f MiB\n", n, u, s, r/1024}' "$RUN/$f.time"
    done
    echo "garage CPU at the end of the upload: $GUP s"
    for f in coordinator w0 w1; do
        grep -E '^shardmerge_(worker_)?(read|written)_bytes' "$RUN/metrics-$f.txt" | sed "s/^/$f: /" || true
    done
} | tee "$RUN/summary.txt"
exit $RC
