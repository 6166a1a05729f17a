#!/usr/bin/env bash
# Before/after figures of the request core (issue 13, "Measure"), two trees on one machine.
#
#   bench/ab_core.sh BASELINE_DIR CURRENT_DIR            # AB_ROUNDS=2 rounds by default
#   RUN_SH=0 bench/ab_core.sh BASELINE_DIR CURRENT_DIR   # the divan benches only (~40 s)
#
# Each tree is a checkout of this workspace (e.g. `git worktree add --detach DIR COMMIT`).
# First builds everything in both trees (the divan benches and the release binaries of
# bench/run.sh), so no build runs during a measurement. Then, for AB_ROUNDS rounds, for
# each tree in turn (baseline first): the divan benches `request` (time and allocations of
# one small chat request, crates/echelon/benches/request.rs) and `hot_path` (each
# resilience layer), then `bench/run.sh --no-write` (wrk against `echelon serve`; its
# figures are already medians of its own rounds; ROUNDS and DURATION, if set, reach it).
# Alternating the trees spreads a drift of the machine over both.
#
# Prints, per figure: the median over the rounds and the min–max, before and after, and
# the change (after/before; after − before for the added latencies, whose sign may flip).
# Allocation counts (per request, divan's `alloc` row) do not depend on the load; times
# do, so run it on a quiet machine. Takes about 9 minutes at AB_ROUNDS=2 (bench/run.sh is
# ~2 min a run, the two divan benches ~10 s together), plus the builds (~15 min per tree
# from nothing on 2 cores; none when the trees are built).
#
# A baseline older than the request bench gets a copy of CURRENT_DIR's
# crates/echelon/benches/request.rs and its `[[bench]]` entry (uncommitted; said on
# stderr); the two copies must be the same file, else the counts would not compare.
# The raw outputs stay in $OUT (a new temporary directory unless set).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bench/ab_core.sh BASELINE_DIR CURRENT_DIR" >&2; exit 2; }
base="$(cd "$1" && pwd)" cur="$(cd "$2" && pwd)"
rounds="${AB_ROUNDS:-2}" run_sh="${RUN_SH:-1}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
start="$(date +%s)"

bench_src=crates/echelon/benches/request.rs
[ -f "$cur/$bench_src" ] || { echo "$cur has no $bench_src" >&2; exit 1; }
for tree in "$base" "$cur"; do
  [ -f "$tree/bench/run.sh" ] || { echo "$tree: no bench/run.sh (not an Echelon tree?)" >&2; exit 1; }
  if [ ! -f "$tree/$bench_src" ]; then
    echo "ab_core: copying $bench_src and its [[bench]] entry into $tree (uncommitted)" >&2
    cp "$cur/$bench_src" "$tree/$bench_src"
  fi
  cmp -s "$cur/$bench_src" "$tree/$bench_src" \
    || { echo "$tree/$bench_src differs from $cur's: the counts would not compare" >&2; exit 1; }
  grep -q '^name = "request"' "$tree/crates/echelon/Cargo.toml" \
    || printf '\n[[bench]]\nname = "request"\nharness = false\n' >>"$tree/crates/echelon/Cargo.toml"
done

echo "building both trees (release binaries and the benches)"
for tree in "$base" "$cur"; do
  (cd "$tree" && cargo build --release -q -p echelon-cli -p echelon-testkit \
    && cargo bench -q -p echelon --bench request --bench hot_path --no-run)
done
command -v wrk >/dev/null || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get install -y -qq wrk >/dev/null; }

echo "load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs); raw outputs in $out"
for round in $(seq 1 "$rounds"); do
  for side in base cur; do
    tree="$base"; [ "$side" = cur ] && tree="$cur"
    for b in request hot_path; do
      t0="$(date +%s)"
      (cd "$tree" && cargo bench -q -p echelon --bench "$b" -- --color never) >"$out/$side.$round.$b.txt" 2>"$out/$side.$round.$b.err"
      echo "round $round, $side: $b done in $(( $(date +%s) - t0 )) s"
    done
    [ "$run_sh" = 1 ] || continue
    t0="$(date +%s)"
    (cd "$tree" && bench/run.sh --no-write) >"$out/$side.$round.run.txt" 2>"$out/$side.$round.run.err"
    echo "round $round, $side: bench/run.sh done in $(( $(date +%s) - t0 )) s"
  done
done

echo
rev() { git -C "$1" describe --always --dirty 2>/dev/null || echo "not git"; }
took=$(( $(date +%s) - start ))
echo "## bench/ab_core.sh: before = $base ($(rev "$base")), after = $cur ($(rev "$cur"))"
echo "rounds: $rounds, alternating; median (min–max) over the rounds; load average at the end $(cut -d' ' -f1-3 /proc/loadavg); took $((took / 60)) min $((took % 60)) s"
python3 - "$out" "$rounds" <<'PY'
import os, re, statistics, sys
from collections import defaultdict
out, rounds = sys.argv[1], int(sys.argv[2])

