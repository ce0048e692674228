#!/usr/bin/env bash
# Baton's demo (the README's first command): installs what is missing, builds Baton, and brings up
# the sandbox — NATS with Baton's bus applied, a Kubernetes control plane with simulated nodes, and
# an OCI registry — in the foreground. Ctrl-C stops and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --workspace --locked --quiet
exec target/debug/baton-sandbox up --env-file target/sandbox.env "$@"
