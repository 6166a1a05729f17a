#!/usr/bin/env bash
# Makes .venv with the official openai SDK (PyPI), once; prints the python path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'openai>=1.40,<3'
fi
echo "$venv/bin/python"
