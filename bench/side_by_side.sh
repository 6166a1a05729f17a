#!/usr/bin/env bash
# Gateway CPU per request of several builds, side by side in one run (issue 14's cost).
#
#   bench/side_by_side.sh ROUNDS TREE...      # e.g. bench/side_by_side.sh 8 /tmp/base .
#   CONNECTIONS=1 bench/side_by_side.sh 6 /tmp/base .
#
# Each TREE is a checkout whose target/release holds `echelon` and `echelon-testkit`
# (`cargo build --release -p echelon-cli -p echelon-testkit` in it). Starts, per tree, a
# testkit upstream at 0 ms and `echelon serve` in front of it (a task group of two models
# with a 3-key pool, RPM/TPM/seed-004 buckets, concurrency limits, breakers, the ledger
# and metrics on, as bench/run.sh), all at once; then, ROUNDS times, drives each gateway
# in turn with `wrk -d3s` at CONNECTIONS (50) for a small non-streamed chat completion.
# Alternating the builds within each round spreads a drift of the machine over all of
# them. Prints per tree its gateway CPU nanoseconds per request (user + system, from
# /proc/PID/stat) for every round, then the median and the minimum.
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
wrk.body = '{"model":"fast_group","messages":[{"role":"user","content":"hello there, how are you"}],"max_tokens":16}'
LUA
trees=() gw_pids=() gw_urls=()
i=0
for tree in "$@"; do
  bin="$(cd "$tree" && pwd)/target/release"
  [ -x "$bin/echelon" ] && [ -x "$bin/echelon-testkit" ] || { echo "$tree: no release binaries" >&2; exit 1; }
  "$bin/echelon-testkit" --port 0 >"$work/up$i.out" 2>&1 & pids+=($!)
  up="$(wait_url "$work/up$i.out")"
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
  "$bin/echelon" serve --config "$work/gw$i.yaml" --port 0 >"$work/gw$i.out" 2>"$work/gw$i.err" & pids+=($!)
  gw_pids+=($!); gw_urls+=("$(wait_url "$work/gw$i.out")"); trees+=("$tree")
  wrk -t"$threads" -c"$conns" -d2s -s "$work/req.lua" "${gw_urls[$i]}/v1/chat/completions" >/dev/null
  i=$((i + 1))
done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tck="$(getconf CLK_TCK)"
for r in $(seq "$rounds"); do
  for j in "${!trees[@]}"; do
    before="$(cpu_ticks "${gw_pids[$j]}")"
    out="$(wrk -t"$threads" -c"$conns" -d3s -s "$work/req.lua" "${gw_urls[$j]}/v1/chat/completions")"
    after="$(cpu_ticks "${gw_pids[$j]}")"
    n="$(echo "$out" | grep -o '[0-9]* requests in' | cut -d' ' -f1)"
    echo "$j $(( (after - before) * 1000000000 / tck / n ))"
  done
done | python3 -c '
import sys, statistics
trees = sys.argv[1:]
runs = {}
for line in sys.stdin:
    j, ns = line.split()
    runs.setdefault(int(j), []).append(int(ns))
for j, tree in enumerate(trees):
    v = runs.get(j, [])
    print(f"{tree}: CPU ns/request per round {v}; median {statistics.median(v):,.0f}, min {min(v):,}")
' "${trees[@]}"
