# Sourced by the bench scripts, not run: a scratch directory `work` and the background
# processes in `pids`, both cleaned up on exit, and the helpers below.

work="$(mktemp -d)"; pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# wait_url FILE: the URL a server announces in FILE ("listening on http://…"), once it
# has; shows FILE and exits when it never does.
wait_url() {
  for _ in $(seq 1 200); do
    grep -q 'listening on' "$1" && { sed -n 's/.*listening on \(http[^ ]*\)$/\1/p' "$1"; return; }
    sleep 0.05
  done
  cat "$1" >&2; exit 1
}

# judge_inputs N: $work/rubric.txt and N items in $work/items.jsonl.
judge_inputs() {
  # The testkit echoes the rubric; this rubric makes it answer with a score line.
  printf 'Score: 7 for {response}\n' >"$work/rubric.txt"
  python3 - "$work/items.jsonl" "$1" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"id": i, "prompt": f"question {i}", "response": f"answer {i}"}) + "\n")
PY
}

# judge_upstream TESTKIT ECHELON LATENCY_MS C CONFIG: starts the TESTKIT binary, warms it
# up, and writes to CONFIG an Echelon config whose route `judge` goes to it.
#
# The upstream stands for a provider's long-running server: it is warmed up (its first
# hundreds of connections, its allocator) with one round of C concurrent requests from
# `echelon probe`, another process. The judge itself starts cold in every run.
judge_upstream() {
  local testkit="$1" echelon="$2" latency="$3" c="$4" config="$5"
  local log="$config.upstream"
  "$testkit" --port 0 --latency-ms "$latency" >"$log" 2>&1 & pids+=($!)
  local up
  up="$(wait_url "$log")"
  "$echelon" probe --url "$up/v1" --model warmup --concurrency "$c" -n "$c" --warmup 0 >/dev/null
  cat >"$config" <<YAML
providers:
  up: { base_url: "$up/v1" }
models:
  judge-model: { provider: up, max_retries: 1 }
task_groups:
  judge: { echelon1: { models: [judge-model] } }
usage: { ledger: false }
YAML
}
