#!/usr/bin/env bash
# The external failover scorecard (failoverbench, MIT; a copy with its notice in
# ../shared/third_party/failoverbench) against `echelon serve`: its fault wall, an
# Echelon config that puts each scenario's faulty model (echelon1) and the wall's healthy
# model (echelon2) in one task group, all 16 scenarios, the scorecard.
#
# Exits non-zero when any scenario scores `fail` (a truncated or wrong answer reported
# as success, a hang). Usage: scripts/failoverbench.sh [--profile full|fast] [--only S01,S08] [--plain]
# (--plain: the config without the three preferences bench/failoverbench/config.py names)
# Env: FAILOVERBENCH_SRC (default ../shared/third_party/failoverbench),
#      FAILOVERBENCH_OUT (where the result JSON and the scorecard go; default a temp dir).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

profile=full
only=""
plain=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --plain) plain="--plain"; shift ;;
    *) echo "usage: $0 [--profile full|fast] [--only S01,S08] [--plain]" >&2; exit 2 ;;
  esac
done

src="${FAILOVERBENCH_SRC:-$root/../shared/third_party/failoverbench}"
[ -f "$src/pyproject.toml" ] || { echo "failoverbench not found at $src (set FAILOVERBENCH_SRC)" >&2; exit 1; }

cache="${XDG_CACHE_HOME:-$HOME/.cache}/echelon/failoverbench"
mkdir -p "$cache"
# ../shared is read-only and a pip build writes into the source folder: install from a
# copy. The venv is kept between runs; the copy is refreshed when the source changes.
stamp="$(cd "$src" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
if [ ! -f "$cache/stamp" ] || [ "$(cat "$cache/stamp")" != "$stamp" ] || [ ! -x "$cache/venv/bin/python" ]; then
  echo "== installing failoverbench from $src"
  rm -rf "$cache/src" "$cache/venv"
  cp -r "$src" "$cache/src"
  chmod -R u+w "$cache/src"
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install -q -e "$cache/src" >/dev/null
  echo "$stamp" >"$cache/stamp"
fi
PY="$cache/venv/bin/python"

cargo build -q -p echelon-cli
ECHELON="$root/target/debug/echelon"

out="${FAILOVERBENCH_OUT:-}"
work="$(mktemp -d)"
[ -n "$out" ] || out="$work/results"
mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wall_port="$(free_port)"
(cd "$cache/src" && exec "$PY" -m failoverbench wall --port "$wall_port" --profile "$profile") \
  >"$work/wall.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$work/wall.out" && break; sleep 0.1; done
grep -q 'listening on' "$work/wall.out" || { cat "$work/wall.out"; exit 1; }

# The config a new user would write: one task group per scenario model, echelon1 the
# faulty upstream, echelon2 the healthy one (S14's fallback rejects prefill). Written
# from the catalogue so a new scenario gets its group.
cfg="$work/echelon.yaml"
"$PY" bench/failoverbench/config.py "$cache/src/scenarios/catalogue.yaml" \
  "http://127.0.0.1:$wall_port/v1" $plain >"$cfg"
"$ECHELON" config validate "$cfg" >/dev/null

ECHELON_DATA_DIR="$work/data" "$ECHELON" serve --config "$cfg" --port 0 \
  >"$work/serve.out" 2>"$work/serve.err" &
pids+=($!)
for _ in $(seq 1 100); do grep -q 'listening on' "$work/serve.out" && break; sleep 0.1; done
url="$(sed -n 's/^echelon listening on \(http[^ ]*\)$/\1/p' "$work/serve.out")"
[ -n "$url" ] || { cat "$work/serve.err"; exit 1; }

cat >"$work/echelon-system.yaml" <<YAML
name: echelon
label: "Echelon (echelon serve, one task group per scenario)"
adapter: endpoint
notes: "scripts/failoverbench.sh: echelon1 the faulty model, echelon2 the healthy one; stream_failure: continue."
params:
  base_url: $url/v1
  api_key: sk-failoverbench
YAML

echo "== failoverbench ($profile profile) against echelon serve at $url"
args=(run --system "$work/echelon-system.yaml" --wall "http://127.0.0.1:$wall_port" --profile "$profile" --out "$out")
[ -z "$only" ] || args+=(--only "$only")
(cd "$cache/src" && "$PY" -m failoverbench "${args[@]}")
"$PY" bench/failoverbench/scorecard.py "$out/$profile/echelon.json" | tee "$out/SCORECARD.md"
