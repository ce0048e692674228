#!/usr/bin/env bash
# Baton's scale benchmark: figures, not assertions. In the sandbox, with the six agents as real
# processes (optimised build; BATON_PROFILE=debug for a debug one), it measures
#   1. interference: one healthy rolling release alone, then beside another app's release whose
#      pods take 20 s to start, then beside another app's canary sitting in a 5-minute pause —
#      and the ratio of each to the release alone (goal ≤ 1.2);
#   2. many at once: N = 10, 100, 1000 releases of N apps (1-replica Deployments) requested
#      together — time until all ended, p50/p99 per release, the agents' CPU per release and
#      their peak resident memory (goals: 100 within 3× one release; 1000 with every agent under
#      64 MiB); and how late their notifications reach a webhook (each release's request, steps
#      and end, routed to a local sink): from each event to its arrival, p50/p99/max;
#   3. history: one app after 0, 100 and 1000 earlier releases (written into the stream by
#      `baton-sandbox seed-history`) — time and agents' CPU per release (goal: flat within 10%).
# Usage: scripts/bench-scale.sh [MAX_N]   (default 1000; 100 skips the largest run)
max_n=${1:-1000}
export BATON_PROFILE=${BATON_PROFILE:-release}
# Room for 1000 apps with a surge pod each (110 pods a node).
export BATON_SANDBOX_NODES=${BATON_SANDBOX_NODES:-$(( max_n * 2 / 100 + 3 ))}
export BATON_LOG=${BATON_LOG:-warn}
export BATON_SINK_FLAGS=--json
. "$(dirname "$0")/lib.sh"

start_sandbox
start_agents
tck=$(getconf CLK_TCK)

now() { date +%s.%N; }
# Total CPU seconds of the six agents so far.
agents_cpu() {
  local total=0 entry pid t
  for entry in "${agent_pids[@]}"; do
    pid=${entry##*:}
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  echo "scale=3; $total / $tck" | bc
}
peak_rss() { # the largest VmHWM of the agents, MiB, and whose
  local entry name pid best=0 who=- v
  for entry in "${agent_pids[@]}"; do
    name=${entry%%:*}; pid=${entry##*:}
    v=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    if [ "$v" -gt "$best" ]; then best=$v; who=$name; fi
  done
  printf '%.1f (%s)' "$(echo "$best / 1024" | bc -l)" "$who"
}

# A namespace with N apps of one replica each, and their configuration in environment ENV.
make_apps() { # ENV PREFIX N [APP SETTINGS YAML LINES]
  local env=$1 prefix=$2 n=$3 extra=${4:-} i
  "$bin/baton-sandbox" push-image "bench/app:v1" --env BATON_SIM_HEALTH=ok >/dev/null
  {
    echo "apiVersion: v1"; echo "kind: Namespace"; echo "metadata: {name: $env}"
    for i in $(seq 0 $((n - 1))); do
      cat <<YAML
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: $prefix$i, namespace: $env}
spec:
  replicas: 1
  selector: {matchLabels: {app: $prefix$i}}
  template:
    metadata: {labels: {app: $prefix$i}}
    spec:
      containers:
        - name: app
          image: $BATON_REGISTRY/bench/app:v1
          ports: [{containerPort: 8080}]
YAML
    done
  } >"$work/$env.yaml"
  "$bin/baton-sandbox" apply -f "$work/$env.yaml" --wait >/dev/null
  {
    echo "environments:"
    echo "  $env: {cluster: sandbox, namespace: $env}"
    echo "apps:"
    # One line an app (flow style), so a thousand apps fit the configuration's size limit.
    for i in $(seq 0 $((n - 1))); do
      echo "  $prefix$i: {container: app, port: 8080, step_timeout: 5m, analysis: {duration: 2s, interval: 1s}, checks: [{name: health, http: {path: /health, timeout: 2s, retries: 1}}]$extra}"
    done
  } >"$work/$env-baton.yaml"
}

# Merges every environment's file into one configuration and applies it.
apply_config() {
  python3 - "$work" <<'PY' >"$work/baton.yaml"
import glob, sys
envs, apps = [], []
for path in sorted(glob.glob(sys.argv[1] + "/*-baton.yaml")):
    part, lines = None, open(path).read().splitlines()
    for line in lines:
        if line == "environments:": part = envs; continue
        if line == "apps:": part = apps; continue
        part.append(line)
print("environments:"); print("\n".join(envs)); print("apps:"); print("\n".join(apps))
# The releases of the many-at-once runs are told to a local webhook sink (scripts/lib.sh).
print("notifications:")
print("  channels: {bench: {kind: cloudevents}}")
print("  routes: [{channel: bench, environments: [%s]}]" % ", ".join(
    e.split(":")[0].strip() for e in envs if e.strip().startswith("n")))
PY
  "$bin/baton" config apply "$work/baton.yaml" >/dev/null
}

release() { # ENV APP IMAGE → release id
  "$bin/baton" release "$2" --env "$1" --image "$BATON_REGISTRY/$3" --output json | jq -r '.release_id'
}
# Seconds from request to end of one release, from its own events.
took() {
  "$bin/baton" logs "$1" --output json | jq -r '
    (.[0].time_ms) as $t0 | ([.[] | select(.type | test("^release\\.(succeeded|failed|rolled_back)$"))][0].time_ms) as $t1
    | if $t1 == null then "-" else (($t1 - $t0) / 1000 | tostring) end'
}
wait_end() { # ID
  until "$bin/baton" logs "$1" --output json \
      | jq -e 'any(.[]; .type | test("^release\\.(succeeded|failed|rolled_back)$"))' >/dev/null; do
    sleep 0.2
  done
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2)}'; }

