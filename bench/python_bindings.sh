#!/usr/bin/env bash
# `await llm(prompt)` through the Python bindings (in-process Rust gateway) against the
# official openai.AsyncOpenAI client straight to the same upstream and through the release
# `echelon serve` on it, and LiteLLM's in-process `Router.acompletion` (installed from PyPI
# into the bench venv by this script): CALLS calls (default 2000) from TASKS concurrent
# asyncio tasks (default 256), each answered by a test upstream after 50 ms, side by side
# in one run. Prints wall time, % of ideal (ideal = CALLS / TASKS × 50 ms) and the calling
# process's CPU per call (time.process_time: every thread of the process, the bindings'
# tokio workers included). Each client runs in its own process. Release wheel.
#
#   bench/python_bindings.sh [CALLS] [TASKS]
#   WARM=1 bench/python_bindings.sh    # also each client warmed with one wave of TASKS calls
#
# By default each client is warmed with one call (its imports and one connection), so the
# measured run opens its other TASKS - 1 connections itself: a cold start. With WARM=1
# every client also gets a second row, `(warm)`, measured after one concurrent wave of
# TASKS calls, whose connections it then reuses: the steady state of a long loop.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
calls="${1:-2000}"
tasks="${2:-256}"

PY="$(scripts/python-venv.sh)"
venv_bin="$(dirname "$PY")"
"$venv_bin/maturin" --version >/dev/null 2>&1 ||
  "$PY" -m pip install -q --disable-pip-version-check 'maturin>=1.9,<2'
"$PY" -c 'import openai' 2>/dev/null ||
  "$PY" -m pip install -q --disable-pip-version-check openai
"$PY" -c 'import litellm' 2>/dev/null ||
  "$PY" -m pip install -q --disable-pip-version-check litellm
cargo build -q --locked --release -p echelon-testkit -p echelon-cli

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

(cd python && "$venv_bin/maturin" build --locked --release --out "$work/wheels" 2>"$work/maturin.log") ||
  { cat "$work/maturin.log"; exit 1; }
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$work"/wheels/*.whl

"$root/target/release/echelon-testkit" --port 0 --latency-ms 50 >"$work/testkit.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$work/testkit.out" && break; sleep 0.05; done
url="$(sed -n 's/^listening on \(http[^ ]*\)$/\1/p' "$work/testkit.out")"

cat >"$work/echelon.yaml" <<YAML
providers:
  t: { base_url: "$url/v1" }
models:
  m: { provider: t, max_retries: 0, timeout: 30 }
usage:
  ledger: $work/ledger.db
YAML

"$root/target/release/echelon" serve --config "$work/echelon.yaml" --port 0 >"$work/serve.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do grep -q 'listening on' "$work/serve.out" && break; sleep 0.05; done
serve_url="$(sed -n 's/^.*listening on \(http[^ ]*\).*$/\1/p' "$work/serve.out" | head -1)"
[ -n "$serve_url" ] || { cat "$work/serve.out"; exit 1; }

cat >"$work/bench.py" <<'PY'
import asyncio, sys, time

mode, url, config, calls, tasks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
warm = len(sys.argv) > 6 and sys.argv[6] == "warm"

async def main():
    if mode == "echelon":
        import echelon
        gw = echelon.Gateway.from_config(config)
        llm = gw.llm("m")
        call = lambda i: llm(f"q{i}")
    elif mode == "litellm-router":
        import litellm
        router = litellm.Router(model_list=[{"model_name": "m", "litellm_params": {
            "model": "openai/m", "api_base": f"{url}/v1", "api_key": "bench"}}], num_retries=0)
        async def call(i):
            r = await router.acompletion(model="m", messages=[{"role": "user", "content": f"q{i}"}])
            return r.choices[0].message.content
    else:
        import openai
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0)
        async def call(i):
            r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
            return r.choices[0].message.content
    await call(-1)  # warm up: connection, imports
    if warm:  # and every connection the run will use
        await asyncio.gather(*(call(-2 - i) for i in range(tasks)))
    left = iter(range(calls))
    errors = 0
    async def worker():
        nonlocal errors
        for i in left:
            try:
                assert (await call(i)) == f"echo: q{i}"
            except Exception:
                errors += 1
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ideal = calls / tasks * 0.050
    label = f"{mode} (warm)" if warm else mode
    print(f"{label:<22} {calls:>6} {tasks:>6} {wall:>8.2f} s {100 * ideal / wall:>7.1f}% {1000 * cpu / calls:>9.2f} ms {errors:>6}")
    if mode == "echelon":
        await gw.close()

asyncio.run(main())
PY

echo "client                  calls  tasks     wall   ideal%  CPU/call  errors"
"$PY" "$work/bench.py" echelon "$url" "$work/echelon.yaml" "$calls" "$tasks"
"$PY" "$work/bench.py" openai-direct "$url" "$work/echelon.yaml" "$calls" "$tasks"
"$PY" "$work/bench.py" openai-via-serve "$serve_url" "$work/echelon.yaml" "$calls" "$tasks"
LITELLM_LOCAL_MODEL_COST_MAP=True "$PY" "$work/bench.py" litellm-router "$url" "$work/echelon.yaml" "$calls" "$tasks"
if [ "${WARM:-0}" = 1 ]; then
  "$PY" "$work/bench.py" echelon "$url" "$work/echelon.yaml" "$calls" "$tasks" warm
  "$PY" "$work/bench.py" openai-direct "$url" "$work/echelon.yaml" "$calls" "$tasks" warm
  "$PY" "$work/bench.py" openai-via-serve "$serve_url" "$work/echelon.yaml" "$calls" "$tasks" warm
  LITELLM_LOCAL_MODEL_COST_MAP=True "$PY" "$work/bench.py" litellm-router "$url" "$work/echelon.yaml" "$calls" "$tasks" warm
fi
echo "load average: $(cat /proc/loadavg)"
