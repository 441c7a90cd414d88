#!/usr/bin/env bash
# Failover time: SIGKILL of the node running a VM (its daemon and its QEMU) until the
# guest's init prints its boot marker on another node, over $RUNS runs, split into
# detection, decision and fencing (from the product's own `vm_restarted` event) and boot
# (the rest). The reference, measured in the same run: a cold start of the same VM, from
# `vm start` to the same marker. Prints each run, the means, and failover / cold start.
# Stops by itself and kills what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/target/release/converge"
DIR="$PWD/target/bench-failover"
GUEST="$PWD/target/guest"
PORT=7950
IPS=(127.0.0.52 127.0.0.53 127.0.0.54)
RUNS=${RUNS:-3}
CMDLINE="console=ttyS0 panic=-1 quiet gmode=ha"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  pkill -9 -f "qemu-system.*$DIR" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
source "$(dirname "$0")/bench-cluster.sh"
now_ms() { date +%s%3N; }

guest/build.sh "$GUEST" >/dev/null
rm -rf "$DIR"; mkdir -p "$DIR"
bench_cluster 1G

# The node (address) a VM runs on, and the pid of the daemon listening there.
vm_ip() { cv "$1" --json vm show ha | sed -n 's/.*"node": \([0-9]*\).*/\1/p' | head -1; }
ip_of_node() { cv "$1" --json cluster status | tr -d '\n ' | grep -o "{\"id\":$2,\"api_addr\":\"[0-9.]*" | sed 's/.*"//'; }
daemon_pid() { pgrep -f "serve --data-dir $DIR/node-$1 " | head -1; }
wait_marker() { # $1 = node to ask, $2 = marker; waits up to 300 s
  for _ in $(seq 3000); do
    cv "$1" vm console ha --no-follow 2>/dev/null | grep -q "$2" && return 0
    sleep 0.1
  done
  echo "no '$2' within 300 s" >&2; exit 1
}

cv "${IPS[0]}" vm create ha --memory 256M --disk 64M --disk 64M,replicas=2 --image "$GUEST/rootfs.img" \
  --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --cmdline "$CMDLINE" >/dev/null 2>&1
start=$(now_ms)
cv "${IPS[0]}" vm start ha --node "${IPS[1]}" --no-wait >/dev/null
wait_marker "${IPS[0]}" "GUEST: HA boot 1"
cold=$(( $(now_ms) - start ))
echo "reference: cold start, vm start to the guest's boot marker: $cold ms"

printf '%-4s %10s %9s %9s %9s %9s\n' run total_ms detect decide fence boot
sum_total=0; sum_detect=0; sum_decide=0; sum_fence=0
for run in $(seq "$RUNS"); do
  boot=$((run + 1))
  node=$(vm_ip "${IPS[0]}")
  ip=$(ip_of_node "${IPS[0]}" "$node")
  ask=$(for i in "${IPS[@]}"; do [ "$i" != "$ip" ] && echo "$i"; done | head -1)
  qemu=$(cv "$ask" --json vm show ha | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
  pid=$(daemon_pid "$ip")
  seq_before=$(cv "$ask" --json events | wc -l)
  start=$(now_ms)
  kill -9 "$pid" "$qemu"
  wait_marker "$ask" "GUEST: HA boot $boot"
  total=$(( $(now_ms) - start ))
  event=$(cv "$ask" events | tail -n +"$((seq_before + 1))" | grep "vm_restarted" | tail -1)
  detect=$(echo "$event" | sed -n 's/.*detection \([0-9]*\) ms.*/\1/p')
  decide=$(echo "$event" | sed -n 's/.*decision \([0-9]*\) ms.*/\1/p')
  fence=$(echo "$event" | sed -n 's/.*fencing \([0-9]*\) ms.*/\1/p')
  [ -n "$detect" ] || { echo "no vm_restarted event for run $run" >&2; exit 1; }
  printf '%-4s %10s %9s %9s %9s %9s\n' "$run" "$total" "$detect" "$decide" "$fence" "$((total - detect - decide - fence))"
  sum_total=$((sum_total + total)); sum_detect=$((sum_detect + detect))
  sum_decide=$((sum_decide + decide)); sum_fence=$((sum_fence + fence))
  # The killed node comes back and the cluster is whole before the next run.
  "$BIN" serve --data-dir "$DIR/node-$ip" --listen "$ip:$PORT" 2>>"$DIR/node-$ip.log" &
  pids+=($!)
  for _ in $(seq 1200); do
    cv "$ask" --json cluster status 2>/dev/null | grep -q '"pgs_degraded": 0' && \
      ! cv "$ask" cluster status 2>/dev/null | grep -q " down " && break
    sleep 0.25
  done
done
mean() { echo $(( $1 / RUNS )); }
echo "mean over $RUNS runs: failover $(mean $sum_total) ms = detection $(mean $sum_detect) + decision $(mean $sum_decide) + fencing $(mean $sum_fence) + boot $(( $(mean $sum_total) - $(mean $sum_detect) - $(mean $sum_decide) - $(mean $sum_fence) )) ms"
echo "detection + decision + fencing: $(( $(mean $sum_detect) + $(mean $sum_decide) + $(mean $sum_fence) )) ms"
printf 'failover / cold start: %.2f\n' "$(awk -v a="$(mean $sum_total)" -v b="$cold" 'BEGIN { print a / b }')"
