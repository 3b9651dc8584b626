#!/bin/bash
# A rolling upgrade under load, on a private PostgreSQL:
#   bench/rolling-upgrade.sh OLD_WEIR NEW_WEIR [INSTANCES]
#
# OLD_WEIR and NEW_WEIR are two builds of the `weir` binary (the previous release and this
# one; the same binary twice measures a node joining under load). A node of OLD_WEIR runs
# 2,000 instances alone. Then, while it runs INSTANCES more (6,000 by default, random ids),
# a node of NEW_WEIR joins the same database, migrates its schema and takes its share of
# the partitions. Then INSTANCES more run across both nodes, and the script checks, through
# both: each node lists every instance once, and every history has its 8 events in order
# with one `instance_completed`. The bench is NEW_WEIR's, which asks again through the
# `503 unavailable` of partitions on the move. It prints each run's figures, one line per
# check, and exits non-zero when a check fails.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 OLD_WEIR NEW_WEIR [INSTANCES]" >&2
  exit 2
fi
OLD=$(realpath "$1")
NEW=$(realpath "$2")
INSTANCES=${3:-6000}
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/weir-rolling.XXXXXX)
chmod 755 "$WORK"
source bench/private-pg.sh
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  stop_private_pg
  rm -rf "$WORK"
}
trap cleanup EXIT
start_private_pg -c max_connections=200
"$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE weir"
STORE=postgres://postgres@127.0.0.1:$PG_PORT/weir
PORT_OLD=$(free_port)
PORT_NEW=$(free_port)
URL_OLD=http://127.0.0.1:$PORT_OLD
URL_NEW=http://127.0.0.1:$PORT_NEW

wait_ready() {
  for _ in $(seq 300); do
    curl -sf "$1/readyz" >/dev/null && return 0
    sleep 0.1
  done
  echo "$1 never became ready" >&2
  return 1
}

# bench NAME SERVERS COUNT: runs `seq` (3 steps, 64 in flight, random ids) and prints a line.
bench() {
  "$NEW" --server "$2" bench --instances "$3" --steps 3 --concurrency 64 \
    --worker-concurrency 64 --ids random --output json >"$WORK/$1.json" 2>"$WORK/$1.err" ||
    { tail -3 "$WORK/$1.err" >&2; return 1; }
  python3 - "$WORK/$1.json" "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
l = d["latency_ms"]
print("%-12s %6.0f steps/s  failed %d  p50 %.0f ms  p99 %.0f ms  max %.0f ms  %.1f s"
      % (sys.argv[2], d["step_completions_per_s"], d["failed"], l["p50"], l["p99"], l["max"], d["elapsed_s"]))
sys.exit(1 if d["failed"] else 0)
PY
}

"$OLD" server --store "$STORE" --node-id old --listen "127.0.0.1:$PORT_OLD" 2>"$WORK/old.log" &
PIDS+=($!)
wait_ready "$URL_OLD"
bench old-alone "$URL_OLD" 2000

bench during-join "$URL_OLD" "$INSTANCES" &
BENCH=$!
sleep 1.5
"$NEW" server --store "$STORE" --node-id new --listen "127.0.0.1:$PORT_NEW" 2>"$WORK/new.log" &
PIDS+=($!)
wait_ready "$URL_NEW"
wait "$BENCH"

bench both "$URL_OLD,$URL_NEW" "$INSTANCES"
curl -sf "$URL_NEW/v1/cluster" | python3 -c '
import json, sys
nodes = json.load(sys.stdin)["nodes"]
count = lambda p: p if isinstance(p, int) else len(p)
print("partitions:", ", ".join("%s %d" % (n["node_id"], count(n["partitions"])) for n in nodes))'

python3 - "$URL_OLD" "$URL_NEW" $((2000 + 2 * INSTANCES)) <<'PY'
import json, sys, urllib.request
old, new, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])

def get(url):
    with urllib.request.urlopen(url) as response:
        return json.load(response)

def listing(base):
    ids, cursor = [], None
    while True:
        page = get(base + "/v1/instances?limit=1000" + ("&cursor=" + cursor if cursor else ""))
        ids += [instance["id"] for instance in page["instances"]]
        cursor = page["next_cursor"]
        if not cursor:
            return ids

ok = True
lists = {"old": listing(old), "new": listing(new)}
for name, ids in lists.items():
    good = len(ids) == expected and len(set(ids)) == expected
    ok &= good
    print("listed by %s: %d, %d distinct, %s" % (name, len(ids), len(set(ids)), "ok" if good else "WRONG"))
same = set(lists["old"]) == set(lists["new"])
ok &= same
print("same instances on both nodes:", "ok" if same else "WRONG")
bad = 0
for n, instance in enumerate(lists["new"]):
    for base in (old, new) if n % 10 == 0 else (new,):
        events = get(base + "/v1/instances/" + instance + "/history")["events"]
        seqs = [event["seq"] for event in events]
        types = [event["type"] for event in events]
        if len(events) != 8 or seqs != sorted(seqs) or types.count("instance_completed") != 1:
            bad += 1
ok &= bad == 0
print("histories: %d read, %d wrong" % (len(lists["new"]), bad))
sys.exit(0 if ok else 1)
PY
