#!/usr/bin/env bash
# Cost per step as the store grows: `seq` throughput with 10^3, 10^4, 10^5 and 10^6
# finished instances already stored (embedded SQLite store).
#
#   bench/scale.sh [RUN_INSTANCES] [ROUNDS]   # defaults: 5000 instances x 3 steps, 1 round
#
# The first 10^3 finished instances come from a real `weir bench` run; larger stores are
# made by copying those rows (instances and their events, with new ids and sequence
# numbers that continue each partition's log), which is what matters here: the size of
# the tables and indexes every step writes into. The server is stopped (by PID) while
# the store grows, and between measurements.
#
# Every store is made first; then each round measures the four sizes one after the
# other, so that a change of the machine's speed during the run (this project's machine
# has fast and slow phases) falls on every size alike rather than on the last ones. A
# measurement of 10^3 to 10^5 runs on a fresh copy of that size's store; the 10^6 store
# is measured in place (each run adds RUN_INSTANCES to it, under 1% per 10,000). With
# several rounds it ends with each size's median and the slope of the medians, per
# decade, as a share of their mean.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-5000}
ROUNDS=${2:-1}
cargo build --release -p weir --bin weir --bin weir-example-worker >/dev/null
WEIR=$PWD/target/release/weir
DIR=$(mktemp -d /tmp/weir-scale.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PID=
stop() { [[ -n "$PID" ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; PID=; }
trap 'stop; rm -rf "$DIR"' EXIT
start() { # start [DATA_DIR]
  "$WEIR" server --data-dir "${1:-$DIR/data}" --listen "127.0.0.1:$PORT" 2>>"$DIR/server.log" &
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
have = c.execute("SELECT count(*) FROM instances WHERE active = 0").fetchone()[0]
# The seeds are the finished instances that are not copies, read once: each copy then
# reads them and their events through indexes (events by their instance's first seq),
# not by scanning tables that grow with every copy.
c.execute("""CREATE TEMP TABLE seeds AS SELECT id, partition, first_seq FROM instances
             WHERE active = 0 AND id NOT LIKE '%-copy%'""")
seeds = c.execute("SELECT count(*) FROM seeds").fetchone()[0]
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
                      FROM seeds s CROSS JOIN instances i ON i.id = s.id
                      JOIN partitions p ON p.partition = i.partition""")
        c.execute(f"""INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload, instance_seq)
                      SELECT e.partition, e.seq + p.last_seq, e.epoch, e.instance_id || '-copy{tag}{k}',
                      e.at, e.type, e.payload, e.instance_seq + p.last_seq
                      FROM seeds s CROSS JOIN events e INDEXED BY events_instance_seq
                        ON e.partition = s.partition AND e.instance_seq = s.first_seq
                      JOIN partitions p ON p.partition = e.partition""")
        c.execute(f"""UPDATE partitions SET last_seq = (SELECT max(seq) FROM events e WHERE e.partition = partitions.partition)
                      WHERE EXISTS (SELECT 1 FROM events e WHERE e.partition = partitions.partition)""")
    have += seeds
print(f"{have} finished instances stored")
PY
}
start
"$WEIR" --server "http://127.0.0.1:$PORT" bench --instances 1000 --steps 3 --concurrency 64 --worker-concurrency 64 >/dev/null
stop
SIZES=(1000 10000 100000 1000000)
for n in "${SIZES[@]}"; do
  grow "$n"
  # The growth leaves up to hundreds of MB dirty in the page cache; written back during
  # a run, they would share the disk with the WAL's syncs being measured.
  sync
  du -sh "$DIR/data" | awk -v n="$n" '{print "store of " n ": " $1}'
  if [[ $n != 1000000 ]]; then cp -a "$DIR/data" "$DIR/store-$n"; fi
done
for round in $(seq 1 "$ROUNDS"); do
  for n in "${SIZES[@]}"; do
    data=$DIR/data
    if [[ $n != 1000000 ]]; then
      rm -rf "$DIR/run"
      cp -a "$DIR/store-$n" "$DIR/run"
      sync
      data=$DIR/run
    fi
    start "$data"
    "$WEIR" --server "http://127.0.0.1:$PORT" bench --instances "$RUN" --steps 3 --concurrency 256 \
      --worker-concurrency 256 --server-pid "$PID" --output json \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r['stored']=$n; print(json.dumps(r))" >>"$DIR/results.jsonl"
    tail -n1 "$DIR/results.jsonl" | python3 -c "import json,sys; r=json.load(sys.stdin); c=r.get('commits') or {}; w=r.get('wal_syncs') or {}; print(f\"round $round, $n stored: {r['step_completions_per_s']:.0f} steps/s, p50 {r['latency_ms']['p50']:.0f} ms, p99 {r['latency_ms']['p99']:.0f} ms, server CPU {r['server_cpu_s']} s, commits {c.get('count')} of {c.get('mean_ms', 0):.3f} ms, WAL syncs of {w.get('mean_ms', 0):.3f} ms\")"
    stop
  done
done
if (( ROUNDS > 1 )); then
  python3 - "$DIR/results.jsonl" <<'PY'
import json, math, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
sizes = sorted({r["stored"] for r in runs})
medians = []
for n in sizes:
    values = [r["step_completions_per_s"] for r in runs if r["stored"] == n]
    medians.append(statistics.median(values))
    print(f"{n} stored: median {medians[-1]:.0f} steps/s of " + ", ".join(f"{v:.0f}" for v in values))
x = [math.log10(n) for n in sizes]
mx, my = sum(x) / len(x), sum(medians) / len(medians)
slope = sum((a - mx) * (b - my) for a, b in zip(x, medians)) / sum((a - mx) ** 2 for a in x)
print(f"slope of the medians: {slope:+.0f} steps/s per decade ({100 * slope / my:+.1f}% of their mean)")
PY
fi
