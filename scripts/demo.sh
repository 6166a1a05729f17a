#!/usr/bin/env bash
# Echelon demo, end to end on real models:
#   1. builds echelon, installs llama-server + SmolLM2 (cached after the first run);
#   2. starts two llama-server instances (each with its own alias and API key);
#   3. starts `echelon serve` with examples/demo.yaml: task group demo_group has the
#      first as echelon1 and the second as echelon2;
#   4. sends a chat and a streamed chat through the official openai Python SDK;
#   5. kills the echelon1 server and shows the next request answered by echelon2,
#      with the failed attempts visible.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building echelon (release)"
cargo build --release -q -p echelon-cli
ECHELON="$root/target/release/echelon"

say "installing the real upstream (llama-server + SmolLM2-135M-Instruct; cached)"
scripts/real-upstream.sh install

say "python venv with the official openai SDK"
scripts/python-venv.sh >/dev/null
PY="$root/.venv/bin/python"

cleanup() {
  [ -n "${serve_pid:-}" ] && kill "$serve_pid" 2>/dev/null || true
  scripts/real-upstream.sh stop demo 2>/dev/null || true
}
trap cleanup EXIT

say "starting two llama-server instances"
scripts/real-upstream.sh stop demo 2>/dev/null || true
mapfile -t inst < <(scripts/real-upstream.sh start 2 demo)
read -r a_name a_port a_pid a_key <<<"${inst[0]}"
read -r b_name b_port b_pid b_key <<<"${inst[1]}"
echo "echelon1: $a_name on port $a_port (pid $a_pid)"
echo "echelon2: $b_name on port $b_port (pid $b_pid)"
export LOCAL_A_URL="http://127.0.0.1:$a_port/v1" LOCAL_A_KEY="$a_key"
export LOCAL_B_URL="http://127.0.0.1:$b_port/v1" LOCAL_B_KEY="$b_key"

say "echelon config validate examples/demo.yaml"
"$ECHELON" config validate examples/demo.yaml

say "echelon serve --config examples/demo.yaml"
log="$(mktemp)"
"$ECHELON" serve --config examples/demo.yaml --port 0 >"$log" 2>"$log.err" &
serve_pid=$!
for _ in $(seq 1 100); do grep -q 'listening on' "$log" && break; sleep 0.1; done
url="$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$log" | head -1)"
[ -n "$url" ] || { cat "$log.err"; exit 1; }
echo "gateway at $url"

say "the official openai SDK through Echelon (route demo_group)"
"$PY" examples/demo_client.py "$url/v1" demo_group

say "killing the echelon1 server ($a_name, pid $a_pid)"
kill "$a_pid"; sleep 0.3

say "the same request again: echelon1 fails, echelon2 answers"
"$PY" examples/demo_client.py "$url/v1" demo_group --no-stream

say "echelon judge: scoring examples/judge_sample.jsonl (54 pairs) with the real model (pool demo_pool)"
# --verdict json_schema: the request carries response_format with a JSON schema
# ({"score": integer 1-10}); llama-server constrains SmolLM2's output to it, so nearly
# every item gets a score (the regex verdict left most of them "unparsed").
scores="$(mktemp)" summary="$(mktemp)"
"$ECHELON" judge --config examples/demo.yaml --route demo_pool --input examples/judge_sample.jsonl \
  --output "$scores" --rubric examples/judge_rubric.txt --verdict json_schema --max-tokens 24 \
  --seed 7 --concurrency 4 --no-cache --summary-json "$summary" \
  2> >(grep -v -E 'WARN|INFO' >&2) || true
echo "first lines of the output:"
head -3 "$scores" | cut -c1-220
"$PY" - "$summary" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"scored {s['scored']} of {s['judged']}, unparsed {s['unparsed']} "
      f"({s['parse_failure_rate']:.1%}); errors by kind: "
      + (", ".join(f"{k} {v['count']}" for k, v in s['errors'].items()) or "none"))
PY
echo "(an item without a readable verdict would say \"error\": \"unparsed\" — never a made-up score)"

say "echelon judge --samples 5: five judgements per item (seeds 7..11, temperature 0.7), averaged"
votes="$(mktemp)"
head -6 examples/judge_sample.jsonl >"$votes.in"
"$ECHELON" judge --config examples/demo.yaml --route demo_pool --input "$votes.in" \
  --output "$votes" --rubric examples/judge_rubric.txt --verdict json_schema --max-tokens 24 \
  --seed 7 --samples 5 --aggregate mean --concurrency 4 --no-cache \
  2> >(grep -v -E 'WARN|INFO' >&2) || true
"$PY" - "$votes" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    j = json.loads(line)
    print(f"{j['id']}: score {j['score']} from samples {j.get('samples')} (stdev {j.get('stdev')}) {j.get('error') or ''}")
PY

say "echelon judge --mode pairwise --swap: which of two answers is better, asked in both orders"
prefs="$(mktemp)"
"$ECHELON" judge --config examples/demo.yaml --route demo_pool --input examples/judge_pairs.jsonl \
  --output "$prefs" --mode pairwise --swap --verdict json_schema --max-tokens 24 --seed 7 \
  --concurrency 4 --no-cache 2> >(grep -v -E 'WARN|INFO' >&2) || true
head -3 "$prefs" | cut -c1-200
echo "(position_consistent: false = the judge picked by position, not content; such a pair is a tie)"

say "gateway log (failed attempts)"
grep -E 'attempt failed' "$log.err" | sed 's/\x1b\[[0-9;]*m//g' | tail -5 || true
