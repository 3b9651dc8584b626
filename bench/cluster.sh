#!/usr/bin/env bash
# Throughput of a weir cluster on one private PostgreSQL with 1, 2 and 3 nodes, all on
# this machine (so it shows the cost of coordination, not a scaling proof: every node,
# the database, the workers and the client share the same cores).
#
#   bench/cluster.sh [INSTANCES] [CONCURRENCY] [BENCH ARGS...]   # defaults 5000 and 256
#
# Arguments after the first two go to `weir bench` as they are (e.g. `--ids random`).
#
# PostgreSQL runs with its defaults (fsync on, synchronous_commit on) from a temporary
# directory on a free loopback port; every process is stopped by PID at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
INSTANCES=${1:-5000}
CONCURRENCY=${2:-256}
shift $(( $# < 2 ? $# : 2 ))
source bench/private-pg.sh
cargo build --release -p weir --bin weir --bin weir-example-worker >/dev/null
WEIR=$PWD/target/release/weir
WORK=$(mktemp -d /tmp/weir-cluster-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
stop_nodes() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
cleanup() {
  stop_nodes
  stop_private_pg
  rm -rf "$WORK"
}
trap cleanup EXIT

start_private_pg -c max_connections=200

for nodes in ${NODE_COUNTS:-1 2 3}; do
  db="weir_$nodes"
  "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE $db"
  store="postgres://postgres@127.0.0.1:$PG_PORT/$db"
  urls=()
  for i in $(seq 1 "$nodes"); do
    port=$(free_port)
    "$WEIR" server --store "$store" --node-id "node-$i" --listen "127.0.0.1:$port" \
      2>"$WORK/node-$nodes-$i.log" &
    PIDS+=($!)
    urls+=("http://127.0.0.1:$port")
  done
  for url in "${urls[@]}"; do
    for _ in $(seq 1 200); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.1; done
  done
  sleep 2 # let the placement settle
  servers=$(IFS=,; echo "${urls[*]}")
  pids=$(IFS=,; echo "${PIDS[*]}")
  echo "== $nodes node(s)"
  "$WEIR" --server "$servers" bench --instances "$INSTANCES" --steps 3 \
    --concurrency "$CONCURRENCY" --worker-concurrency "$CONCURRENCY" --server-pid "$pids" \
    --store-label "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), fsync on, synchronous_commit on; $nodes node(s)" \
    "$@"
  stop_nodes
done
