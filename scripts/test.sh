#!/usr/bin/env bash
# Every test: Rust unit and integration tests (the end-to-end ones against real
# llama-server instances) and the official openai Python SDK against `echelon serve`.
# Installs what it needs first (llama-server + SmolLM2 offline, cached; a Python venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# Unused dependencies fail the run (a source scan, well under a second); the tool is
# installed once per machine.
echo "== cargo machete"
if ! cargo machete --version >/dev/null 2>&1; then
    cargo install --locked cargo-machete
fi
cargo machete

scripts/real-upstream.sh install
scripts/python-venv.sh >/dev/null

# Ledgers of the servers the tests start go to a scratch directory, not the user's.
ECHELON_DATA_DIR="$(mktemp -d)"
export ECHELON_DATA_DIR
trap 'rm -rf "$ECHELON_DATA_DIR"' EXIT

# A missing real upstream fails the run instead of skipping.
export ECHELON_REQUIRE_REAL_UPSTREAM=1

echo "== cargo test --workspace"
cargo test --workspace --locked

echo "== openai Python SDK against echelon serve"
scripts/test-python-sdk.sh
scripts/test-python-bindings.sh
