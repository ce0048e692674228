#!/usr/bin/env bash
# Baton's benchmark: figures, not assertions. In the sandbox, with the five agents as real
# processes, it measures
#   - a healthy rolling release, request to release.succeeded;
#   - a broken release, request to release.rolled_back, and failure detection (the first failing
#     verdict or deploy failure) — the plan's targets are a rollback < 5 min, detection < 5 min;
#     by rolling update, by canary (failing at its first step), and once by blue-green (last:
#     it makes the app blue-green, which rolling releases then refuse);
#   - each agent's resident memory after the runs.
# The binaries are the optimised ones (BATON_PROFILE=debug measures a debug build instead).
# Usage: scripts/bench.sh [RUNS]   (default 3)
runs=${1:-3}
export BATON_PROFILE=${BATON_PROFILE:-release}
. "$(dirname "$0")/lib.sh"

start_sandbox
start_agents
start_workload
"$bin/baton-sandbox" push-image demo/web:good --env BATON_SIM_HEALTH=ok >/dev/null
"$bin/baton-sandbox" push-image demo/web:crash --env BATON_SIM_CRASH=1 >/dev/null
"$bin/baton-sandbox" push-image demo/web:fail --env BATON_SIM_HEALTH=fail >/dev/null

# Seconds between the first event and the first event of TYPE in `baton logs --output json`.
span() { # ID TYPE
  "$bin/baton" logs "$1" --output json | jq -r --arg t "$2" '
    (.[0].time_ms) as $t0 | ([.[] | select(.type == $t)][0].time_ms) as $t1
    | if $t1 == null then "-" else (($t1 - $t0) / 1000 | tostring) end'
}
release() { # IMAGE [STRATEGY] → release id (followed to its end; the first JSON event is the request)
  { "$bin/baton" release web --env demo --image "$BATON_REGISTRY/demo/web:$1" \
      --strategy "${2:-rolling}" --wait --output json || true; } \
    | jq -rs '.[0].release_id'
}

printf '\n%-28s %8s %12s %12s\n' "release" "run" "detected_s" "ended_s"
for i in $(seq 1 "$runs"); do
  id=$(release good);  printf '%-28s %8s %12s %12s\n' "healthy (rolling)" "$i" "-" "$(span "$id" release.succeeded)"
  id=$(release crash); printf '%-28s %8s %12s %12s\n' "crash-looping image" "$i" "$(span "$id" deploy.failed)" "$(span "$id" release.rolled_back)"
  id=$(release fail);  printf '%-28s %8s %12s %12s\n' "failing health check" "$i" "$(span "$id" analysis.failed)" "$(span "$id" release.rolled_back)"
  id=$(release fail canary); printf '%-28s %8s %12s %12s\n' "failing canary" "$i" "$(span "$id" analysis.failed)" "$(span "$id" release.rolled_back)"
done
id=$(release fail blue-green); printf '%-28s %8s %12s %12s\n' "failing blue-green" "1" "$(span "$id" analysis.failed)" "$(span "$id" release.rolled_back)"

printf '\n%-16s %10s\n' "agent" "rss_mib"
for entry in "${agent_pids[@]}"; do
  name=${entry%%:*}; pid=${entry##*:}
  rss=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$pid/status" 2>/dev/null || echo "-")
  printf '%-16s %10s\n' "$name" "$rss"
done
