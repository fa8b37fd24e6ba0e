#!/usr/bin/env bash
# Runs `handoff bench` on a release build and keeps what it says.
#
# Run with:
#   scripts/bench.sh --quick                 # under a minute on two cores
#   scripts/bench.sh --workers 4 --load 0.8  # any `handoff bench` flags
#
# The table, report.json and report.svg land in target/bench/<date-time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
out="target/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
./target/release/handoff bench --out "$out" "$@" | tee "$out/table.txt"
echo "bench: table, JSON and SVG in $out" >&2
