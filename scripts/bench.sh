#!/usr/bin/env bash
# Runs `handoff bench` on a release build.
#
# Run with:
#   scripts/bench.sh --quick                 # about a minute on two cores
#   scripts/bench.sh --workers 4 --load 0.8  # any `handoff bench` flags
#
# The table, report.json and report.svg land in target/bench/<UTC time>/ (or in --out DIR);
# the last line says where.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec ./target/release/handoff bench "$@"
