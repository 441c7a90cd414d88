#!/usr/bin/env bash
# Import/export throughput of a 3-node loopback cluster (R=2), against dd to and from a
# local file on the same filesystem, measured in the same run. Prints the ratios.
# Stops by itself and kills the nodes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/target/release/converge"
DIR="$PWD/target/bench-import"
SIZE_MIB=${SIZE_MIB:-512}
PORT=7800
IPS=(127.0.0.12 127.0.0.13 127.0.0.14)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
source "$(dirname "$0")/bench-cluster.sh"
now() { date +%s.%N; }
rate() { awk -v mib="$SIZE_MIB" -v s="$1" 'BEGIN { printf "%.0f", mib / s }'; }

rm -rf "$DIR"; mkdir -p "$DIR"
bench_cluster $((SIZE_MIB * 2 + 64))M
cv "${IPS[0]}" volume create bench --size "${SIZE_MIB}M" --replicas 2 >/dev/null

head -c $((SIZE_MIB << 20)) /dev/urandom >"$DIR/input.raw"
sync

t0=$(now); dd if="$DIR/input.raw" of="$DIR/reference.raw" bs=1M oflag=direct conv=fsync status=none; t1=$(now)
dd_write=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
t0=$(now); cv "${IPS[0]}" volume import bench "$DIR/input.raw" --format raw >/dev/null; t1=$(now)
cv_import=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
t0=$(now); dd if="$DIR/reference.raw" of=/dev/null bs=1M iflag=direct status=none; t1=$(now)
dd_read=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
t0=$(now); cv "${IPS[1]}" volume export bench "$DIR/output.raw" >/dev/null; t1=$(now)
cv_export=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
cmp -s "$DIR/input.raw" "$DIR/output.raw" || { echo "exported bytes differ from the input" >&2; exit 1; }

echo "converge import/export, ${SIZE_MIB} MiB, 3 nodes on loopback, 2 replicas (both on this machine's one disk)"
printf '%-44s %8s MiB/s\n' "reference: dd to local file (O_DIRECT, fsync)" "$(rate "$dd_write")"
printf '%-44s %8s MiB/s  ratio %.2f\n' "converge volume import through one node" "$(rate "$cv_import")" "$(awk -v a="$dd_write" -v b="$cv_import" 'BEGIN { print a / b }')"
printf '%-44s %8s MiB/s\n' "reference: dd from local file (O_DIRECT)" "$(rate "$dd_read")"
printf '%-44s %8s MiB/s  ratio %.2f\n' "converge volume export through another node" "$(rate "$cv_export")" "$(awk -v a="$dd_read" -v b="$cv_export" 'BEGIN { print a / b }')"
