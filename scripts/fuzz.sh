#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 30), starting from
# the corpus, which keeps known bad inputs. cargo fuzz needs unstable compiler flags; the
# stable toolchain accepts them with RUSTC_BOOTSTRAP=1 (no other toolchain is fetched).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
for target in blk_request wire_request wire_server wire_client; do
  mkdir -p "corpus/$target"
  echo "fuzz: $target for ${seconds}s"
  log=$(mktemp)
  # New inputs go to a scratch corpus; the checked-in seeds (known bad inputs) are read only.
  scratch=$(mktemp -d)
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "$scratch" "corpus/$target" -- \
      -max_total_time="$seconds" >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $target FAILED (the crashing input is under fuzz/artifacts/$target)" >&2
    exit 1
  fi
  grep -E "^#[0-9]+ +DONE" "$log" || tail -3 "$log"
  rm -rf "$log" "$scratch"
done
echo "fuzz: ok"
