#!/usr/bin/env bash
# The gateway's hot path against its upstream, in one run (issue 7).
#
#   bench/run.sh              # ~2 minutes: prints the table and writes it to BENCHMARKS.md
#   bench/run.sh --no-write   # prints only
#   bench/run.sh soak [SECS]  # wrk at concurrency 50 for SECS (600) against the gateway,
#                             # sampling its RSS every 10 s (leak check)
#
# Starts the testkit upstream at 0 ms and at 50 ms latency, and `echelon serve` (release) in
# front of both with a realistic config: per upstream a task group of two models, a key pool
# of 3 keys, RPM/TPM/seed-004 token buckets, concurrency limits and circuit breakers on, the
# SQLite ledger and Prometheus metrics on. Then, for each scenario, drives the upstream
# directly and the gateway with wrk (installed with apt-get when missing), alternating, for
# ROUNDS rounds (3) of DURATION seconds (3); time to first token comes from `echelon probe`
# (sequential streams; wrk cannot see a first token). Figures are medians over the rounds.
# wrk, the upstream and the gateway share this machine's cores.
#
# Per row: requests/s, p50/p99 latency, the gateway's added latency (gateway minus direct,
# same round), and for gateway rows the gateway's CPU seconds per 1,000 requests (from
# /proc/PID/stat); then the gateway's peak RSS (VmHWM) over the whole run.
#
# STATE=redis bench/run.sh: the same with `state: { backend: redis }` (issue 15), on a
# redis-server of its own (Debian's redis-server, installed when missing) on a free port;
# its table goes to its own section of BENCHMARKS.md, next to the memory one.
#
# TELEMETRY=1 bench/run.sh: telemetry's cost (issue 18, target: at most 10% fewer
# requests/s at concurrency 50): a second gateway with `telemetry:` exporting every span
# (sample_ratio 1) to a local OTLP/HTTP sink (python3, answers 200 and drops the body),
# against the same gateway without it. Only those rows run: "direct" is the gateway
# with telemetry off, "gateway" the one with it on; its own section of BENCHMARKS.md.
# SAMPLE_RATIO=0.1 (with TELEMETRY=1) keeps that share of the traces instead of all
# (head sampling: the requests left out build no span); its own section too.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mode=bench write=1 soak_secs=600
case "${1:-}" in
  --no-write) write=0 ;;
  soak) mode=soak; soak_secs="${2:-600}" ;;
  "") ;;
  *) echo "usage: bench/run.sh [--no-write | soak [SECS]]" >&2; exit 2 ;;
esac
rounds="${ROUNDS:-3}" secs="${DURATION:-3}"
start_load="$(cut -d' ' -f1-3 /proc/loadavg)"  # for the table's header
state="${STATE:-memory}"
telemetry="${TELEMETRY:-0}"
ratio="${SAMPLE_RATIO:-1.0}"
case "$state" in memory|redis) ;; *) echo "STATE must be memory or redis" >&2; exit 2 ;; esac

