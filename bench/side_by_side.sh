#!/usr/bin/env bash
# Gateway CPU per request of several builds, side by side in one run (issue 14's cost;
# issue 16's before/after and bare/full tables).
#
#   bench/side_by_side.sh ROUNDS TREE...      # e.g. bench/side_by_side.sh 8 /tmp/base .
#   CONNECTIONS=1 bench/side_by_side.sh 6 /tmp/base .
#   bench/side_by_side.sh 6 .:bare .          # the same build, bare config vs every feature on
#   STREAM=1 bench/side_by_side.sh 5 .        # streamed chat completions instead
#
# TREE:bare runs that tree with a bare config instead: one provider with one key, one
# model in a task group of one echelon, no limits, no breaker, no ledger, no metrics.
# Each TREE is a checkout whose target/release holds `echelon` and `echelon-testkit`
# (`cargo build --release -p echelon-cli -p echelon-testkit` in it). Starts, per tree, a
# testkit upstream at 0 ms and `echelon serve` in front of it (a task group of two models
# with a 3-key pool, RPM/TPM/seed-004 buckets, concurrency limits, breakers, the ledger
# and metrics on, as bench/run.sh), all at once; then, ROUNDS times, drives each gateway
# in turn with `wrk -d3s` at CONNECTIONS (50) for a small non-streamed chat completion
# (streamed, `"stream": true`, with STREAM=1: the testkit then sends 9 events and [DONE]).
# Alternating the builds within each round spreads a drift of the machine over all of
# them. Prints per tree its gateway CPU nanoseconds per request (user + system, from
# /proc/PID/stat) for every round, then the median and the minimum; the median requests/s,
# the upstream's own CPU per request in the same rounds and the gateway/upstream ratio;
# and the gateway's peak RSS (VmHWM).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bench/side_by_side.sh ROUNDS TREE..." >&2; exit 2; }
rounds=$1; shift
conns="${CONNECTIONS:-50}"; threads=2; [ "$conns" -lt 2 ] && threads=1
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/bench/common.sh"
command -v wrk >/dev/null || { sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo; $sudo_cmd apt-get install -y -qq wrk >/dev/null; }

cat >"$work/req.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"fast_group","messages":[{"role":"user","content":"hello there, how are you"}],"max_tokens":16STREAM_FIELD}'
LUA
stream_field=""; [ "${STREAM:-0}" = 1 ] && stream_field=',"stream":true'
sed -i "s/STREAM_FIELD/$stream_field/" "$work/req.lua"
trees=() gw_pids=() gw_urls=() up_pids=()
i=0
for entry in "$@"; do
  tree="${entry%:bare}"; bare=0; [ "$tree" != "$entry" ] && bare=1
  bin="$(cd "$tree" && pwd)/target/release"
  [ -x "$bin/echelon" ] && [ -x "$bin/echelon-testkit" ] || { echo "$tree: no release binaries" >&2; exit 1; }
  "$bin/echelon-testkit" --port 0 >"$work/up$i.out" 2>&1 & pids+=($!); up_pids+=($!)
  up="$(wait_url "$work/up$i.out")"
  if [ "$bare" = 1 ]; then
    cat >"$work/gw$i.yaml" <<YAML
server: { host: 127.0.0.1, metrics: false }
providers:
  fast: { base_url: "$up/v1", api_keys: ["fast-k1"] }
models:
  fast-a: { provider: fast, max_retries: 1, timeout: 30 }
task_groups:
  fast_group: { echelon1: { models: [fast-a] } }
usage: { ledger: false }
YAML
  else
  cat >"$work/gw$i.yaml" <<YAML
server: { host: 127.0.0.1, metrics: true }
providers:
  fast: { base_url: "$up/v1", api_keys: ["fast-k1", "fast-k2", "fast-k3"] }
models:
  fast-a: &limits
    provider: fast
    max_retries: 1
    timeout: 30
    rpm_limit: 100000000
    tpm_limit: 1000000000
    rate_limit_capacity: 1000000
    rate_limit_refill_rate: 1000000
    concurrency_limit: 1000
    circuit_breaker: { failure_threshold: 5, recovery_time: 30, half_open_requests: 1 }
  fast-b: { <<: *limits, provider: fast }
task_groups:
  fast_group: { echelon1: { models: [fast-a] }, echelon2: { models: [fast-b] } }
usage: { ledger: "$work/ledger$i.db" }
YAML
  fi
  "$bin/echelon" serve --config "$work/gw$i.yaml" --port 0 >"$work/gw$i.out" 2>"$work/gw$i.err" & pids+=($!)
  gw_pids+=($!); gw_urls+=("$(wait_url "$work/gw$i.out")"); trees+=("$entry")
  wrk -t"$threads" -c"$conns" -d2s -s "$work/req.lua" "${gw_urls[$i]}/v1/chat/completions" >/dev/null
  i=$((i + 1))
done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tck="$(getconf CLK_TCK)"
for r in $(seq "$rounds"); do
  for j in "${!trees[@]}"; do
    before="$(cpu_ticks "${gw_pids[$j]}")"; up_before="$(cpu_ticks "${up_pids[$j]}")"
    out="$(wrk -t"$threads" -c"$conns" -d3s -s "$work/req.lua" "${gw_urls[$j]}/v1/chat/completions")"
    after="$(cpu_ticks "${gw_pids[$j]}")"; up_after="$(cpu_ticks "${up_pids[$j]}")"
    n="$(echo "$out" | grep -o '[0-9]* requests in' | cut -d' ' -f1)"
    rps="$(echo "$out" | awk '/Requests\/sec/{print $2}')"
    echo "$j $(( (after - before) * 1000000000 / tck / n )) $(( (up_after - up_before) * 1000000000 / tck / n )) $rps"
  done
done >"$work/rounds"
for j in "${!trees[@]}"; do
  echo "hwm $j $(awk '/VmHWM/{print $2}' "/proc/${gw_pids[$j]}/status")" >>"$work/rounds"
done
python3 -c '
import sys, statistics
trees = sys.argv[2:]
runs, ups, rps, hwm = {}, {}, {}, {}
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "hwm":
        hwm[int(f[1])] = int(f[2])
        continue
    j = int(f[0])
    runs.setdefault(j, []).append(int(f[1]))
    ups.setdefault(j, []).append(int(f[2]))
    rps.setdefault(j, []).append(float(f[3]))
for j, tree in enumerate(trees):
    v, u, r = runs.get(j, []), ups.get(j, []), rps.get(j, [])
    g, up = statistics.median(v), statistics.median(u)
    print(f"{tree}: CPU ns/request per round {v}; median {g:,.0f}, min {min(v):,}")
    print(f"  requests/s median {statistics.median(r):,.0f}; upstream CPU ns/request median {up:,.0f}; "
          f"gateway/upstream {g / up:.2f}x; peak RSS {hwm.get(j, 0) / 1024:.1f} MiB")
' "$work/rounds" "${trees[@]}"
