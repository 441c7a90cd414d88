#!/usr/bin/env bash
# Runs the whole suite and ends with one summary line over every test binary, so the last
# line of the output counts every test (cargo's own last line is only its last binary's).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
log=target/test.log
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{ s += $1 } END { print s + 0 }')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{ s += $1 } END { print s + 0 }')
echo
echo "total: $passed passed, $failed failed"
exit "$status"
