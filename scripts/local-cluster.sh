#!/usr/bin/env bash
# Starts a local 3-node weir cluster on a private PostgreSQL, for trying failover.
#
#   scripts/local-cluster.sh            # builds weir (release), starts everything, waits for Ctrl-C
#   NODES=5 BASE_PORT=7701 scripts/local-cluster.sh
#
# PostgreSQL comes from Debian's binaries (apt-get install postgresql); it runs from a
# temporary directory on a free loopback port, as the `postgres` user when run as root.
# Every process listens on 127.0.0.1 only and is stopped (by PID) on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-7601}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
if [[ -z "$PG_BIN" ]]; then
  echo "PostgreSQL server binaries not found: apt-get install postgresql" >&2
  exit 1
fi

cargo build --release -p weir --bin weir --bin weir-example-worker
WEIR=$PWD/target/release/weir

WORK=$(mktemp -d /tmp/weir-cluster.XXXXXX)
chmod 755 "$WORK"
PIDS=()
as_pg() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
  echo "stopping…"
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/pg"
[[ $(id -u) == 0 ]] && chown postgres "$WORK/pg"
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -U postgres -A trust >"$WORK/initdb.log"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w \
  -o "-h 127.0.0.1 -p $PG_PORT -k $WORK/pg -c max_connections=200" start >/dev/null
"$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE weir"
STORE="postgres://postgres@127.0.0.1:$PG_PORT/weir"
echo "PostgreSQL on 127.0.0.1:$PG_PORT ($WORK/pg)"

URLS=()
for i in $(seq 1 "$NODES"); do
  port=$((BASE_PORT + i - 1))
  WEIR_LOG=info "$WEIR" server --store "$STORE" --node-id "node-$i" \
    --listen "127.0.0.1:$port" 2>"$WORK/node-$i.log" &
  PIDS+=($!)
  URLS+=("http://127.0.0.1:$port")
done
SERVERS=$(IFS=,; echo "${URLS[*]}")
for url in "${URLS[@]}"; do
  for _ in $(seq 1 100); do
    curl -sf "$url/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
done
"$WEIR" cluster status --server "$SERVERS"
cat <<TEXT

A $NODES-node cluster is running (logs in $WORK/node-*.log). Try, in another terminal:

  export WEIR_SERVER=$SERVERS
  $WEIR deploy examples/order.yaml
  target/release/weir-example-worker --server \$WEIR_SERVER &
  $WEIR start order --input '{"sku": "A-1", "qty": 2}'
  $WEIR tasks list                 # the order waits for a person's approval
  kill -9 ${PIDS[0]}               # node-1 dies; watch its partitions move:
  $WEIR cluster status
  $WEIR node drain node-2          # hand node-2's partitions over without stopping it

Ctrl-C stops everything and deletes $WORK.
TEXT
wait "${PIDS[@]}" 2>/dev/null || true
