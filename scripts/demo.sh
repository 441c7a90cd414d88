#!/usr/bin/env bash
# The demo: a 3-node converge cluster; a replicated volume survives a node killed with
# SIGKILL; then a Linux VM whose root filesystem lives on a 2-replica volume boots by UEFI
# from an ordinary disk image, reaches another VM over a converge network, writes a file,
# and finds it again after starting on another node, still reaching the other VM.
#
# Each node runs in a network namespace of its own (cvdemo-1..3), as separate servers
# would, joined by a bridge in a further namespace (cvdemo-sw) that stands for their
# switch, on 10.210.0.0/24; this machine reaches them at 10.210.0.1-3 over one veth
# (cvdemo0, 10.210.0.254). Nothing else of this machine's network is touched.
#   scripts/demo.sh        run the demo (leaves the cluster running)
#   scripts/demo.sh stop   stop the demo cluster and take its namespaces away
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="$PWD/demo"
BIN="$PWD/target/release/converge"
PORT=7700
IPS=(10.210.0.1 10.210.0.2 10.210.0.3)
SUBNET=10.210.0

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
# Root on each node talks to it through its local socket (no token).
cv() { local ip=$1; shift; "$BIN" --socket "$DEMO/node-$ip/api.sock" "$@"; }

stop_cluster() {
  for pidfile in "$DEMO"/node-*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then kill "$pid"; fi
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  # The namespaces go with their links; the veth to this machine at once (a namespace's
  # links go when the kernel gets to it).
  ip link del cvdemo0 2>/dev/null || true
  for ns in cvdemo-1 cvdemo-2 cvdemo-3 cvdemo-sw; do
    ip netns del "$ns" 2>/dev/null || true
  done
}

# The node of address $1 runs in namespace cvdemo-N.
netns_of() { echo "cvdemo-${1##*.}"; }
# Runs a command in namespace $1. nsenter leaves mounts alone (`ip netns exec` and `ip -n`
# remount / and /sys, which fails in a chroot) and execs the command.
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

make_network() {
  if ip -br addr | grep -q " $SUBNET\."; then
    echo "this machine has addresses in $SUBNET.0/24 already; the demo needs it to itself" >&2
    exit 1
  fi
  ip netns add cvdemo-sw
  in_ns cvdemo-sw ip link add switch type bridge
  in_ns cvdemo-sw ip link set switch up
  for ip in "${IPS[@]}"; do
    local ns; ns=$(netns_of "$ip")
    ip netns add "$ns"
    in_ns "$ns" ip link set lo up
    in_ns "$ns" ip link add eth0 type veth peer name "port${ip##*.}" netns cvdemo-sw
    in_ns cvdemo-sw ip link set "port${ip##*.}" master switch up
    in_ns "$ns" ip addr add "$ip/24" dev eth0
    in_ns "$ns" ip link set eth0 up
  done
  ip link add cvdemo0 type veth peer name uplink netns cvdemo-sw
  in_ns cvdemo-sw ip link set uplink master switch up
  ip addr add "$SUBNET.254/24" dev cvdemo0
  ip link set cvdemo0 up
}

start_node() {
  local ip=$1
  # nsenter execs the daemon: the pid is the daemon's (not through in_ns, a function run in
  # a subshell of its own).
  nsenter --net="/run/netns/$(netns_of "$ip")" "$BIN" serve --data-dir "$DEMO/node-$ip" --listen "$ip:$PORT" \
    >>"$DEMO/node-$ip.log" 2>&1 &
  echo $! >"$DEMO/node-$ip.pid"
  disown
  for _ in $(seq 100); do
    if cv "$ip" cluster status >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "node $ip did not start; see $DEMO/node-$ip.log" >&2
  exit 1
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "timed out after ${seconds}s waiting until $what" >&2
  exit 1
}

healthy() { cv "$1" --json cluster status | grep -q '"healthy": true'; }
unhealthy() { cv "$1" --json cluster status | grep -q '"healthy": false'; }

if [ "${1:-}" = stop ]; then
  stop_cluster
  echo "demo cluster stopped"
  exit 0
fi

