# Sourced by the benchmark scripts: a 3-node loopback cluster in $DIR on "${IPS[@]}":$PORT,
# each node with a file disk of $1. Expects BIN, DIR, PORT and IPS; adds the nodes' pids
# to `pids` so the caller's EXIT trap kills them.
# Root on each node talks to it through its local socket (no token).
cv() { local ip=$1; shift; "$BIN" --socket "$DIR/node-$ip/api.sock" "$@"; }

bench_cluster() { # $1 = disk size per node
  for ip in "${IPS[@]}"; do
    "$BIN" serve --data-dir "$DIR/node-$ip" --listen "$ip:$PORT" 2>"$DIR/node-$ip.log" &
    pids+=($!)
  done
  for ip in "${IPS[@]}"; do
    for _ in $(seq 100); do cv "$ip" cluster status >/dev/null 2>&1 && break; sleep 0.1; done
  done
  local token
  token=$(cv "${IPS[0]}" --json cluster init | sed -n 's/.*"join_token": "\(.*\)".*/\1/p')
  for ip in "${IPS[@]:1}"; do cv "$ip" cluster join --peer "${IPS[0]}:$PORT" --join-token "$token" >/dev/null; done
  for ip in "${IPS[@]}"; do cv "$ip" disk add "$DIR/disk-$ip.img" --size "$1" >/dev/null; done
}
