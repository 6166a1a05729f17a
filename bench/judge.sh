#!/usr/bin/env bash
# Batch-judge efficiency (issues 6 and 17): N items, K samples each, through the testkit
# upstream at 50 ms latency with --concurrency C; wall time against the ideal
# N × K × 50 ms / C (C judge calls in flight at once), and the judge's peak RSS; and, with
# K = 1, sequential vs concurrent on 5 items, as seed 003 measured.
#
#   bench/judge.sh [N=2000] [C=256] [K=1]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
n="${1:-2000}" c="${2:-256}" k="${3:-1}"
cargo build --release -q -p echelon-cli -p echelon-testkit

source "$root/bench/common.sh"

judge_upstream target/release/echelon-testkit target/release/echelon "${LATENCY_MS:-50}" "$c" "$work/c.yaml"
judge_inputs "$n"
head -5 "$work/items.jsonl" >"$work/five.jsonl"

samples=()
[ "$k" -gt 1 ] && samples=(--samples "$k" --seed 1)

run() { # $1 = input, $2 = concurrency → the run's wall seconds (as the judge reports
  # them: from the first item read to the last line written; process start-up excluded)
  rm -f "$work/out.jsonl"
  local timed=()
  [ -x /usr/bin/time ] && timed=(/usr/bin/time -f 'max_rss_kb %M' -o "$work/rss")
  "${timed[@]}" target/release/echelon judge --config "$work/c.yaml" --route judge --input "$1" \
    --output "$work/out.jsonl" --rubric "$work/rubric.txt" --concurrency "$2" --no-cache \
    "${samples[@]}" >/dev/null 2>"$work/judge.err" || { tail -5 "$work/judge.err" >&2; exit 1; }
  [ "$(wc -l <"$work/out.jsonl")" -eq "$(wc -l <"$1")" ] || { echo "missing output lines" >&2; exit 1; }
  sed -n 's/.*wall_ms \([0-9]*\).*/\1/p' "$work/judge.err" | awk '{printf "%.3f", $1 / 1000}'
}

wall="$(run "$work/items.jsonl" "$c")"
rss="-"
[ -s "$work/rss" ] && rss="$(awk '/max_rss_kb/ {printf "%.0f MB", $2 / 1024}' "$work/rss")"
ideal="$(awk -v n="$n" -v k="$k" -v c="$c" 'BEGIN {printf "%.3f", n * k * 0.050 / c}')"
eff="$(awk -v i="$ideal" -v w="$wall" 'BEGIN {printf "%.1f", i / w * 100}')"
echo "$n items × $k samples, concurrency $c, 50 ms upstream: wall ${wall}s, ideal ${ideal}s, efficiency ${eff}%, peak RSS $rss"
if [ "$k" -eq 1 ]; then
  seq_wall="$(run "$work/five.jsonl" 1)"
  con_wall="$(run "$work/five.jsonl" 5)"
  speedup="$(awk -v a="$seq_wall" -v b="$con_wall" 'BEGIN {printf "%.2f", a / b}')"
  echo "5 items: sequential ${seq_wall}s, concurrent ${con_wall}s, speed-up ${speedup}x"
fi
