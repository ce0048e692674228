# Shared by scripts/demo.sh and scripts/bench.sh: build Baton, bring up the sandbox and the six
# agents as real processes, and remove everything on exit. Source it; it sets `bin`, `work`.
# BATON_PROFILE=release builds and runs the optimised binaries (the benchmark's default).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/setup.sh
profile=${BATON_PROFILE:-debug}
echo "== building Baton ($profile)"
if [ -n "${BATON_NO_BUILD:-}" ]; then
  echo "   (BATON_NO_BUILD: using the binaries in target/$profile as they are)"
elif [ "$profile" = release ]; then
  cargo build --workspace --locked --quiet --release
else
  cargo build --workspace --locked --quiet
fi
# Where cargo put them: $CARGO_TARGET_DIR when set; BATON_BIN_DIR names the folder outright.
bin=${BATON_BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/$profile}

work=$(mktemp -d -t baton.XXXXXX)
pids=()
agent_pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${BATON_KEEP_WORK:-}" ]; then echo "(logs kept in $work)" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM

start_sandbox() {
  echo "== starting the sandbox (logs: $work/sandbox.log)"
  "$bin/baton-sandbox" up --env-file "$work/sandbox.env" --nodes "${BATON_SANDBOX_NODES:-3}" \
    >"$work/sandbox.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do
    [ -s "$work/sandbox.env" ] && break
    kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/sandbox.log"; echo "the sandbox failed to start" >&2; exit 1; }
    sleep 0.2
  done
  set -a; . "$work/sandbox.env"; set +a
  echo "   NATS_URL=$NATS_URL  KUBECONFIG=$KUBECONFIG  BATON_REGISTRY=$BATON_REGISTRY"
}

start_agents() {
  echo "== starting the six agents (logs in $work)"
  # The notifier's channels (examples/demo/baton.yaml routes to them) are a local webhook sink
  # that prints what it receives to $work/notifications.log.
  # shellcheck disable=SC2086 # BATON_SINK_FLAGS is a list of flags (--json for the benchmark)
  "$bin/baton-sandbox" webhook-sink --addr 127.0.0.1:19099 ${BATON_SINK_FLAGS:-} >"$work/notifications.log" 2>"$work/webhook-sink.log" &
  pids+=($!)
  printf 'demo-team: http://127.0.0.1:19099/demo-team\naudit: http://127.0.0.1:19099/audit\nbench: http://127.0.0.1:19099/bench\n' >"$work/webhooks.yaml"
  local port=19090 agent p
  for agent in builder deployer health-checker rollback metrics notifier; do
    # Each agent is given a folder with its own NATS seed alone.
    BATON_CREDENTIALS=$BATON_USER_CREDENTIALS/$agent BATON_NOTIFIER_SECRETS=$work/webhooks.yaml \
    BATON_PLAIN_HTTP_REGISTRIES=$BATON_REGISTRY BATON_LOG=${BATON_LOG:-info,async_nats=warn} \
      "$bin/baton-$agent" --cluster sandbox \
      --http-addr "127.0.0.1:$port" >"$work/$agent.log" 2>&1 &
    pids+=($!)
    agent_pids+=("$agent:$!")
    port=$((port + 1))
  done
  for p in 19090 19091 19092 19093 19094 19095; do
    for _ in $(seq 1 300); do
      curl -fsS "http://127.0.0.1:$p/readyz" >/dev/null 2>&1 && break
      sleep 0.2
    done
  done
}

# The demo's workload (Deployment demo/web running web:v1) and configuration.
start_workload() {
  "$bin/baton-sandbox" push-image demo/web:v1 --env BATON_SIM_HEALTH=ok >/dev/null
  sed "s|REGISTRY|$BATON_REGISTRY|g" examples/demo/web.yaml >"$work/web.yaml"
  "$bin/baton-sandbox" apply -f "$work/web.yaml" --wait
  "$bin/baton" config apply examples/demo/baton.yaml
}
