#!/usr/bin/env bash
# Makes .venv with the official openai and anthropic SDKs (PyPI), once; prints the python path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai, anthropic' 2>/dev/null; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian/Ubuntu ship venv separately.
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check 'openai>=1.40,<3' 'anthropic>=0.40,<3'
fi
echo "$venv/bin/python"
