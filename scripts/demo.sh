#!/usr/bin/env bash
# Baton's demo (the README's first command). On a fresh Debian machine it installs what is missing,
# builds Baton, brings up the sandbox (NATS, a Kubernetes control plane with simulated nodes, an OCI
# registry) and the five agents as real processes, applies a sample configuration, pushes a good and
# a broken image, releases the good one (it succeeds) and the broken one (it is rolled back
# automatically), and prints the history and the metrics report. Everything is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

bash scripts/setup.sh
echo "== building Baton"
cargo build --workspace --locked --quiet
bin=$root/target/debug

work=$(mktemp -d -t baton-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== starting the sandbox (logs: $work/sandbox.log)"
"$bin/baton-sandbox" up --env-file "$work/sandbox.env" >"$work/sandbox.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do
  [ -s "$work/sandbox.env" ] && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/sandbox.log"; echo "the sandbox failed to start" >&2; exit 1; }
  sleep 0.2
done
set -a; . "$work/sandbox.env"; set +a
echo "   NATS_URL=$NATS_URL  KUBECONFIG=$KUBECONFIG  BATON_REGISTRY=$BATON_REGISTRY"

echo "== starting the five agents (logs in $work)"
port=19090
for agent in builder deployer health-checker rollback metrics; do
  BATON_PLAIN_HTTP_REGISTRIES=$BATON_REGISTRY "$bin/baton-$agent" --cluster sandbox \
    --http-addr "127.0.0.1:$port" >"$work/$agent.log" 2>&1 &
  pids+=($!)
  port=$((port + 1))
done
for p in 19090 19091 19092 19093 19094; do
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$p/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
done

echo "== pushing images: web:v1 and web:v2 (healthy), web:v3 (its health check fails)"
"$bin/baton-sandbox" push-image demo/web:v1 --env BATON_SIM_HEALTH=ok >/dev/null
"$bin/baton-sandbox" push-image demo/web:v2 --env BATON_SIM_HEALTH=ok >/dev/null
"$bin/baton-sandbox" push-image demo/web:v3 --env BATON_SIM_HEALTH=fail >/dev/null

echo "== the workload: Deployment demo/web running web:v1"
sed "s|REGISTRY|$BATON_REGISTRY|g" examples/demo/web.yaml >"$work/web.yaml"
"$bin/baton-sandbox" apply -f "$work/web.yaml" --wait

echo "== the configuration (examples/demo/baton.yaml)"
"$bin/baton" config apply examples/demo/baton.yaml

echo
echo "== release web:v2 — a healthy image"
"$bin/baton" release web --env demo --image "$BATON_REGISTRY/demo/web:v2" --wait

echo
echo "== release web:v3 — its health check fails, so Baton rolls it back"
set +e
"$bin/baton" release web --env demo --image "$BATON_REGISTRY/demo/web:v3" --wait
code=$?
set -e
echo "   (baton release exited $code: 2 means rolled back)"
[ "$code" -eq 2 ] || { echo "expected the broken release to be rolled back" >&2; exit 1; }

echo
echo "== history"
"$bin/baton" history --env demo
echo
echo "== metrics"
"$bin/baton" metrics --env demo --window 1d
echo
echo "demo done: the good release succeeded, the broken one was rolled back."
