#!/usr/bin/env bash
# Baton's test command (the README's second command, and what CI runs): installs what is missing,
# builds the workspace, checks formatting and lints, then runs every test — unit tests and the
# integration tests against the real servers of the sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== build"
cargo build --workspace --locked

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests"
# The integration tests start Baton's binaries from target/debug (built above), or from
# $CARGO_TARGET_DIR/debug when it is set.
log=${CARGO_TARGET_DIR:-target}/test-output.log
mkdir -p "$(dirname "$log")"
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# One summary line for the whole run.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
