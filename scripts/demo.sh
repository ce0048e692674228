#!/usr/bin/env bash
# Baton's demo (the README's first command). On a fresh Debian machine it installs what is missing,
# builds Baton, brings up the sandbox (NATS, a Kubernetes control plane with simulated nodes, an OCI
# registry) and the six agents as real processes, applies a sample configuration, pushes a good and
# a broken image, releases the good one (it succeeds) and the broken one (it is rolled back
# automatically), and prints the history, the metrics report and the notifications a local webhook
# received. Everything is removed at the end.
. "$(dirname "$0")/lib.sh"

start_sandbox
start_agents
echo "== the workload: Deployment demo/web running web:v1, and the configuration"
start_workload
echo "== pushing images: web:v2 (healthy), web:v3 (its health check fails)"
"$bin/baton-sandbox" push-image demo/web:v2 --env BATON_SIM_HEALTH=ok >/dev/null
"$bin/baton-sandbox" push-image demo/web:v3 --env BATON_SIM_HEALTH=fail >/dev/null

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
echo "== notifications (Slack blocks to demo-team, CloudEvents to audit, as a local webhook got them)"
for _ in $(seq 1 100); do
  grep -q "dev.baton.release.rolled_back" "$work/notifications.log" && break
  sleep 0.1
done
cat "$work/notifications.log"
echo
echo "demo done: the good release succeeded, the broken one was rolled back."
