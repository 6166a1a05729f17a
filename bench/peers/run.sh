#!/usr/bin/env bash
# Echelon beside two peers, Portkey's gateway and LiteLLM's proxy, in one run (issue 16).
#
#   bench/peers/run.sh             # prints the table
#   bench/peers/run.sh --write     # and writes it to BENCHMARKS.md (its marked section)
#   DURATION=5 ROUNDS=3 bench/peers/run.sh
#
# Installs the peers from their registries into bench/peers/.cache (gitignored; reused by
# the next run while the version matches): Portkey's gateway `@portkey-ai/gateway`
# (PORTKEY_VERSION, 1.15.2) from npm, run with node from the installed package; LiteLLM's
# proxy `litellm[proxy]` (LITELLM_SPEC, 1.106.*) from PyPI into a venv of its own.
#
# Starts one testkit upstream at 0 ms latency and, in front of it: `echelon serve` (release)
# with a bare config (one provider, one model, no limits, no retries, no ledger, no metrics,
# a gateway key on); Portkey with the upstream as an OpenAI-compatible custom host
# (`x-portkey-provider: openai`, `x-portkey-custom-host`); LiteLLM's proxy with one model
# `openai/test-model` whose `api_base` is the upstream (no DB, no telemetry, no retries,
# log level warning, a master key on, one worker). Every target gets the same small
# non-streamed chat completion (the body of bench/side_by_side.sh, with the upstream's model
# name) and is checked with one curl for a 200 with a real answer before it is measured.
#
# Then, ROUNDS times (1), drives the upstream directly and each gateway in turn with
# `wrk -t2 -cCONNECTIONS` (50) for DURATION seconds (10), after one warm-up of WARMUP
# seconds (2) per target. Per row: requests/s, p50/p99 latency, errors (non-2xx and socket
# errors), and the CPU per request of the server (user + system ticks from /proc/PID/stat of
# the server and every process under it — LiteLLM and Portkey may fork workers — children
# reaped meanwhile included), and Echelon's requests/s divided by the row's. Figures are
# medians over the rounds. wrk, the upstream and the servers share this machine's cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
write=0
case "${1:-}" in
  --write) write=1 ;;
  "") ;;
  *) echo "usage: bench/peers/run.sh [--write]" >&2; exit 2 ;;
esac
secs="${DURATION:-10}" rounds="${ROUNDS:-1}" warmup="${WARMUP:-2}" conns="${CONNECTIONS:-50}"
portkey_version="${PORTKEY_VERSION:-1.15.2}" litellm_spec="${LITELLM_SPEC:-1.106.*}"
cache="$root/bench/peers/.cache"
load_at_start="$(cut -d' ' -f1-3 /proc/loadavg)"

command -v wrk >/dev/null || { sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo; $sudo_cmd apt-get install -y -qq wrk >/dev/null; }
bin="$root/target/release"
if [ -n "${BUILD:-}" ] || [ ! -x "$bin/echelon" ] || [ ! -x "$bin/echelon-testkit" ]; then
  cargo build --release -q -p echelon-cli -p echelon-testkit
fi

# --- the peers, installed once per version -------------------------------------------
mkdir -p "$cache"
portkey_dir="$cache/portkey-$portkey_version"
portkey_js="$portkey_dir/node_modules/@portkey-ai/gateway/build/start-server.js"
if [ ! -f "$portkey_js" ]; then
  echo "installing @portkey-ai/gateway@$portkey_version from npm into $portkey_dir"
  # The package's only install script is `patch-package`, and it ships no patches.
  npm install --prefix "$portkey_dir" --no-audit --no-fund --omit=dev --ignore-scripts \
    "@portkey-ai/gateway@$portkey_version" >"$cache/npm.log" 2>&1 || { cat "$cache/npm.log" >&2; exit 1; }
