#!/usr/bin/env bash
# Compares builds on the judge benchmark (issue 6) by alternating them run by run, so
# that the machine's drift hits every build alike; prints each combination's median wall
# time over N runs.
#
#   bench/judge_ab.sh N ECHELON[,ECHELON...] TESTKIT[,TESTKIT...]
#
# ECHELON and TESTKIT are paths to `echelon` and `echelon-testkit` binaries (copy
# target/release/... aside between builds). Each testkit runs as its own upstream at
# 50 ms, warmed up as in bench/judge.sh; each run judges 2,000 items at concurrency 256.
set -euo pipefail
n="${1:?runs}"
IFS=, read -ra judges <<<"${2:?echelon binaries}"
IFS=, read -ra testkits <<<"${3:?testkit binaries}"

source "$(dirname "$0")/common.sh"

judge_inputs 2000
for t in "${!testkits[@]}"; do
  judge_upstream "${testkits[$t]}" "${judges[0]}" 50 256 "$work/c$t.yaml"
done

for _ in $(seq 1 "$n"); do
  for j in "${!judges[@]}"; do
    for t in "${!testkits[@]}"; do
      rm -f "$work/out.jsonl"
      wall="$("${judges[$j]}" judge --config "$work/c$t.yaml" --route judge \
        --input "$work/items.jsonl" --output "$work/out.jsonl" --rubric "$work/rubric.txt" \
        --concurrency 256 --no-cache 2>&1 >/dev/null | sed -n 's/.*wall_ms \([0-9]*\).*/\1/p')"
      echo "$j $t $wall"
    done
  done
done >"$work/runs.txt"

python3 - "$work/runs.txt" "${2}" "${3}" <<'PY'
import collections, statistics, sys
judges, testkits = sys.argv[2].split(","), sys.argv[3].split(",")
walls = collections.defaultdict(list)
for line in open(sys.argv[1]):
    j, t, w = line.split()
    walls[(int(j), int(t))].append(int(w))
for (j, t), w in sorted(walls.items()):
    w.sort()
    med = statistics.median(w)
    print(f"{judges[j]} + {testkits[t]}: median {med} ms ({390.625 / med:.1%}), "
          f"min {w[0]}, max {w[-1]}, runs {w}")
PY
