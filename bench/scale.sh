#!/usr/bin/env bash
# Cost per step as the store grows: `seq` throughput with 10^3, 10^4, 10^5 and 10^6
# finished instances already stored (embedded SQLite store).
#
#   bench/scale.sh [RUN_INSTANCES]        # default 5000 instances x 3 steps per measurement
#
# The first 10^3 finished instances come from a real `weir bench` run; larger stores are
# made by copying those rows (instances and their events, with new ids and sequence
# numbers that continue each partition's log), which is what matters here: the size of
# the tables and indexes every step writes into. The server is stopped (by PID) while
# the store grows, and between measurements.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-5000}
cargo build --release -p weir --bin weir --bin weir-example-worker >/dev/null
WEIR=$PWD/target/release/weir
DIR=$(mktemp -d /tmp/weir-scale.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PID=
stop() { [[ -n "$PID" ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; PID=; }
trap 'stop; rm -rf "$DIR"' EXIT
start() {
  "$WEIR" server --data-dir "$DIR/data" --listen "127.0.0.1:$PORT" 2>>"$DIR/server.log" &
  PID=$!
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && return; sleep 0.1; done
  echo "server not ready" >&2; exit 1
}
grow() { # grow DB to $1 finished instances by copying the seed rows
  python3 - "$DIR/data/weir.db" "$1" <<'PY'
import secrets, sqlite3, sys
db, target = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db)
c.execute("PRAGMA synchronous=FULL")
seed = "id NOT LIKE '%-copy%'"
have = c.execute("SELECT count(*) FROM instances WHERE active = 0").fetchone()[0]
seeds = c.execute(f"SELECT count(*) FROM instances WHERE active = 0 AND {seed}").fetchone()[0]
tag = secrets.token_hex(3)  # unique per growth, so copies never collide
k = 0
while have < target:
    k += 1
    with c:
        # A copy's events continue its partition's log, and so does the seq of its
        # first event, by which its events are indexed (`first_seq`, `instance_seq`).
        c.execute(f"""INSERT INTO instances (id, partition, definition, version, status, active, input,
                      output, error, created_at, updated_at, state, first_seq)
                      SELECT i.id || '-copy{tag}{k}', i.partition, i.definition, i.version, i.status,
                      i.active, i.input, i.output, i.error, i.created_at, i.updated_at, i.state,
                      i.first_seq + p.last_seq
                      FROM instances i JOIN partitions p ON p.partition = i.partition
                      WHERE i.active = 0 AND i.{seed}""")
        c.execute(f"""INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload, instance_seq)
                      SELECT e.partition, e.seq + p.last_seq, e.epoch, e.instance_id || '-copy{tag}{k}',
                      e.at, e.type, e.payload, e.instance_seq + p.last_seq
                      FROM events e JOIN partitions p ON p.partition = e.partition
                      WHERE e.instance_id IN (SELECT id FROM instances WHERE active = 0 AND {seed})""")
        c.execute(f"""UPDATE partitions SET last_seq = (SELECT max(seq) FROM events e WHERE e.partition = partitions.partition)
                      WHERE EXISTS (SELECT 1 FROM events e WHERE e.partition = partitions.partition)""")
    have += seeds
print(f"{have} finished instances stored")
PY
}
start
"$WEIR" --server "http://127.0.0.1:$PORT" bench --instances 1000 --steps 3 --concurrency 64 --worker-concurrency 64 >/dev/null
stop
for n in 1000 10000 100000 1000000; do
  grow "$n"
  du -sh "$DIR/data" | awk '{print "store size " $1}'
  start
  "$WEIR" --server "http://127.0.0.1:$PORT" bench --instances "$RUN" --steps 3 --concurrency 256 \
    --worker-concurrency 256 --server-pid "$PID" --output json | tee -a "$DIR/results.jsonl" \
    | python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"$n stored: {r['step_completions_per_s']:.0f} steps/s, p50 {r['latency_ms']['p50']:.0f} ms, p99 {r['latency_ms']['p99']:.0f} ms\")"
  stop
done
