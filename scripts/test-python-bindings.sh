#!/usr/bin/env bash
# The Python package (python/, the `echelon` module): builds the wheel from this checkout
# with maturin (from PyPI, into the .venv of scripts/python-venv.sh), installs it, and runs
# its pytest suite (python/tests) against fault-injecting test upstreams and one real
# llama-server. Needs the real upstream installed (scripts/real-upstream.sh install).
# The wheel is a debug build in the workspace's target/ (shared with cargo): after the
# first build only the bindings crate recompiles.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

PY="$(scripts/python-venv.sh)"
venv_bin="$(dirname "$PY")"
if ! "$venv_bin/maturin" --version >/dev/null 2>&1 || ! "$PY" -c 'import pytest' 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check 'maturin>=1.9,<2' 'pytest>=8,<10'
fi
cargo build -q --locked -p echelon-testkit

work="$(mktemp -d)"
cleanup() {
  scripts/real-upstream.sh stop bindings 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

t0=$(date +%s%N)
(cd python && "$venv_bin/maturin" build --locked --out "$work/wheels" 2>"$work/maturin.log") ||
  { cat "$work/maturin.log"; exit 1; }
t1=$(date +%s%N)
ms=$(((t1 - t0) / 1000000))
printf 'wheel built in %d.%03d s: %s\n' $((ms / 1000)) $((ms % 1000)) "$(basename "$work"/wheels/*.whl)"
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$work"/wheels/*.whl

mapfile -t inst < <(scripts/real-upstream.sh start 1 bindings)
read -r _ real_port _ real_key <<<"${inst[0]}"

# Run from python/tests so that `import echelon` is the installed wheel.
ECHELON_TESTKIT="$root/target/debug/echelon-testkit" \
  ECHELON_REAL_URL="http://127.0.0.1:$real_port/v1" ECHELON_REAL_KEY="$real_key" \
  "$PY" -m pytest -q -p no:cacheprovider --rootdir python/tests python/tests
