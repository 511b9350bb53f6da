#!/usr/bin/env bash
# `make fuzz`: runs each cargo-fuzz target for FUZZ_SECONDS (default 120).
# New inputs go to a scratch corpus under .run/fuzz; a crash, timeout or OOM
# lands in fuzz/regressions/<target>/ (replayed by `make test`: commit it).
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-120}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
failed=0
summary=()
for t in ${FUZZ_TARGETS:-bearer classify config}; do
  mkdir -p ".run/fuzz/$t" "fuzz/regressions/$t"
  echo "fuzzing $t for ${seconds}s"
  # RUSTC_BOOTSTRAP: the sanitizer flags are nightly-only; this machine has only stable.
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer address "$t" ".run/fuzz/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 \
    -artifact_prefix="fuzz/regressions/$t/" -print_final_stats=1 > ".run/fuzz/$t.log" 2>&1
  rc=$?
  runs=$(awk '/stat::number_of_executed_units/{print $2}' ".run/fuzz/$t.log" | tail -1)
  if [ $rc -ne 0 ]; then
    failed=1
    summary+=("| $t | ${runs:-?} | FAILED: see .run/fuzz/$t.log and fuzz/regressions/$t/ |")
  else
    summary+=("| $t | ${runs:-?} | no panic, timeout or OOM |")
  fi
done
echo
echo "| target | executions in ${seconds}s | result |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
exit $failed