UNITS = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
BYTES = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}

def cells(line):
    """The columns of a divan row after its name (or tree lines): fastest, slowest,
    median, mean, samples, iters."""
    return [c.strip() for c in line.split("│")]

def divan(path):
    """{bench path: {"time_us": median, "allocs": median count, "alloc_bytes": median}}."""
    res, stack, sub = {}, [], None
    for line in open(path, encoding="utf-8"):
        m = re.match(r"^((?:[│ ]  )*)[├╰]─ (\S+)(.*)$", line)
        if m:
            depth = len(m.group(1)) // 3
            stack[depth:] = [m.group(2)]
            cols = cells(m.group(3))
            sub = None
            if len(cols) >= 4 and cols[2]:
                num, unit = cols[2].split()
                res["/".join(stack)] = {"time_us": float(num) * UNITS[unit]}
            continue
        if not stack or "/".join(stack) not in res:
            continue
        cols = cells(line.lstrip("│ "))
        if cols[0].endswith(":"):
            sub, seen = cols[0][:-1], 0
            continue
        if sub == "alloc" and len(cols) >= 3:
            seen += 1
            val = cols[2]
            r = res["/".join(stack)]
            if seen == 1:
                r["allocs"] = float(val)
            elif seen == 2:
                num, unit = val.split()
                r["alloc_bytes"] = float(num) * BYTES[unit]
    return res

def run_sh(path):
    """{(scenario, figure): value} from bench/run.sh's table."""
    res = {}
    for line in open(path, encoding="utf-8"):
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) == 9 and re.match(r"^(json|stream) c\d+", cols[0]):
            name = cols[0]
            res[(name, "gateway req/s")] = float(cols[2].replace(",", ""))
            res[(name, "gateway/direct %")] = float(cols[3].rstrip("%"))
            add50, add99 = (float(x) for x in cols[6].split(" / "))
            res[(name, "added p50 ms")] = add50
            res[(name, "added p99 ms")] = add99
            res[(name, "gateway CPU s/1k req")] = float(cols[7])
            res[(name, "errors")] = float(cols[8])
        elif len(cols) == 4 and cols[0].startswith("time to first token p50"):
            res[("ttft c1 0ms", "gateway p50 ms")] = float(cols[2])
            res[("ttft c1 0ms", "added p50 ms")] = float(cols[3])
        m = re.search(r"peak RSS \(VmHWM\) over the whole run: \*\*([\d.]+) MiB", line)
        if m:
            res[("whole run", "gateway peak RSS MiB")] = float(m.group(1))
    return res

vals = defaultdict(lambda: defaultdict(list))  # (table, row, figure) -> side -> [values]
for side in ("base", "cur"):
    for rnd in range(1, rounds + 1):
        for b in ("request", "hot_path"):
            for name, figs in divan(f"{out}/{side}.{rnd}.{b}.txt").items():
                if b == "hot_path":
                    figs = {"time_ns": figs["time_us"] * 1e3}
                for fig, v in figs.items():
                    vals[(b, name, fig)][side].append(v)
        if os.path.exists(f"{out}/{side}.{rnd}.run.txt"):
            for (name, fig), v in run_sh(f"{out}/{side}.{rnd}.run.txt").items():
                vals[("run.sh", name, fig)][side].append(v)

def fmt(x):
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if x else "0"

def cell(xs):
    if not xs:
        return "–"
    med = statistics.median(xs)
    if len(xs) == 1 or min(xs) == max(xs):
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(xs))}–{fmt(max(xs))})"

labels = {"time_us": "median time µs", "time_ns": "median time ns", "allocs": "allocs / req", "alloc_bytes": "alloc bytes / req"}
for table, title in (("request", "divan `request` (per request)"),
                     ("hot_path", "divan `hot_path` (median time per iteration; the ledger's is a batch of 256)"),
                     ("run.sh", "bench/run.sh --no-write (each value a median of its own rounds)")):
    rows = [k for k in vals if k[0] == table]
    if not rows:
        print(f"\n(no figures for {table}: see the raw outputs)")
        continue
    print(f"\n### {title}\n")
    print("| bench | figure | before | after | change |")
    print("| --- | --- | ---: | ---: | ---: |")
    for key in rows:
        _, name, fig = key
        b, c = vals[key]["base"], vals[key]["cur"]
        change = "–"
        if b and c and fig.startswith("added"):  # a difference; its sign may flip
            change = f"{statistics.median(c) - statistics.median(b):+.3f} ms"
        elif b and c and statistics.median(b) and fig != "errors":
            change = f"×{statistics.median(c) / statistics.median(b):.3f}"
        print(f"| {name} | {labels.get(fig, fig)} | {cell(b)} | {cell(c)} | {change} |")
PY
