#!/usr/bin/env bash
# Runs the whole suite and ends with one summary line over every test binary, so the last
# line of the output counts every test (cargo's own last line is only its last binary's).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
log=target/test.log
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# Only cargo's own result lines: node logs printed by a failing test may say "N failed".
results=$(grep -E '^test result: ' "$log")
passed=$(echo "$results" | grep -Eo '[0-9]+ passed' | awk '{ s += $1 } END { print s + 0 }')
failed=$(echo "$results" | grep -Eo '[0-9]+ failed' | awk '{ s += $1 } END { print s + 0 }')
echo
echo "total: $passed passed, $failed failed"
exit "$status"
