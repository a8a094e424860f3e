#!/usr/bin/env bash
# Builds the release `shardmerge` binary (the one README command 1 builds, so nothing new is
# compiled after it) and prints its path: cargo's target directory as `cargo metadata` reports
# it, so CARGO_TARGET_DIR (and a `build.target-dir` in a cargo config) is respected.
#
#   bin=$(tests/shardmerge-bin.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p shardmerge --bin shardmerge >&2
dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [[ -z $dir || ! -x $dir/release/shardmerge ]]; then
    echo "tests/shardmerge-bin.sh: no release shardmerge binary under '$dir'" >&2
    exit 1
fi
echo "$dir/release/shardmerge"