fi
python="$(command -v python3.11 || command -v python3)"
litellm_venv="$cache/litellm-venv"
litellm_version() { "$litellm_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null; }
litellm_ok() { # the installed version matches LITELLM_SPEC
  local v; v="$(litellm_version)" || return 1
  "$litellm_venv/bin/python" - "$v" "$litellm_spec" <<'PY'
import sys
from packaging.specifiers import SpecifierSet
sys.exit(0 if sys.argv[1] in SpecifierSet("==" + sys.argv[2]) else 1)
PY
}
if ! litellm_ok; then
  echo "installing litellm[proxy]==$litellm_spec from PyPI into $litellm_venv"
  rm -rf "$litellm_venv"
  "$python" -m venv "$litellm_venv"
  "$litellm_venv/bin/pip" install -q "litellm[proxy]==$litellm_spec" >"$cache/pip.log" 2>&1 || { cat "$cache/pip.log" >&2; exit 1; }
fi
litellm_v="$(litellm_version)"
portkey_v="$(node -p "require('$portkey_dir/node_modules/@portkey-ai/gateway/package.json').version")"
echelon_v="$("$bin/echelon" --version 2>/dev/null | awk '{print $NF}' || echo '?')"

source "$root/bench/common.sh"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_http URL PID LOG: until URL answers at all (any status); shows LOG and exits when
# the process PID dies or 120 s pass.
wait_http() {
  for _ in $(seq 1 1200); do
    curl -s -o /dev/null -m 1 "$1" && return
    kill -0 "$2" 2>/dev/null || { echo "server behind $1 exited:" >&2; cat "$3" >&2; exit 1; }
    sleep 0.1
  done
  echo "$1 never answered:" >&2; cat "$3" >&2; exit 1
}

# --- the upstream and the three gateways ------------------------------------------------
"$bin/echelon-testkit" --port 0 >"$work/up.out" 2>&1 & pids+=($!); up_pid=$!
up="$(wait_url "$work/up.out")"

gw_key="sk-bench-gateway"
cat >"$work/echelon.yaml" <<YAML
server: { host: 127.0.0.1, api_keys: ["$gw_key"], metrics: false }
providers:
  up: { base_url: "$up/v1", api_keys: ["sk-upstream"] }
models:
  test-model: { provider: up, max_retries: 0 }
usage: { ledger: false }
YAML
"$bin/echelon" serve --config "$work/echelon.yaml" --port 0 >"$work/echelon.out" 2>"$work/echelon.err" & pids+=($!); echelon_pid=$!
echelon="$(wait_url "$work/echelon.out")"

portkey_port="$(free_port)"
NODE_ENV=production node "$portkey_js" --port="$portkey_port" --headless >"$work/portkey.out" 2>&1 & pids+=($!); portkey_pid=$!
portkey="http://127.0.0.1:$portkey_port"

litellm_port="$(free_port)"
cat >"$work/litellm.yaml" <<YAML
model_list:
  - model_name: test-model
    litellm_params: { model: openai/test-model, api_base: "$up/v1", api_key: sk-upstream }
litellm_settings:
  num_retries: 0
  telemetry: false
  set_verbose: false
general_settings:
  master_key: $gw_key
  disable_spend_logs: true
YAML
# No DATABASE_URL: no DB. The model cost map from the package, not fetched from GitHub.
env -u DATABASE_URL LITELLM_LOG=WARNING LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_TELEMETRY=False \
  "$litellm_venv/bin/litellm" --config "$work/litellm.yaml" --host 127.0.0.1 --port "$litellm_port" \
  --num_workers 1 --telemetry False >"$work/litellm.out" 2>&1 & pids+=($!); litellm_pid=$!
litellm="http://127.0.0.1:$litellm_port"
wait_http "$portkey/" "$portkey_pid" "$work/portkey.out"
wait_http "$litellm/health/liveliness" "$litellm_pid" "$work/litellm.out"

# --- one request body, per target its headers ------------------------------------------
body='{"model":"test-model","messages":[{"role":"user","content":"hello there, how are you"}],"max_tokens":16}'
# target name | url | pid charged | extra headers (name: value; …)
targets=(
  "upstream direct|$up|$up_pid|"
  "Echelon $echelon_v|$echelon|$echelon_pid|Authorization: Bearer $gw_key"
  "Portkey $portkey_v|$portkey|$portkey_pid|Authorization: Bearer sk-upstream;x-portkey-provider: openai;x-portkey-custom-host: $up/v1"
  "LiteLLM $litellm_v|$litellm|$litellm_pid|Authorization: Bearer $gw_key"
)
i=0
for t in "${targets[@]}"; do
  IFS='|' read -r name url pid headers <<<"$t"
  curl_h=() lua_h=""
  IFS=';' read -r -a hs <<<"$headers"
  for h in "${hs[@]}"; do
    [ -n "$h" ] || continue
    curl_h+=(-H "$h")
    lua_h+="wrk.headers[\"${h%%:*}\"] = \"${h#*: }\""$'\n'
  done
  cat >"$work/t$i.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
${lua_h}wrk.body = '$body'
LUA
  # One request first: a 200 with a real answer, else this target's log and out.
  code="$(curl -s -m 30 -o "$work/t$i.body" -w '%{http_code}' -H 'Content-Type: application/json' \
    "${curl_h[@]}" -d "$body" "$url/v1/chat/completions" || true)"
  if [ "$code" != 200 ] || ! python3 - "$work/t$i.body" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
sys.exit(0 if r["choices"][0]["message"]["content"] else 1)
PY
  then
    echo "$name: no answer at $url (HTTP $code):" >&2; cat "$work/t$i.body" >&2; echo >&2
    for f in "$work"/*.out "$work"/*.err; do echo "== $f" >&2; tail -20 "$f" >&2; done
    exit 1
  fi
  echo "$name at $url: 200, $(head -c 160 "$work/t$i.body")"
  i=$((i + 1))
done

# tree_ticks PID: user + system ticks (children reaped included) of PID and every process
# under it.
tree_ticks() {
  python3 - "$1" <<'PY'
import os, sys
stats = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(d)] = (int(f[1]), sum(int(x) for x in f[11:15]))  # ppid; utime stime cutime cstime
todo, total = [int(sys.argv[1])], 0
while todo:
    p = todo.pop()
    total += stats.get(p, (0, 0))[1]
    todo += [c for c, (pp, _) in stats.items() if pp == p]
print(total)
PY
}
tck="$(getconf CLK_TCK)"

# One wrk run → "rps p50_ms p99_ms requests errors cpu_s".
wrk_run() { # $1 = url base, $2 = lua, $3 = seconds, $4 = pid of the server
  local before after
  before="$(tree_ticks "$4")"
  wrk -t2 -c"$conns" -d"${3}s" --timeout 10s --latency -s "$2" "$1/v1/chat/completions" >"$work/wrk.out"
  after="$(tree_ticks "$4")"
  python3 - "$work/wrk.out" "$before" "$after" "$tck" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(v):
    n, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]
pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", text, re.M))  # "1.38s " ends in a blank
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
n = int(re.search(r"(\d+) requests in", text).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
errs = int(bad.group(1)) if bad else 0
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
if sock:
    errs += sum(int(x) for x in sock.groups())
cpu = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4])
print(f"{rps:.1f} {ms(pct['50']):.3f} {ms(pct['99']):.3f} {n} {errs} {cpu:.3f}")
PY
}

for i in "${!targets[@]}"; do
  IFS='|' read -r name url pid _ <<<"${targets[$i]}"
  echo "warming up $name (${warmup}s)"
  wrk -t2 -c"$conns" -d"${warmup}s" --timeout 10s -s "$work/t$i.lua" "$url/v1/chat/completions" >/dev/null
done
results="$work/results.tsv"
: >"$results"
for round in $(seq 1 "$rounds"); do
  for i in "${!targets[@]}"; do
    IFS='|' read -r name url pid _ <<<"${targets[$i]}"
    r="$(wrk_run "$url" "$work/t$i.lua" "$secs" "$pid")"
    printf '%s\t%s\t%s\n' "$round" "$name" "$r" >>"$results"
    echo "round $round, $name: $r  (rps p50_ms p99_ms n errors cpu_s)"
  done
done

table="$(python3 - "$results" "$rounds" "$secs" "$conns" <<'PY'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    rnd, name, rest = line.rstrip("\n").split("\t", 2)
    rps, p50, p99, n, errs, cpu = rest.split()
    rows[name].append(dict(rps=float(rps), p50=float(p50), p99=float(p99), n=int(n), errs=int(errs), cpu=float(cpu)))
med = statistics.median
names = list(rows)
echelon = next(n for n in names if n.startswith("Echelon"))
e_rps = med([x["rps"] for x in rows[echelon]])
out = [f"| target (concurrency {sys.argv[4]}, 0 ms upstream) | req/s | p50 / p99 ms | requests | errors | server CPU µs / req | Echelon req/s ÷ this |",
       "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
ratios = {}
for name in names:
    r = rows[name]
    rps = med([x["rps"] for x in r])
    cpu = med([x["cpu"] / x["n"] * 1e6 if x["n"] else float("nan") for x in r])
    ratio = e_rps / rps if rps else float("inf")
    ratios[name] = ratio
    shown = "—" if name == echelon else f"{ratio:,.1f}×"
    out.append(f"| {name} | {rps:,.0f} | {med([x['p50'] for x in r]):.2f} / {med([x['p99'] for x in r]):.2f} | "
               f"{sum(x['n'] for x in r):,} | {sum(x['errs'] for x in r)} | {cpu:,.0f} | {shown} |")
out.append("")
for prefix, goal in (("Portkey", 25), ("LiteLLM", 250)):
    name = next(n for n in names if n.startswith(prefix))
    verdict = "met" if ratios[name] >= goal else "not met"
    out.append(f"- Issue 16's target Echelon ≥ {goal}× {prefix}: **{ratios[name]:,.1f}×, {verdict}**.")
out.append(f"- {sys.argv[2]} round(s) of {sys.argv[3]} s per target, targets in turn within a round; medians. "
           "CPU: user + system of the server's process tree (/proc/PID/stat), over the requests it answered.")
print("\n".join(out))
PY
)"
echo
echo "$table"

load_at_end="$(cut -d' ' -f1-3 /proc/loadavg)"
busy=""
if awk -v l="${load_at_start%% *}" -v n="$(nproc)" 'BEGIN { exit !(l >= n / 2) }'; then
  busy=" — a busy machine (other builds): the ratios are not the quiet machine's; rerun on a quiet one"
fi
[ -z "$busy" ] || echo "note: load average at the start $load_at_start$busy"

if [ "$write" = 1 ]; then
  marker="bench/peers"
  cpu_model="$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
  section="$(printf '%s\n' \
    "<!-- $marker:begin (written by bench/peers/run.sh; edit the script, not this) -->" \
    "- **Command:** \`DURATION=$secs ROUNDS=$rounds bench/peers/run.sh --write\` (CONNECTIONS=$conns, WARMUP=$warmup)" \
    "- **Machine:** $(nproc) vCPU $cpu_model, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); wrk, the upstream and the servers share the cores; load average at the start **$load_at_start**, at the end $load_at_end$busy" \
    "- **Date:** $(date -u '+%Y-%m-%d %H:%M UTC')" \
    "- **Peers:** @portkey-ai/gateway $portkey_v (npm, node $(node --version)), litellm[proxy] $litellm_v (PyPI, $("$litellm_venv/bin/python" --version)); Echelon $echelon_v bare config (one model, gateway key on, no retries, no ledger, no metrics)" \
    "" "$table" \
    "<!-- $marker:end -->")"
  python3 - BENCHMARKS.md "$section" "$marker" <<'PY'
import re, sys
path, section, marker = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
pattern = re.compile(re.escape(f"<!-- {marker}:begin") + r".*?" + re.escape(f"<!-- {marker}:end -->"), re.S)
if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
else:
    text = text.rstrip("\n") + "\n\n## Peers side by side (issue 16)\n\n" + section + "\n"
open(path, "w").write(text)
PY
  echo "written to BENCHMARKS.md"
fi
