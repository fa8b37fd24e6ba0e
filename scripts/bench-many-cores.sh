#!/usr/bin/env bash
# The full benchmark suite for a many-core machine (e.g. 16 cores): 8 and 16 workers, every
# workload, every contender available there. Writes tables, JSON and SVG per worker count to
# ${OUT:-target/bench/many-cores}. Prepared so that one call on a lent machine records the
# figures docs/benchmarks.md asks for.
#
# Run with: scripts/bench-many-cores.sh            (about 15 minutes with node present: three
# capacity runs per contender and workload)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-target/bench/many-cores}"
mkdir -p "$out"
if [ ! -x target/release/handoff ]; then cargo build --release --quiet; fi
{ nproc; uname -r; grep -m1 'model name' /proc/cpuinfo || true; } > "$out/machine.txt"
for workers in 8 16; do
  timeout 480 ./target/release/handoff bench --workers "$workers" --duration 5s --capacity-duration 2s \
    --json "$out/w$workers.json" --out "$out/w$workers" | tee "$out/w$workers.txt"
done