[ -x "$BIN" ] || { echo "build first: make build" >&2; exit 1; }
step "Stopping any earlier demo cluster and starting fresh in $DEMO"
stop_cluster
rm -rf "$DEMO"
mkdir -p "$DEMO/disks"
step "Three servers: network namespaces cvdemo-1..3 on a switch, $SUBNET.0/24"
make_network

step "Starting converge serve on ${IPS[*]} (port $PORT; data path on $((PORT + 1)))"
for ip in "${IPS[@]}"; do start_node "$ip"; echo "  node on $ip: pid $(cat "$DEMO/node-$ip.pid"), log $DEMO/node-$ip.log"; done

step "Creating the cluster on ${IPS[0]}"
init=$(cv "${IPS[0]}" --json cluster init)
token=$(echo "$init" | sed -n 's/.*"join_token": "\(.*\)".*/\1/p')
admin=$(echo "$init" | sed -n 's/.*"admin_token": "\(.*\)".*/\1/p')
echo "  admin token: $admin (for the API from anywhere)"
echo "  join token: $token"
for ip in "${IPS[@]:1}"; do
  step "Joining $ip"
  cv "$ip" cluster join --peer "${IPS[0]}:$PORT" --join-token "$token"
done

for ip in "${IPS[@]}"; do
  step "Giving node $ip a 2 GiB disk (a file standing in for a raw device)"
  cv "$ip" disk add "$DEMO/disks/node-$ip.img" --size 2G
done

step "Cluster status"
wait_for 10 "every node reports in" healthy "${IPS[0]}"
cv "${IPS[0]}" cluster status

step "Creating a 2-replica volume 'demo' (256 MiB, thin)"
cv "${IPS[0]}" volume create demo --size 256M --replicas 2

step "Writing 200 MiB of random data to $DEMO/input.raw"
head -c $((200 << 20)) /dev/urandom >"$DEMO/input.raw"
sum_in=$(sha256sum "$DEMO/input.raw" | cut -d' ' -f1)
echo "  sha256 $sum_in"

step "Importing it through node ${IPS[0]}"
cv "${IPS[0]}" volume import demo "$DEMO/input.raw" --format raw
cv "${IPS[0]}" volume show demo

step "Killing node ${IPS[0]} with SIGKILL (pid $(cat "$DEMO/node-${IPS[0]}.pid"))"
kill -9 "$(cat "$DEMO/node-${IPS[0]}.pid")"
rm -f "$DEMO/node-${IPS[0]}.pid"
wait_for 15 "the cluster sees ${IPS[0]} down" unhealthy "${IPS[1]}"
cv "${IPS[1]}" cluster status || true

step "Exporting the volume through node ${IPS[1]}"
dd if=/dev/zero of="$DEMO/output.raw" bs=1 count=0 2>/dev/null
cv "${IPS[1]}" volume export demo "$DEMO/output.raw"
# The volume is 256 MiB; the imported data is its first 200 MiB.
sum_out=$(head -c $((200 << 20)) "$DEMO/output.raw" | sha256sum | cut -d' ' -f1)
echo "  imported sha256 $sum_in"
echo "  exported sha256 $sum_out"
if [ "$sum_in" != "$sum_out" ]; then
  echo "MISMATCH: the exported data differs from what was imported" >&2
  exit 1
fi
echo "  checksums match: no acknowledged byte was lost"

step "Restarting node ${IPS[0]} with the same data dir"
start_node "${IPS[0]}"
# Every node's view: the restarted one may not have applied yet that it was declared down.
for ip in "${IPS[@]}"; do wait_for 60 "the cluster is healthy again (as $ip sees it)" healthy "$ip"; done
cv "${IPS[0]}" cluster status

GUEST="$PWD/target/guest"
step "Building the guest image: GPT, an EFI system partition with systemd-boot, Debian's cloud kernel, busybox on ext4 ($GUEST)"
guest/build.sh "$GUEST"

step "Importing it once as a template (its format told by its header)"
cv "${IPS[0]}" volume import guest-image "$GUEST/uefi.img"

step "A network every node provides: a VXLAN overlay between the nodes' own addresses"
cv "${IPS[0]}" network create demo-net --overlay
cv "${IPS[0]}" network list