command -v wrk >/dev/null || { sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo; $sudo_cmd apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p echelon-cli -p echelon-testkit
bin="$root/target/release"

source "$root/bench/common.sh"

state_yaml="" marker="bench/run.sh"
if [ "$state" = redis ]; then
  command -v redis-server >/dev/null || { sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo; $sudo_cmd apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
  redis_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.out" 2>&1 & pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  state_yaml="state: { backend: redis, url: \"redis://127.0.0.1:$redis_port/0\", timeout_ms: 50 }"
  marker="bench/run.sh state=redis"
fi
[ "$telemetry" = 1 ] && marker="bench/run.sh telemetry=1"
[ "$telemetry" = 1 ] && [ "$ratio" != 1.0 ] && marker="bench/run.sh telemetry=1 sample_ratio=$ratio"

"$bin/echelon-testkit" --port 0 >"$work/up0.out" 2>&1 & pids+=($!); up0_pid=$!
"$bin/echelon-testkit" --port 0 --latency-ms 50 >"$work/up50.out" 2>&1 & pids+=($!)
up0="$(wait_url "$work/up0.out")"; up50="$(wait_url "$work/up50.out")"

# Limits are set high enough not to bind (the point is to pay for checking them).
cat >"$work/gw.yaml" <<YAML
server: { host: 127.0.0.1, metrics: true }
providers:
  fast: { base_url: "$up0/v1", api_keys: ["fast-k1", "fast-k2", "fast-k3"] }
  slow: { base_url: "$up50/v1", api_keys: ["slow-k1", "slow-k2", "slow-k3"] }
  # The same 0 ms upstream on its Anthropic Messages wire (POST /v1/messages).
  fast-anthropic: { base_url: "$up0", api: anthropic, api_keys: ["fast-k1", "fast-k2", "fast-k3"] }
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
  slow-a: { <<: *limits, provider: slow }
  slow-b: { <<: *limits, provider: slow }
  claude-a: { <<: *limits, provider: fast-anthropic, model: test-model }
task_groups:
  fast_group: { echelon1: { models: [fast-a] }, echelon2: { models: [fast-b] } }
  slow_group: { echelon1: { models: [slow-a] }, echelon2: { models: [slow-b] } }
usage: { ledger: "$work/ledger.db" }
$state_yaml
YAML
"$bin/echelon" serve --config "$work/gw.yaml" --port 0 >"$work/gw.out" 2>"$work/gw.err" & pids+=($!); gw_pid=$!
gw="$(wait_url "$work/gw.out")"
# The gateway (and its pid) the "gateway" column measures; the "direct" one's pid.
gw_target="$gw" gw_target_pid="$gw_pid" direct_pid="$up0_pid"
if [ "$telemetry" = 1 ]; then
  otlp_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  python3 - "$otlp_port" >"$work/otlp.out" 2>&1 <<'PY' & pids+=($!)
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
  { cat "$work/gw.yaml"; echo "telemetry: { otlp_endpoint: \"http://127.0.0.1:$otlp_port\", sample_ratio: $ratio }"; } >"$work/gw-otel.yaml"
  sed -i "s|ledger: \"$work/ledger.db\"|ledger: \"$work/ledger-otel.db\"|" "$work/gw-otel.yaml"
  "$bin/echelon" serve --config "$work/gw-otel.yaml" --port 0 >"$work/gw-otel.out" 2>"$work/gw-otel.err" & pids+=($!)
  gw_target_pid=$!
  gw_target="$(wait_url "$work/gw-otel.out")"
  direct_pid="$gw_pid"
fi

lua() { # $1 = file, $2 = model, $3 = true|false (stream)
  local extra=""; [ "$3" = true ] && extra=',"stream":true'
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"$2","messages":[{"role":"user","content":"hello there, how are you"}],"max_tokens":16$extra}'
LUA
}
for model in test-model fast_group slow_group claude-a; do
  lua "$work/$model-json.lua" "$model" false
  lua "$work/$model-sse.lua" "$model" true
done
# The same request as an Anthropic Messages body (`/v1/messages`).
for model in test-model fast_group claude-a; do
  cat >"$work/$model-messages.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.body = '{"model":"$model","max_tokens":16,"messages":[{"role":"user","content":"hello there, how are you"}]}'
LUA
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
tck="$(getconf CLK_TCK)"

if [ "$mode" = soak ]; then
  echo "soak: wrk -c50 for ${soak_secs}s against the gateway (fast_group, 0 ms upstream)"
  wrk -t2 -c50 -d"${soak_secs}s" -s "$work/fast_group-json.lua" "$gw/v1/chat/completions" >"$work/soak.out" & wrk_pid=$!
  t=0
  while kill -0 "$wrk_pid" 2>/dev/null; do
    echo "t=${t}s rss_kb=$(rss_kb "$gw_pid") hwm_kb=$(hwm_kb "$gw_pid")"
    sleep 10; t=$((t + 10))
  done
  grep -E 'Requests/sec|requests in|Non-2xx' "$work/soak.out"
  echo "after: rss_kb=$(rss_kb "$gw_pid") hwm_kb=$(hwm_kb "$gw_pid")"
  exit 0
fi

# One wrk run → "rps p50_ms p99_ms requests errors" (+ cpu seconds of $5's process).
wrk_run() { # $1 = url base, $2 = lua, $3 = connections, $4 = seconds, $5 = pid to charge CPU to, $6 = path
  local threads=2; [ "$3" -lt 2 ] && threads=1
  local before after
  before="$(cpu_ticks "$5")"
  wrk -t"$threads" -c"$3" -d"${4}s" --latency -s "$2" "$1${6:-/v1/chat/completions}" >"$work/wrk.out"
  after="$(cpu_ticks "$5")"
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
print(f"{rps:.1f} {ms(pct['50']):.4f} {ms(pct['99']):.4f} {n} {errs} {cpu:.3f}")
PY
}

# scenario name | model direct | model gateway | lua kind | connections | upstream url |
# direct lua kind and path | gateway lua kind and path (default: the lua kind, chat completions)
# The Messages rows: `messages in` is a /v1/messages client in front of the OpenAI-wire
# group (translated both ways) against the upstream's own chat completions; `messages
# out` a chat client in front of the Anthropic-wire model against the upstream's own
# /v1/messages; `messages native` /v1/messages to the Anthropic-wire model (passthrough).
scenarios=(
  "json c1 0ms|test-model|fast_group|json|1|$up0"
  "json c50 0ms|test-model|fast_group|json|50|$up0"
  "stream c1 0ms|test-model|fast_group|sse|1|$up0"
  "stream c50 0ms|test-model|fast_group|sse|50|$up0"
  "json c50 50ms|test-model|slow_group|json|50|$up50"
  "stream c50 50ms|test-model|slow_group|sse|50|$up50"
  "messages in c50 0ms|test-model|fast_group|json|50|$up0|json /v1/chat/completions|messages /v1/messages"
  "messages out c50 0ms|test-model|claude-a|json|50|$up0|messages /v1/messages|json /v1/chat/completions"
  "messages native c50 0ms|test-model|claude-a|json|50|$up0|messages /v1/messages|messages /v1/messages"
)
if [ "$telemetry" = 1 ]; then
  scenarios=(
    "telemetry json c50 0ms|fast_group|fast_group|json|50|$gw"
    "telemetry stream c50 0ms|fast_group|fast_group|sse|50|$gw"
  )
fi
echo "warming up the gateway"
wrk -t2 -c50 -d2s -s "$work/fast_group-json.lua" "$gw/v1/chat/completions" >/dev/null
[ "$telemetry" = 1 ] && wrk -t2 -c50 -d2s -s "$work/fast_group-json.lua" "$gw_target/v1/chat/completions" >/dev/null
results="$work/results.tsv"
: >"$results"
for round in $(seq 1 "$rounds"); do
  for s in "${scenarios[@]}"; do
    IFS='|' read -r name m_direct m_gw kind conns up direct_at gw_at <<<"$s"
    read -r d_kind d_path <<<"${direct_at:-$kind /v1/chat/completions}"
    read -r g_kind g_path <<<"${gw_at:-$kind /v1/chat/completions}"
    d="$(wrk_run "$up" "$work/$m_direct-$d_kind.lua" "$conns" "$secs" "$direct_pid" "$d_path")"
    g="$(wrk_run "$gw_target" "$work/$m_gw-$g_kind.lua" "$conns" "$secs" "$gw_target_pid" "$g_path")"
    printf '%s\t%s\tdirect\t%s\n%s\t%s\tgateway\t%s\n' "$round" "$name" "$d" "$round" "$name" "$g" >>"$results"
    echo "round $round, $name: direct [$d] gateway [$g]  (rps p50 p99 n errors cpu_s)"
  done
  [ "$telemetry" = 1 ] && continue  # the probe rows are the memory table's
  for target in direct gateway; do
    if [ "$target" = direct ]; then url="$up0/v1" model=test-model; else url="$gw/v1" model=fast_group; fi
    p="$("$bin/echelon" probe --url "$url" --model "$model" --stream -n 300 --warmup 30 --json)"
    printf '%s\tttft c1 0ms\t%s\t%s\n' "$round" "$target" "$p" >>"$results"
    echo "round $round, ttft $target: $(echo "$p" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["ttft_ms"], r["errors"], "errors")')"
  done
done
hwm="$(hwm_kb "$gw_target_pid")"

table="$(python3 - "$results" "$hwm" "$rounds" "$secs" <<'PY'
import json, statistics, sys
from collections import defaultdict
rows = defaultdict(list)
ttft = defaultdict(list)
for line in open(sys.argv[1]):
    rnd, name, target, rest = line.rstrip("\n").split("\t", 3)
    if name.startswith("ttft"):
        r = json.loads(rest)
        ttft[target].append((r["ttft_ms"]["p50"], r["ttft_ms"]["p99"], r["total_ms"]["p50"], r["errors"]))
    else:
        rps, p50, p99, n, errs, cpu = rest.split()
        rows[(name, target)].append(dict(round=rnd, rps=float(rps), p50=float(p50), p99=float(p99),
                                         n=int(n), errs=int(errs), cpu=float(cpu)))
med = statistics.median
names = list(dict.fromkeys(name for name, _ in rows))
out = ["| scenario | direct req/s | gateway req/s | gateway/direct | direct p50 / p99 ms | gateway p50 / p99 ms | added p50 / p99 ms | gateway CPU s / 1k req | errors |",
       "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for name in names:
    d, g = rows[(name, "direct")], rows[(name, "gateway")]
    add50 = med([b["p50"] - a["p50"] for a, b in zip(d, g)])
    add99 = med([b["p99"] - a["p99"] for a, b in zip(d, g)])
    cpu = med([b["cpu"] / b["n"] * 1000 for b in g])
    errs = sum(x["errs"] for x in d + g)
    out.append(f"| {name} | {med([x['rps'] for x in d]):,.0f} | {med([x['rps'] for x in g]):,.0f} | "
               f"{med([b['rps'] / a['rps'] for a, b in zip(d, g)]) * 100:.1f}% | "
               f"{med([x['p50'] for x in d]):.3f} / {med([x['p99'] for x in d]):.3f} | "
               f"{med([x['p50'] for x in g]):.3f} / {med([x['p99'] for x in g]):.3f} | "
               f"{add50:+.3f} / {add99:+.3f} | {cpu:.3f} | {errs} |")
if ttft:
    d, g = ttft["direct"], ttft["gateway"]
    out.append("")
    out.append("| streaming, concurrency 1, 0 ms upstream (`echelon probe`, 300 streams per round) | direct | gateway | added |")
    out.append("| --- | ---: | ---: | ---: |")
    for label, i in (("time to first token p50 (ms)", 0), ("time to first token p99 (ms)", 1), ("stream total p50 (ms)", 2)):
        out.append(f"| {label} | {med([x[i] for x in d]):.3f} | {med([x[i] for x in g]):.3f} | "
                   f"{med([b[i] - a[i] for a, b in zip(d, g)]):+.3f} |")
    out.append(f"| streams without `[DONE]` or failed | {sum(x[3] for x in d)} | {sum(x[3] for x in g)} | |")
out.append("")
out.append(f"Gateway peak RSS (VmHWM) over the whole run: **{int(sys.argv[2]) / 1024:.1f} MiB**. "
           f"{sys.argv[3]} rounds of {sys.argv[4]} s per scenario and target; medians.")
print("\n".join(out))
PY
)"
echo
echo "$table"

if [ "$write" = 1 ]; then
  cpu_model="$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
  section="$(printf '%s\n' \
    "<!-- $marker:begin (written by bench/run.sh; edit the script, not this) -->" \
    "- **Command:** \`$([ "$state" = redis ] && printf 'STATE=redis ')$([ "$telemetry" = 1 ] && printf 'TELEMETRY=1 ')$([ "$telemetry" = 1 ] && [ "$ratio" != 1.0 ] && printf 'SAMPLE_RATIO=%s ' "$ratio")bench/run.sh\` (ROUNDS=$rounds, DURATION=$secs)$([ "$telemetry" = 1 ] && printf '; direct = the gateway with telemetry off, gateway = with telemetry on (sample_ratio %s), its spans exported to a local OTLP/HTTP sink' "$ratio")" \
    "- **Machine:** $(nproc) vCPU $cpu_model, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(rustc --version | cut -d' ' -f1-2); wrk, upstream and gateway share the cores; load average at the start $start_load, at the end $(cut -d' ' -f1-3 /proc/loadavg)" \
    "- **Date:** $(date -u +%Y-%m-%d)" \
    "" "$table" \
    "<!-- $marker:end -->")"
  python3 - BENCHMARKS.md "$section" "$marker" <<'PY'
import re, sys
path, section, marker = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
pattern = re.compile(re.escape(f"<!-- {marker}:begin") + r".*?" + re.escape(f"<!-- {marker}:end -->"), re.S)
title = ("## Gateway vs direct: `bench/run.sh` (issue 7)" if marker == "bench/run.sh"
         else "## Telemetry at a lower sample ratio: `TELEMETRY=1 SAMPLE_RATIO=... bench/run.sh` (issue 18)" if "sample_ratio" in marker
         else "## Telemetry on vs off: `TELEMETRY=1 bench/run.sh` (issue 18)" if "telemetry" in marker
         else "## Shared state on Redis: `STATE=redis bench/run.sh` (issue 15)")
if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
else:
    text = text.rstrip("\n") + "\n\n" + title + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
  echo "written to BENCHMARKS.md"
fi