echo "== preparing apps"
make_apps solo s 1
make_apps other o 2 ""
make_apps gated g 1 ", strategy: canary, canary: {steps: [{weight: 50, pause: 5m}, {weight: 100}]}"
for n in 10 100 1000; do
  [ "$n" -le "$max_n" ] && make_apps "n$n" "n${n}a" "$n"
done
make_apps hist h 1
apply_config
"$bin/baton-sandbox" push-image bench/app:v2 --env BATON_SIM_HEALTH=ok >/dev/null
"$bin/baton-sandbox" push-image bench/app:slow --env BATON_SIM_HEALTH=ok --env BATON_SIM_STARTUP_MS=20000 >/dev/null
tag=2
next_tag() { tag=$((tag + 1)); "$bin/baton-sandbox" push-image "bench/app:v$tag" --env BATON_SIM_HEALTH=ok >/dev/null; echo "bench/app:v$tag"; }

echo
echo "== 1. one release beside others (seconds, request to end)"
alone=()
for _ in 1 2 3; do
  id=$(release solo s0 "$(next_tag)"); wait_end "$id"; alone+=("$(took "$id")")
done
alone_med=$(printf '%s\n' "${alone[@]}" | median)
id_slow=$(release other o0 bench/app:slow); sleep 1
id=$(release solo s0 "$(next_tag)"); wait_end "$id"; beside_slow=$(took "$id")
wait_end "$id_slow"
id_gate=$(release gated g0 bench/app:v2)
until "$bin/baton" logs "$id_gate" --output json | jq -e 'any(.[]; .type == "release.paused")' >/dev/null; do sleep 0.5; done
id=$(release solo s0 "$(next_tag)"); wait_end "$id"; beside_pause=$(took "$id")
"$bin/baton" abort "$id_gate" --reason "benchmark over" >/dev/null
printf '%-44s %10s %8s\n' "release of app s0" "seconds" "ratio"
printf '%-44s %10s %8s\n' "alone (median of 3)" "$alone_med" "1.00"
printf '%-44s %10s %8.2f\n' "beside a release with 20 s pod start-up" "$beside_slow" "$(echo "$beside_slow / $alone_med" | bc -l)"
printf '%-44s %10s %8.2f\n' "beside a canary in a 5-minute pause" "$beside_pause" "$(echo "$beside_pause / $alone_med" | bc -l)"

