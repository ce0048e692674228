#!/usr/bin/env bash
# Baton's bus benchmark: figures, not assertions. On a 3-server NATS cluster in the sandbox, with
# the agents as real processes, one canary release (10% → 25 → 50 → 75 → 100, each step
# analysed) with all three servers up, then with one down for good (killed with SIGKILL, not
# restarted), then with the event stream's leader killed in the middle of the release: the time
# from request to end, and the latency of `baton status`, `logs`, `list` and `history` run one
# after another all along (p50, p99, max; each a whole process, as a person runs it).
# The binaries are the optimised ones (BATON_PROFILE=debug measures a debug build instead).
# Usage: scripts/bench-bus.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
profile=${BATON_PROFILE:-release}
flag=()
[ "$profile" = release ] && flag=(--release)
echo "== building Baton ($profile)"
cargo build --workspace --locked --quiet "${flag[@]}"
cargo run --locked --quiet "${flag[@]}" -p baton-tests --example bench-bus
