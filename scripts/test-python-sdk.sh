#!/usr/bin/env bash
# The official openai and anthropic Python SDKs (PyPI, in .venv) against `echelon serve`,
# with two real llama-server instances (with --embeddings --pooling mean, so that they
# serve /v1/embeddings as well as chat) and fault-injecting test upstreams behind it.
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
read -r b_name b_port _ b_key <<<"${inst[1]}"

# A test upstream whose every stream is cut after 3 content chunks.
"$TESTKIT" --port 0 --fault-rate 1 --faults stream-cut:3 >"$work/testkit.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$work/testkit.out" && break; sleep 0.05; done
faulty_url="$(sed -n 's/^listening on \(http[^ ]*\)$/\1/p' "$work/testkit.out")"

# A healthy test upstream: it calls the tool a request forces (the anthropic SDK's tool use).
"$TESTKIT" --port 0 >"$work/tools.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$work/tools.out" && break; sleep 0.05; done
tools_url="$(sed -n 's/^listening on \(http[^ ]*\)$/\1/p' "$work/tools.out")"

# A test upstream whose every request is refused 529 (Anthropic's overloaded), spoken to
# over the Anthropic wire: echelon1 of a task group whose echelon2 is the real model.
"$TESTKIT" --port 0 --fault-rate 1 --faults 529 >"$work/overloaded.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$work/overloaded.out" && break; sleep 0.05; done
overloaded_url="$(sed -n 's/^listening on \(http[^ ]*\)$/\1/p' "$work/overloaded.out")"

cat >"$work/echelon.yaml" <<YAML
providers:
  pa: { base_url: "http://127.0.0.1:$a_port/v1", api_keys: ["\${SDK_A_KEY}"] }
  pb: { base_url: "http://127.0.0.1:$b_port/v1", api_keys: ["\${SDK_B_KEY}"] }
  faulty: { base_url: "$faulty_url/v1" }
  tools: { base_url: "$tools_url/v1" }
  overloaded: { base_url: "$overloaded_url", api: anthropic, api_keys: ["sk-ant-unused"] }
  dead: { base_url: "http://127.0.0.1:9/v1" }
models:
  real-a: { provider: pa, model: smollm2, timeout: 60, max_retries: 1, retry_delay: 0.1 }
  real-b: { provider: pb, model: smollm2, timeout: 60, max_retries: 1, retry_delay: 0.1 }
  cut-model: { provider: faulty, max_retries: 0 }
  tools-model: { provider: tools, max_retries: 0 }
  claude-overloaded: { provider: overloaded, model: claude-test, max_retries: 0 }
  dead-model: { provider: dead, max_retries: 0 }
task_groups:
  demo:
    echelon1: { models: [real-a] }
    echelon2: { models: [real-b] }
  emb-failover:
    echelon1: { models: [dead-model] }
    echelon2: { models: [real-b] }
  claude-first:
    echelon1: { models: [claude-overloaded] }
    echelon2: { models: [real-b] }
YAML

# The same gateway with a gateway key, for the anthropic SDK's x-api-key and bearer auth.
{ cat "$work/echelon.yaml"; printf 'server:\n  api_keys: ["${SDK_GATEWAY_KEY}"]\n'; } >"$work/keyed.yaml"
gateway_key="sdk-gateway-key-$RANDOM$RANDOM"

start_echelon() { # NAME CONFIG: starts it, prints its URL
  SDK_A_KEY="$a_key" SDK_B_KEY="$b_key" SDK_GATEWAY_KEY="$gateway_key" \
    "$ECHELON" serve --config "$2" --port 0 >"$work/$1.out" 2>"$work/$1.err" &
  pids+=($!)
  for _ in $(seq 1 100); do grep -q 'listening on' "$work/$1.out" && break; sleep 0.05; done
  sed -n 's/^echelon listening on \(http[^ ]*\)$/\1/p' "$work/$1.out"
}
start_echelon serve "$work/echelon.yaml" >"$work/serve.url"
start_echelon keyed "$work/keyed.yaml" >"$work/keyed.url"
url="$(cat "$work/serve.url")"
keyed_url="$(cat "$work/keyed.url")"
[ -n "$url" ] || { cat "$work/serve.err"; exit 1; }
[ -n "$keyed_url" ] || { cat "$work/keyed.err"; exit 1; }

ECHELON_URL="$url/v1" ECHELON1_ALIAS="$a_name" "$PY" -m unittest -v tests/python/test_openai_sdk.py tests/python/test_openai_embeddings.py
ECHELON_URL="$url/v1" ECHELON1_ALIAS="$a_name" "$PY" -m unittest -v tests/python/test_openai_responses.py
ECHELON_BASE="$url" ECHELON_KEYED_BASE="$keyed_url" ECHELON_KEY="$gateway_key" \
  ECHELON1_ALIAS="$a_name" ECHELON2_ALIAS="$b_name" "$PY" -m unittest -v tests/python/test_anthropic_sdk.py