echo
echo "== 2. N releases of N apps requested at once"
printf '%-6s %10s %12s %10s %10s %10s %14s %16s\n' "N" "succeeded" "all_ended_s" "p50_s" "p99_s" "vs_one" "cpu_ms/release" "peak_rss_mib"
for n in 10 100 1000; do
  [ "$n" -le "$max_n" ] || continue
  image=$(next_tag)
  cpu0=$(agents_cpu); t0=$(now)
  seq 0 $((n - 1)) | xargs -P 16 -I{} "$bin/baton" release "n${n}a{}" --env "n$n" --image "$BATON_REGISTRY/$image" --output json \
    | jq -r '.release_id' >"$work/ids-$n"
  while :; do
    ended=$("$bin/baton" history --env "n$n" --limit 1000 --output json \
      | jq '[.[] | select(.status == "succeeded" or .status == "failed" or .status == "rolled_back")] | length')
    [ "$ended" -ge "$n" ] && break
    sleep 0.5
  done
  t1=$(now); cpu1=$(agents_cpu)
  "$bin/baton" history --env "n$n" --limit 1000 --output json >"$work/h-$n"
  jq -r '.[].duration_seconds' "$work/h-$n" | sort -n >"$work/d-$n"
  ok=$(jq '[.[] | select(.status == "succeeded")] | length' "$work/h-$n")
  p50=$(awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}' "$work/d-$n")
  p99=$(awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; print a[i]}' "$work/d-$n")
  all=$(echo "$t1 - $t0" | bc -l)
  printf '%-6s %10s %12.1f %10.1f %10.1f %10.2f %14.0f %16s\n' "$n" "$ok" "$all" "$p50" "$p99" \
    "$(echo "$all / $alone_med" | bc -l)" "$(echo "($cpu1 - $cpu0) * 1000 / $n" | bc -l)" "$(peak_rss)"
done

# The notifications of those releases: every end told, and how long after its event each arrived.
echo
echo "== 2b. their notifications (request, steps and end of each release, to a webhook)"
printf '%-6s %10s %14s %10s %10s %10s\n' "N" "ends_told" "notifications" "lag_p50_s" "lag_p99_s" "lag_max_s"
for n in 10 100 1000; do
  [ "$n" -le "$max_n" ] || continue
  for _ in $(seq 1 600); do
    told=$(jq -s --arg src "/n$n/" '[.[] | select((.source | contains($src)) and (.type | test("release\\.(succeeded|failed|rolled_back)$")))] | length' "$work/notifications.log")
    [ "$told" -ge "$n" ] && break
    sleep 0.5
  done
  jq -s -r --arg src "/n$n/" '.[] | select(.source | contains($src)) | .lag_ms' "$work/notifications.log" | sort -n >"$work/lag-$n"
  count=$(wc -l <"$work/lag-$n")
  printf '%-6s %10s %14s %10.2f %10.2f %10.2f\n' "$n" "$told" "$count" \
    "$(awk '{a[NR]=$1} END {print a[int((NR+1)/2)] / 1000}' "$work/lag-$n")" \
    "$(awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; print a[i] / 1000}' "$work/lag-$n")" \
    "$(tail -1 "$work/lag-$n" | awk '{print $1 / 1000}')"
done

# Until the agents are idle again (the last phase's tail: the metrics agent folding its events,
# deadline watches returning), so that each phase measures its own releases alone.
quiesce() {
  local c0 c1
  for _ in $(seq 1 60); do
    c0=$(agents_cpu); sleep 2; c1=$(agents_cpu)
    [ "$(echo "$c1 - $c0 < 0.05" | bc)" -eq 1 ] && return
  done
}

quiesce
echo
echo "== 3. one app after earlier releases"
printf '%-18s %10s %16s\n' "earlier releases" "seconds" "cpu_ms/release"
seeded=0
for earlier in 0 100 1000; do
  [ "$earlier" -le "$max_n" ] || continue
  if [ "$earlier" -gt "$seeded" ]; then
    "$bin/baton-sandbox" seed-history --env hist --app h0 --namespace hist --count $((earlier - seeded)) \
      --nats-url "$NATS_URL" --credentials "$BATON_CREDENTIALS"
    seeded=$earlier
    quiesce # the agents read past the seeded events (each ends at once: it has ended)
  fi
  times=(); cpu0=$(agents_cpu)
  for _ in 1 2 3; do
    id=$(release hist h0 "$(next_tag)"); wait_end "$id"; times+=("$(took "$id")")
  done
  cpu1=$(agents_cpu)
  printf '%-18s %10s %16.0f\n' "$earlier" "$(printf '%s\n' "${times[@]}" | median)" "$(echo "($cpu1 - $cpu0) * 1000 / 3" | bc -l)"
done
