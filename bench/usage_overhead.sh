#!/usr/bin/env bash
# Throughput of `echelon serve` with the usage ledger and Prometheus metrics on, and
# with both off, in the same run, against the testkit upstream at 0 ms latency
# (issue 5: "the ledger and metrics together must not cost more than 10%").
#
#   bench/usage_overhead.sh [SECONDS_PER_RUN=10] [ROUNDS=3] [CONNECTIONS=50]
#
# SETTINGS="on off ledger metrics" also measures each alone (default: on off).
# Installs wrk with apt-get when missing. Prints the median requests/s of each setting
# and the overhead; load generator, upstream and gateway share this machine's cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
secs="${1:-10}" rounds="${2:-3}" conns="${3:-50}"

command -v wrk >/dev/null || { sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo; $sudo_cmd apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p echelon-cli -p echelon-testkit

source "$root/bench/common.sh"


target/release/echelon-testkit --port 0 >"$work/up.out" 2>&1 & pids+=($!)
up="$(wait_url "$work/up.out")"

write_config() { # $1 = file, $2 = on|off|ledger|metrics (what is on)
  local usage="usage: { ledger: false }" metrics=false
  case "$2" in
    on) usage="usage: { ledger: \"$work/ledger.db\" }"; metrics=true ;;
    ledger) usage="usage: { ledger: \"$work/ledger.db\" }" ;;
    metrics) metrics=true ;;
  esac
  cat >"$1" <<YAML
server: { metrics: $metrics }
providers:
  up: { base_url: "$up/v1", api_keys: ["k1", "k2", "k3"] }
models:
  a: { provider: up, max_retries: 1, rpm_limit: 100000000, concurrency_limit: 1000 }
  b: { provider: up, max_retries: 1 }
task_groups:
  g: { echelon1: { models: [a] }, echelon2: { models: [b] } }
$usage
YAML
}

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"g","messages":[{"role":"user","content":"hello there, how are you"}],"max_tokens":16}'
LUA

settings="${SETTINGS:-on off}"
declare -A results
for setting in $settings; do results[$setting]=""; done
for round in $(seq 1 "$rounds"); do
  for setting in $settings; do
    write_config "$work/$setting.yaml" "$setting"
    target/release/echelon serve --config "$work/$setting.yaml" --port 0 >"$work/gw.out" 2>"$work/gw.err" & gw=$!
    gw_url="$(wait_url "$work/gw.out")"
    wrk -t2 -c"$conns" -d2s -s "$work/post.lua" "$gw_url/v1/chat/completions" >/dev/null # warm-up
    rps="$(wrk -t2 -c"$conns" -d"${secs}s" -s "$work/post.lua" "$gw_url/v1/chat/completions" | awk '/Requests\/sec/ {print $2}')"
    kill -TERM "$gw"; wait "$gw" || true
    results[$setting]="${results[$setting]} $rps"
    echo "round $round, $setting: $rps req/s"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
off="$(echo "${results[off]:-}" | median)"
for setting in $settings; do
  m="$(echo "${results[$setting]}" | median)"
  if [ "$setting" = off ] || [ -z "$off" ]; then echo "median req/s, $setting: $m"; continue; fi
  echo "median req/s, $setting: $m (overhead $(awk -v on="$m" -v off="$off" 'BEGIN {printf "%.1f", (off-on)/off*100}')% vs off)"
done
