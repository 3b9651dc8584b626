#!/usr/bin/env bash
# Throughput of one weir node on a private PostgreSQL whose store already holds many
# finished instances (random ids, three events each), and the WAL each step writes.
#
#   bench/pg-large-store.sh [STORED] [IDS...]     # defaults 1000000 and "random sequential"
#
# For each IDS (`weir bench --ids`): a fresh database, the schema made by a node, STORED
# instances and their events put in with generate_series, VACUUM ANALYZE and CHECKPOINT
# (so that the run pays the full-page images a checkpoint brings), then 20,000 × 3 at
# 256 in flight. Prints the bench's figures and the WAL bytes per step; with WALDUMP=1,
# the run's WAL by relation (pg_waldump). PostgreSQL runs with its defaults (fsync on,
# synchronous_commit on) from a temporary directory on a free loopback port; every
# process is stopped by PID at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
STORED=${1:-1000000}
shift $(( $# < 1 ? $# : 1 ))
RUNS=("$@")
[[ ${#RUNS[@]} -eq 0 ]] && RUNS=(random sequential)
source bench/private-pg.sh
cargo build --release -p weir --bin weir --bin weir-example-worker >/dev/null
WEIR=$PWD/target/release/weir
WORK=$(mktemp -d /tmp/weir-pg-large.XXXXXX)
chmod 755 "$WORK"
NODE=
stop_node() { if [[ -n $NODE ]]; then kill "$NODE" 2>/dev/null || true; wait "$NODE" 2>/dev/null || true; NODE=; fi; }
cleanup() {
  stop_node
  stop_private_pg
  rm -rf "$WORK"
}
trap cleanup EXIT
wait_ready() { for _ in $(seq 1 600); do curl -sf "$1/readyz" >/dev/null && return; sleep 0.1; done; echo "node not ready" >&2; exit 1; }

start_private_pg
psql_() { "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qAt "$@"; }

n=0
for ids in "${RUNS[@]}"; do
  n=$((n + 1))
  db="weir_$n"
  psql_ -c "CREATE DATABASE $db"
  store="postgres://postgres@127.0.0.1:$PG_PORT/$db"
  port=$(free_port)
  url="http://127.0.0.1:$port"
  "$WEIR" server --store "$store" --listen "127.0.0.1:$port" 2>"$WORK/node-$n.log" &
  NODE=$!
  wait_ready "$url"
  stop_node
  if [[ $STORED -gt 0 ]]; then
    psql_ -d "$db" -c "INSERT INTO instances (id, partition, definition, version, status, active, input, output, error, created_at, updated_at, state)
      SELECT md5(x::text), x % 64, 'old', 1, 'completed', false, '{}', '{}', NULL, 1700000000000 + x, 1700000000000 + x, '{}'
      FROM generate_series(0, $STORED - 1) x"
    psql_ -d "$db" -c "INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload)
      SELECT x % 64, x / 64 + 1, 0, md5((x / 3)::text), 1700000000000, 'step_completed', '{\"output\":{\"a\":1}}'
      FROM generate_series(0, 3 * $STORED - 1) x"
    psql_ -d "$db" -c "UPDATE partitions SET last_seq = (SELECT coalesce(max(seq), 0) FROM events WHERE events.partition = partitions.partition)" \
      -c "VACUUM ANALYZE" -c "CHECKPOINT"
  fi
  "$WEIR" server --store "$store" --listen "127.0.0.1:$port" 2>>"$WORK/node-$n.log" &
  NODE=$!
  wait_ready "$url"
  sleep 2 # let the node take its partitions
  start_lsn=$(psql_ -c "SELECT pg_current_wal_lsn()")
  "$WEIR" --server "$url" bench --instances 20000 --steps 3 --concurrency 256 \
    --worker-concurrency 256 --ids "$ids" --server-pid "$NODE" --output json >"$WORK/bench-$n.json"
  end_lsn=$(psql_ -c "SELECT pg_current_wal_lsn()")
  wal=$(psql_ -c "SELECT pg_wal_lsn_diff('$end_lsn', '$start_lsn')")
  stop_node
  python3 - "$WORK/bench-$n.json" "$STORED" "$ids" "$wal" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
wal = float(sys.argv[4])
per_step = wal / (20000 * 3)
print("stored %s ids %s: %.0f steps/s, latency p50 %.0f ms, server CPU %.2f s, WAL %.0f MB (%.0f B per step)" % (
    sys.argv[2], sys.argv[3], d["step_completions_per_s"], d["latency_ms"]["p50"],
    d.get("server_cpu_s") or 0, wal / 1e6, per_step))
PY
  if [[ ${WALDUMP:-0} == 1 ]]; then
    psql_ -d "$db" -c "SELECT relfilenode, relname FROM pg_class WHERE relfilenode <> 0" >"$WORK/rels.txt"
    "$PG_BIN/pg_waldump" -p "$WORK/pg/pg_wal" -s "$start_lsn" -e "$end_lsn" 2>/dev/null >"$WORK/wal.txt" || true
    python3 - "$WORK/wal.txt" "$WORK/rels.txt" <<'PY'
import collections, re, sys
names = dict(line.strip().split("|", 1) for line in open(sys.argv[2]) if "|" in line)
size, images = collections.Counter(), collections.Counter()
for line in open(sys.argv[1]):
    length = re.search(r"len \(rec/tot\):\s*\d+/\s*(\d+)", line)
    if not length:
        continue
    block = re.search(r"blkref #0: rel \d+/\d+/(\d+)", line)
    name = names.get(block.group(1), block.group(1)) if block else re.search(r"rmgr: (\w+)", line).group(1)
    size[name] += int(length.group(1))
    images[name] += "FPW" in line
total = sum(size.values())
for name, bytes_ in size.most_common(10):
    print("  %-30s %6.1f MB %5.1f%%  full-page images %d" % (name, bytes_ / 1e6, 100 * bytes_ / total, images[name]))
PY
  fi
  psql_ -c "DROP DATABASE $db"
done