# What cloud-init runs at first boot (a user-data script): an address, then the other VM.
user_data() { # user_data OWN_ADDRESS PEER_ADDRESS PEER_NAME
  cat <<SCRIPT
#!/bin/sh
ip link set eth0 up && ip addr add $1/24 dev eth0
until ping -c 1 -W 1 $2 >/dev/null 2>&1; do sleep 1; done
echo "reached $3 at $2: \$(ping -c 3 -W 1 $2 | grep -c 'bytes from') of 3 pings answered"
SCRIPT
}
user_data 10.99.0.1 10.99.0.2 db >"$DEMO/web.sh"
user_data 10.99.0.2 10.99.0.1 web >"$DEMO/db.sh"

step "Two VMs cloned from the template, each with a card on demo-net and a cloud-init script"
ssh-keygen -q -t ed25519 -N "" -C demo@converge -f "$DEMO/id_ed25519" <<<y >/dev/null 2>&1 \
  || printf 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyDemoKeyDemoKeyDemoKeyDemoKey01 demo@converge\n' >"$DEMO/id_ed25519.pub"
cv "${IPS[0]}" vm create web --cpus 1 --memory 256M --disk 128M,replicas=2 --template guest-image \
  --ssh-key "$DEMO/id_ed25519.pub" --hostname web --cloud-init "$DEMO/web.sh" --nic demo-net
cv "${IPS[0]}" vm create db --cpus 1 --memory 256M --disk 128M,replicas=2 --template guest-image \
  --hostname db --cloud-init "$DEMO/db.sh" --nic demo-net

console_has() { cv "${IPS[0]}" vm console "$1" --no-follow 2>/dev/null | grep -q "$2"; }

step "Starting db on ${IPS[2]} and web on ${IPS[0]}: UEFI firmware boots the image from a disk the node daemon serves over vhost-user-blk"
cv "${IPS[0]}" vm start db --node "${IPS[2]}"
cv "${IPS[0]}" vm start web --node "${IPS[0]}"
cv "${IPS[0]}" vm show web
wait_for 240 "web has booted" console_has web "GUEST: ready"
wait_for 120 "web reached db over demo-net" console_has web "GUEST: user-data: reached db"

step "web's serial console: booted by UEFI, its cloud-init seed read, db reached over the overlay, /root/hello.txt written"
cv "${IPS[0]}" vm console web --no-follow | grep -E "BdsDxe: starting|GUEST" | grep -v "cidata user-data"

step "Stopping web (ACPI power button; the guest syncs and powers off)"
cv "${IPS[0]}" vm stop web

step "Starting it on ${IPS[1]}: new owner epochs fence the old node, the same volumes and MAC go with it"
cv "${IPS[1]}" vm start web --node "${IPS[1]}"
wait_for 240 "web has booted on ${IPS[1]}" console_has web "GUEST: ready"
wait_for 120 "web reached db again from ${IPS[1]}" console_has web "GUEST: user-data: reached db"
cv "${IPS[1]}" vm console web --no-follow | grep GUEST | grep -v "cidata user-data"
if ! console_has web "GUEST: found /root/hello.txt"; then
  echo "the file written on ${IPS[0]} is missing after the move" >&2
  exit 1
fi
if ! console_has web "GUEST: UEFI variable kept"; then
  echo "the UEFI variable the guest set on ${IPS[0]} is missing after the move" >&2
  exit 1
fi
echo "  the file written on ${IPS[0]}, and the UEFI variable the guest set there, are there on ${IPS[1]};"
echo "  web reaches db over demo-net from its new node"
cv "${IPS[1]}" vm show web | grep -E "^(node|nic)"
cv "${IPS[1]}" volume list

step "Done"
cv "${IPS[1]}" cluster ca >"$DEMO/ca.pem"
cat <<MSG
The cluster and VMs 'web' (on ${IPS[1]}) and 'db' (on ${IPS[2]}) are still running, on
network demo-net. From this machine (reaching the nodes over cvdemo0), try:
  export CONVERGE_SERVER=https://${IPS[0]}:$PORT CONVERGE_TOKEN=$admin CONVERGE_CA=$DEMO/ca.pem
  $BIN vm console web          # the guest's serial console, interactive (Ctrl-] leaves)
  $BIN vm show web
  $BIN network list
  $BIN cluster status
Stop everything with:
  make demo-stop
MSG
