#!/usr/bin/env bash
# 4 KiB O_DIRECT write and read latency at queue depth 1 inside the test guest (TCG here),
# on a converge volume (2 replicas, 3 nodes on loopback, vhost-user-blk) against the same
# guest with its data disk as a local raw file on QEMU's virtio-blk (durable per write:
# cache=directsync; and cache=none for scale), measured in the same run. Prints both and the ratio. Stops by itself and kills what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/target/release/converge"
DIR="$PWD/target/bench-vm"
GUEST="$PWD/target/guest"
PORT=7900
IPS=(127.0.0.42 127.0.0.43 127.0.0.44)
CMDLINE="console=ttyS0 panic=-1 quiet gmode=bench"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
source "$(dirname "$0")/bench-cluster.sh"
figure() { grep -o "GUEST: BENCH $1 us_per_io=[0-9]*" | sed 's/.*=//'; }

guest/build.sh "$GUEST" >/dev/null
rm -rf "$DIR"; mkdir -p "$DIR"

# References: the same guest, its data disk a local file behind QEMU's own virtio-blk:
# cache=directsync makes each write durable before it completes, as converge does;
# cache=none leaves the data in the disk's volatile cache until a flush.
reference() { # $1 = QEMU cache mode
  cp "$GUEST/rootfs.img" "$DIR/root.img"
  rm -f "$DIR/data.img"; truncate -s 64M "$DIR/data.img"
  timeout 300 qemu-system-x86_64 -machine q35 -accel tcg -m 256M -smp 1 -nodefaults -display none -no-reboot \
    -serial "file:$DIR/reference-$1.log" -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "$CMDLINE" -drive "file=$DIR/root.img,if=virtio,format=raw,cache=$1" \
    -drive "file=$DIR/data.img,if=virtio,format=raw,cache=$1"
}
reference directsync
reference none
ref_write=$(figure write_4k_qd1 < "$DIR/reference-directsync.log")
ref_read=$(figure read_4k_qd1 < "$DIR/reference-directsync.log")
vol_write=$(figure write_4k_qd1 < "$DIR/reference-none.log")

bench_cluster 1G
cv "${IPS[0]}" vm create bench --memory 256M --disk 64M --disk 64M,replicas=2 --image "$GUEST/rootfs.img" \
  --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --cmdline "$CMDLINE" >/dev/null 2>&1
cv "${IPS[0]}" vm start bench --node "${IPS[0]}" >/dev/null 2>&1
for _ in $(seq 600); do
  cv "${IPS[0]}" --json vm show bench | grep -q '"state": "stopped"' && break
  sleep 0.5
done
cv "${IPS[0]}" vm console bench --no-follow > "$DIR/converge.log"
cv_write=$(figure write_4k_qd1 < "$DIR/converge.log")
cv_read=$(figure read_4k_qd1 < "$DIR/converge.log")
[ -n "$ref_write" ] && [ -n "$cv_write" ] || { echo "a guest did not report its figures" >&2; exit 1; }

echo "4 KiB O_DIRECT, queue depth 1, inside a TCG guest (mean latency per IO, lower is better)"
printf '%-62s %8s us\n' "local raw file, QEMU virtio-blk, cache=none (volatile), write" "$vol_write"
printf '%-62s %8s us\n' "reference: local raw file, virtio-blk, cache=directsync, write" "$ref_write"
printf '%-62s %8s us  ratio %.2f\n' "converge: 2 replicas over vhost-user-blk, write" "$cv_write" "$(awk -v a="$cv_write" -v b="$ref_write" 'BEGIN { print a / b }')"
printf '%-62s %8s us\n' "reference: local raw file, virtio-blk, cache=directsync, read" "$ref_read"
printf '%-62s %8s us  ratio %.2f\n' "converge: 2 replicas over vhost-user-blk, read" "$cv_read" "$(awk -v a="$cv_read" -v b="$ref_read" 'BEGIN { print a / b }')"
