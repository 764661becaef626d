#!/usr/bin/env bash
# Coverage-guided fuzzing of every target with libFuzzer (cargo-fuzz), SECONDS_PER_TARGET each (default 60).
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain; without nightly, RUSTC_BOOTSTRAP=1 with
# `--sanitizer none` is tried. Corpora grow in fuzz/corpus/<target>/ (git-ignored); crashes land in
# fuzz/artifacts/<target>/ and make the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${SECONDS_PER_TARGET:-60}"
targets=("${@:-token jwks config tenant scopes reach bearer host_proto der}")
if rustup run nightly rustc --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
  extra=(--sanitizer none)
fi
for t in ${targets[@]}; do
  echo "==> libFuzzer: $t for ${secs}s"
  "${fuzz[@]}" run --fuzz-dir fuzz -O ${extra[@]+"${extra[@]}"} "$t" -- -max_total_time="$secs" -print_final_stats=1 \
    2>&1 | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done|==[0-9]+==|SUMMARY|thread '.*' panicked|Failing input)" || true
  if compgen -G "fuzz/artifacts/$t/crash-*" >/dev/null; then
    echo "crash found for $t: $(ls fuzz/artifacts/$t/crash-*)"; exit 1
  fi
done
