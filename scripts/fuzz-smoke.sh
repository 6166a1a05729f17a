#!/usr/bin/env bash
# A short real fuzz run of each cargo-fuzz target (README "Fuzzing"): config_loader,
# sse_parser and request_parser, FUZZ_SECONDS each (default 20), one at a time, on one
# core, starting from the committed seeds in fuzz/corpus/ (new inputs go to a scratch
# directory, so the committed corpus is left as it is).
#
# Needs the nightly toolchain and cargo-fuzz; installs cargo-fuzz when it is missing.
# When either cannot be had, it says why and exits 0 (the stable replay of the corpus
# runs in `cargo test --workspace` regardless). A crash fails the script; its input is
# kept in fuzz/artifacts/<target>/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
seconds="${FUZZ_SECONDS:-20}"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz smoke skipped: no nightly toolchain (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  if ! cargo install cargo-fuzz --locked; then
    echo "fuzz smoke skipped: cargo-fuzz could not be installed"
    exit 0
  fi
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
status=0
for target in config_loader sse_parser request_parser; do
  echo "== fuzz $target for ${seconds}s"
  mkdir -p "$scratch/$target"
  log="$scratch/$target.log"
  if cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^Done [0-9]+ runs|^stat::(number_of_executed_units|peak_rss_mb)' "$log" || tail -n 5 "$log"
  else
    status=1
    tail -n 60 "$log"
    echo "fuzz smoke: $target FAILED; the input is in fuzz/artifacts/$target/"
  fi
done
exit "$status"
