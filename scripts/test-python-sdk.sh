#!/usr/bin/env bash
# The official openai Python SDK (PyPI, in .venv) against `echelon serve`, with two real
# llama-server instances (with --embeddings --pooling mean, so that they serve
# /v1/embeddings as well as chat) and a fault-injecting test upstream behind it.
# Needs the real upstream installed (scripts/real-upstream.sh install); fails if it is not.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

PY="$(scripts/python-venv.sh)"
cargo build -q -p echelon-cli -p echelon-testkit
ECHELON="$root/target/debug/echelon"
TESTKIT="$root/target/debug/echelon-testkit"

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  scripts/real-upstream.sh stop sdk 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mapfile -t inst < <(scripts/real-upstream.sh start 2 sdk --embeddings)
read -r a_name a_port _ a_key <<<"${inst[0]}"
read -r _ b_port _ b_key <<<"${inst[1]}"

# A test upstream whose every stream is cut after 3 content chunks.
"$TESTKIT" --port 0 --fault-rate 1 --faults stream-cut:3 >"$work/testkit.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$work/testkit.out" && break; sleep 0.05; done
faulty_url="$(sed -n 's/^listening on \(http[^ ]*\)$/\1/p' "$work/testkit.out")"

cat >"$work/echelon.yaml" <<YAML
providers:
  pa: { base_url: "http://127.0.0.1:$a_port/v1", api_keys: ["\${SDK_A_KEY}"] }
  pb: { base_url: "http://127.0.0.1:$b_port/v1", api_keys: ["\${SDK_B_KEY}"] }
  faulty: { base_url: "$faulty_url/v1" }
  dead: { base_url: "http://127.0.0.1:9/v1" }
models:
  real-a: { provider: pa, model: smollm2, timeout: 60, max_retries: 1, retry_delay: 0.1 }
  real-b: { provider: pb, model: smollm2, timeout: 60, max_retries: 1, retry_delay: 0.1 }
  cut-model: { provider: faulty, max_retries: 0 }
  dead-model: { provider: dead, max_retries: 0 }
task_groups:
  demo:
    echelon1: { models: [real-a] }
    echelon2: { models: [real-b] }
  emb-failover:
    echelon1: { models: [dead-model] }
    echelon2: { models: [real-b] }
YAML

SDK_A_KEY="$a_key" SDK_B_KEY="$b_key" "$ECHELON" serve --config "$work/echelon.yaml" --port 0 \
  >"$work/serve.out" 2>"$work/serve.err" &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$work/serve.out" && break; sleep 0.05; done
url="$(sed -n 's/^echelon listening on \(http[^ ]*\)$/\1/p' "$work/serve.out")"
[ -n "$url" ] || { cat "$work/serve.err"; exit 1; }

ECHELON_URL="$url/v1" ECHELON1_ALIAS="$a_name" "$PY" -m unittest -v tests/python/test_openai_sdk.py tests/python/test_openai_embeddings.py
ECHELON_URL="$url/v1" ECHELON1_ALIAS="$a_name" "$PY" -m unittest -v tests/python/test_openai_responses.py
