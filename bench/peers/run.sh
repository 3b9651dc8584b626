#!/usr/bin/env bash
# Peers side by side: the same `seq` workload (N instances, each K=3 sequential durable no-op
# steps, payload {"n": i}) on weir, Restate, Temporal and DBOS, at 1, 16, 64 and 256 instances
# in flight. See bench/peers/README.md.
#
#   bench/peers/run.sh [--quick] [--systems weir,restate,temporal,dbos] [--concurrency "1 16 64 256"]
#                      [--seconds S] [--max-load L] [--load-wait S] [--weir-from-head] [--out DIR]
#
# --quick           smoke run: few instances, ~2 s per point, no waiting for a quiet machine,
#                   results stay under $PEERS_DIR/runs/ (not in the repository)
# --seconds S       peers: stop starting new instances after S seconds (default 10)
# --max-load L      before each point, wait until the 1-minute load average is below L (default 1.0)
# --load-wait S     ... but at most S seconds (default 600); the load at the start is recorded
# --total-wait S    ... and at most S seconds over the whole sweep (default 1800)
# --weir-from-head  build weir from `git archive HEAD` in $PEERS_DIR/weir-src instead of the
#                   working tree (when the tree is mid-edit)
# --weir-rev REV    the same, from commit REV (e.g. to re-measure points with the same build)
# --out DIR         where <date>.json and <date>.png go (default bench/peers/results)
# --merge RUN_DIR   re-measure only the points asked for (--systems, --concurrency) and take every
#                   other point from an earlier run directory ($PEERS_DIR/runs/<stamp>)
#
# Everything listens on 127.0.0.1 only, on free ports picked at start. Every process started here
# is stopped by its PID on exit (trap EXIT). Peers are installed outside the repository, in
# $PEERS_DIR (default /tmp/weir-peers), by install.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-/tmp/weir-peers}"
QUICK=0
SYSTEMS="weir,restate,temporal,dbos"
CONCURRENCY="1 16 64 256"
SECONDS_CAP=10
MAX_LOAD=1.0
LOAD_WAIT=600
TOTAL_WAIT=1800
WEIR_FROM_HEAD=0
WEIR_REV=HEAD
OUT_DIR="$HERE/results"
MERGE_DIR=""
STEPS=3

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --systems) SYSTEMS="$2"; shift ;;
    --concurrency) CONCURRENCY="$2"; shift ;;
    --seconds) SECONDS_CAP="$2"; shift ;;
    --max-load) MAX_LOAD="$2"; shift ;;
    --load-wait) LOAD_WAIT="$2"; shift ;;
    --total-wait) TOTAL_WAIT="$2"; shift ;;
    --weir-from-head) WEIR_FROM_HEAD=1 ;;
    --weir-rev) WEIR_FROM_HEAD=1; WEIR_REV="$2"; shift ;;
    --out) OUT_DIR="$2"; shift ;;
    --merge) MERGE_DIR="$2"; shift ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  SECONDS_CAP=2
  LOAD_WAIT=0
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
DATE="$(date -u +%Y-%m-%d)"
RUN_DIR="$PEERS_DIR/runs/$STAMP"
mkdir -p "$RUN_DIR"
RESULTS="$RUN_DIR/points.jsonl"
: > "$RESULTS"
PY="$PEERS_DIR/venv/bin/python"
log() { echo "[peers $(date -u +%H:%M:%S)] $*" >&2; }

# ---------------------------------------------------------------- process bookkeeping
PIDS=()
PG_DATA=""
cleanup() {
  local pid
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  if [ -n "$PG_DATA" ] && [ -f "$PG_DATA/postmaster.pid" ]; then
    pg_stop || true
  fi
  sleep 0.5
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops one process we started (by PID) and forgets it.
stop_pid() {
  local pid="$1" i
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local keep=()
  for i in "${PIDS[@]:-}"; do [ "$i" != "$pid" ] && [ -n "$i" ] && keep+=("$i"); done
  PIDS=("${keep[@]:-}")
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # URL TIMEOUT_S
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

WAITED_TOTAL=0
wait_quiet() {
  [ "$LOAD_WAIT" -gt 0 ] || return 0
  local waited=0
  while awk -v max="$MAX_LOAD" '{exit !($1 >= max)}' /proc/loadavg; do
    if [ "$waited" -ge "$LOAD_WAIT" ] || [ "$WAITED_TOTAL" -ge "$TOTAL_WAIT" ]; then
      log "load average still $(cut -d' ' -f1 /proc/loadavg) after ${waited}s (${WAITED_TOTAL}s in all); going on (recorded)"
      return 0
    fi
    sleep 5
    waited=$((waited + 5)); WAITED_TOTAL=$((WAITED_TOTAL + 5))
  done
}

# CPU seconds (user+system) used so far by the given PIDs (children reaped by them included).
cpu_of() {
  local total=0 pid t
  for pid in "$@"; do
    t="$(awk '{print $14+$15+$16+$17}' "/proc/$pid/stat" 2>/dev/null || echo 0)"
    total=$((total + t))
  done
  awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.2f", t/hz}'
}
# CPU seconds of a PostgreSQL cluster: the postmaster and all its live backends.
pg_cpu() {
  local ppid="$1"
  cpu_of "$ppid" $(pgrep -P "$ppid" 2>/dev/null || true)
}

# instances per point: an upper bound; peers also stop starting new ones after SECONDS_CAP.
instances_for() { # SYSTEM C
  local c="$2"
  if [ "$QUICK" = 1 ]; then
    if [ "$1" = weir ]; then echo $(( c * 8 > 100 ? c * 8 : 100 )); else echo $(( c * 4 > 50 ? c * 4 : 50 )); fi
    return
  fi
  if [ "$1" = weir ]; then
    # weir's bench has no time cap; sized from the first figures (~190/s at 1, ~1,250/s at 256)
    case "$c" in 1) echo 1500 ;; 16) echo 8000 ;; 64) echo 10000 ;; *) echo $(( c * 48 > 12000 ? c * 48 : 12000 )) ;; esac
  else
    echo $(( c * 200 > 2000 ? c * 200 : 2000 ))
  fi
}

# Adds one measured point (the driver's JSON on stdin) to points.jsonl with the context.
record() { # SYSTEM C LOAD
  "$PY" -c '
import json, sys
system, c, load = sys.argv[1], int(sys.argv[2]), sys.argv[3]
raw = sys.stdin.read().strip().splitlines()
point = json.loads(raw[-1]) if raw else {}
point.update({"system": system, "concurrency": c, "loadavg_at_start": load})
if len(sys.argv) > 4:
    point["server_side_cpu_s"] = float(sys.argv[4])
    point["server_side_processes"] = sys.argv[5]
print(json.dumps(point))
' "$@" >> "$RESULTS"
}

record_failure() { # SYSTEM C LOAD REASON
  "$PY" -c '
import json, sys
print(json.dumps({"system": sys.argv[1], "concurrency": int(sys.argv[2]), "loadavg_at_start": sys.argv[3], "failed_to_run": sys.argv[4]}))
' "$@" >> "$RESULTS"
}

# ---------------------------------------------------------------- install / build
log "installing peers into $PEERS_DIR"
PEERS_DIR="$PEERS_DIR" "$HERE/install.sh"

if [ "$WEIR_FROM_HEAD" = 1 ]; then
  WEIR_SRC="$PEERS_DIR/weir-src"
  WEIR_COMMIT="$(git -C "$REPO" rev-parse "$WEIR_REV^{commit}")"
  if [ "$(cat "$WEIR_SRC/.weir-commit" 2>/dev/null)" != "$WEIR_COMMIT" ]; then
    rm -rf "$WEIR_SRC" && mkdir -p "$WEIR_SRC"
    git -C "$REPO" archive "$WEIR_COMMIT" | tar -x -C "$WEIR_SRC"
    echo "$WEIR_COMMIT" > "$WEIR_SRC/.weir-commit"
  fi
  WEIR_TARGET="$PEERS_DIR/weir-target"
  WEIR_DIRTY="built from commit $WEIR_COMMIT (git archive), working tree ignored"
else
  WEIR_SRC="$REPO"
  WEIR_TARGET="$REPO/target"
  WEIR_COMMIT="$(git -C "$REPO" rev-parse HEAD)"
  WEIR_DIRTY="$(git -C "$REPO" status --porcelain -- crates Cargo.toml Cargo.lock | wc -l) changed files under crates/"
fi
log "building weir ($WEIR_SRC)"
(cd "$WEIR_SRC" && CARGO_TARGET_DIR="$WEIR_TARGET" cargo build --release -q)
WEIR="$WEIR_TARGET/release/weir"

RESTATE_SERVER="$PEERS_DIR/npm/node_modules/@restatedev/restate-server-linux-x64/bin/restate-server"
RESTATE_SERVICE="$PEERS_DIR/target/release/weir-peer-restate-service"
RESTATE_DRIVER="$PEERS_DIR/target/release/restate-driver"
TEMPORAL="$PEERS_DIR/venv/bin/temporal"
PG_BIN="$(dirname "$(ls /usr/lib/postgresql/*/bin/postgres | sort -V | tail -1)")"

# ---------------------------------------------------------------- weir
run_weir() { # C N LOAD
  local c="$1" n="$2" load="$3" port data pid wc
  port="$(free_port)"; data="$RUN_DIR/weir-c$c"
  rm -rf "$data"
  "$WEIR" server --data-dir "$data" --listen "127.0.0.1:$port" > "$RUN_DIR/weir-c$c.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait_http "http://127.0.0.1:$port/readyz" 30
  wc=$(( c > 16 ? c : 16 ))
  if timeout 600 "$WEIR" --server "http://127.0.0.1:$port" --output json bench --instances "$n" \
      --steps "$STEPS" --concurrency "$c" --worker-concurrency "$wc" --server-pid "$pid" \
      > "$RUN_DIR/weir-c$c.json" 2> "$RUN_DIR/weir-c$c.bench.log"; then
    "$PY" -c '
import json, sys
d = json.load(open(sys.argv[1]))
d["completed"] = d["instances"] - d.get("failed", 0)
d["errors"] = d.get("failed", 0)
d.pop("machine", None)
print(json.dumps(d))' "$RUN_DIR/weir-c$c.json" | record weir "$c" "$load"
  else
    record_failure weir "$c" "$load" "weir bench failed: $(tail -c 300 "$RUN_DIR/weir-c$c.bench.log")"
  fi
  stop_pid "$pid"
  rm -rf "$data"
}

# ---------------------------------------------------------------- Restate
run_restate() { # C N LOAD
  local c="$1" n="$2" load="$3" node ingress admin svc base pid spid
  node="$(free_port)"; ingress="$(free_port)"; admin="$(free_port)"; svc="$(free_port)"
  base="$RUN_DIR/restate-c$c"
  rm -rf "$base"; mkdir -p "$base"
  RESTATE_DISABLE_TELEMETRY=true RESTATE_INGRESS__BIND_PORT="$ingress" RESTATE_ADMIN__BIND_PORT="$admin" \
    RESTATE_ADMIN__DISABLE_WEB_UI=true \
    "$RESTATE_SERVER" --no-logo --listen-mode tcp --bind-ip 127.0.0.1 --bind-port "$node" \
    --advertised-address "http://127.0.0.1:$node/" --base-dir "$base" --log-format compact \
    > "$base.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  "$RESTATE_SERVICE" "127.0.0.1:$svc" > "$base.service.log" 2>&1 &
  spid=$!; PIDS+=("$spid")
  if ! wait_http "http://127.0.0.1:$admin/health" 60 || ! wait_http "http://127.0.0.1:$ingress/restate/health" 60; then
    record_failure restate "$c" "$load" "restate-server did not become healthy: $(tail -c 300 "$base.log")"
    stop_pid "$spid"; stop_pid "$pid"; return
  fi
  curl -fsS -X POST "http://127.0.0.1:$admin/deployments" -H 'content-type: application/json' \
    -d "{\"uri\": \"http://127.0.0.1:$svc\"}" > "$base.register.json"
  local cpu0; cpu0="$(cpu_of "$pid" "$spid")"
  if timeout 600 "$RESTATE_DRIVER" "http://127.0.0.1:$ingress" "$n" "$STEPS" "$c" "$SECONDS_CAP" \
      > "$base.json" 2> "$base.driver.log"; then
    record restate "$c" "$load" "$(awk -v a="$cpu0" -v b="$(cpu_of "$pid" "$spid")" 'BEGIN{print b-a}')" \
      "restate-server + our Rust service" < "$base.json"
  else
    record_failure restate "$c" "$load" "driver failed: $(tail -c 300 "$base.driver.log")"
  fi
  stop_pid "$spid"; stop_pid "$pid"
  rm -rf "$base"
}

# ---------------------------------------------------------------- Temporal
TEMPORAL_PRAGMAS=(--sqlite-pragma journal_mode=wal --sqlite-pragma synchronous=2)
run_temporal() { # C N LOAD
  local c="$1" n="$2" load="$3" port http metrics dir pid wpid wc
  port="$(free_port)"; http="$(free_port)"; metrics="$(free_port)"
  dir="$RUN_DIR/temporal-c$c"; rm -rf "$dir"; mkdir -p "$dir"
  "$TEMPORAL" server start-dev --headless --ip 127.0.0.1 --port "$port" --http-port "$http" \
    --metrics-port "$metrics" --db-filename "$dir/temporal.db" "${TEMPORAL_PRAGMAS[@]}" \
    --log-level warn > "$dir/server.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  if ! wait_http "http://127.0.0.1:$http/api/v1/namespaces/default" 60; then
    record_failure temporal "$c" "$load" "dev server did not answer: $(tail -c 300 "$dir/server.log")"
    stop_pid "$pid"; return
  fi
  wc=$(( c > 16 ? c : 16 ))
  "$PY" "$HERE/temporal_seq.py" worker --address "127.0.0.1:$port" --concurrency "$wc" > "$dir/worker.log" 2>&1 &
  wpid=$!; PIDS+=("$wpid")
  sleep 1
  local cpu0; cpu0="$(cpu_of "$pid" "$wpid")"
  if timeout 600 "$PY" "$HERE/temporal_seq.py" drive --address "127.0.0.1:$port" --instances "$n" \
      --steps "$STEPS" --concurrency "$c" --max-seconds "$SECONDS_CAP" > "$dir/driver.json" 2> "$dir/driver.log"; then
    record temporal "$c" "$load" "$(awk -v a="$cpu0" -v b="$(cpu_of "$pid" "$wpid")" 'BEGIN{print b-a}')" \
      "temporal dev server + our Python worker" < "$dir/driver.json"
  else
    record_failure temporal "$c" "$load" "driver failed: $(tail -c 300 "$dir/driver.log")"
  fi
  ls -la "$dir" > "$RUN_DIR/temporal-c$c.files.txt"
  stop_pid "$wpid"; stop_pid "$pid"
  rm -rf "$dir"
}

# ---------------------------------------------------------------- DBOS on PostgreSQL
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
pg_stop() {
  as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop > /dev/null 2>&1 || {
    local ppid; ppid="$(head -1 "$PG_DATA/postmaster.pid" 2>/dev/null || true)"
    [ -n "$ppid" ] && kill "$ppid" 2>/dev/null || true
  }
}
run_dbos() { # C N LOAD
  local c="$1" n="$2" load="$3" port dir url
  port="$(free_port)"; dir="$RUN_DIR/pg-c$c"; rm -rf "$dir"; mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  as_postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 > "$dir/initdb.log" 2>&1
  PG_DATA="$dir/data"
  if ! as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$dir/postgres.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir -c fsync=on -c synchronous_commit=on -c full_page_writes=on -c wal_sync_method=fdatasync -c max_connections=200" \
      > "$dir/pg_ctl.log" 2>&1; then
    record_failure dbos "$c" "$load" "postgres did not start: $(tail -c 300 "$dir/postgres.log")"
    PG_DATA=""; return
  fi
  PIDS+=("$(head -1 "$PG_DATA/postmaster.pid")")
  as_postgres "$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -Atc \
    "select name || '=' || setting from pg_settings where name in ('fsync','synchronous_commit','full_page_writes','wal_sync_method','server_version')" \
    > "$RUN_DIR/pg-settings.txt" 2>&1 || true
  url="postgresql://postgres@127.0.0.1:$port/weir_peer_seq"
  local ppid cpu0; ppid="$(head -1 "$PG_DATA/postmaster.pid")"; cpu0="$(pg_cpu "$ppid")"
  if timeout 600 "$PY" "$HERE/dbos_seq.py" --database-url "$url" --instances "$n" --steps "$STEPS" \
      --concurrency "$c" --max-seconds "$SECONDS_CAP" --executor-threads 20 \
      > "$dir/driver.json" 2> "$dir/driver.log"; then
    record dbos "$c" "$load" "$(awk -v a="$cpu0" -v b="$(pg_cpu "$ppid")" 'BEGIN{print b-a}')" \
      "PostgreSQL only (DBOS runs inside the client process; includes schema set-up)" < "$dir/driver.json"
  else
    record_failure dbos "$c" "$load" "driver failed: $(tail -c 300 "$dir/driver.log")"
  fi
  pg_stop
  stop_pid "$ppid"
  PG_DATA=""
  rm -rf "$dir"
}

# ---------------------------------------------------------------- versions, settings, machine
log "recording versions and settings"
"$RESTATE_SERVER" --version > "$RUN_DIR/restate-version.txt" 2>&1 || true
RESTATE_DISABLE_TELEMETRY=true "$RESTATE_SERVER" --dump-config --bind-ip 127.0.0.1 --base-dir "$RUN_DIR/rs-dump" \
  > "$RUN_DIR/restate-config.toml" 2>/dev/null || true
rm -rf "$RUN_DIR/rs-dump"
"$TEMPORAL" --version > "$RUN_DIR/temporal-version.txt" 2>&1 || true
"$PG_BIN/postgres" --version > "$RUN_DIR/postgres-version.txt" 2>&1 || true

# ---------------------------------------------------------------- the sweep
IFS=',' read -r -a SYSTEM_LIST <<< "$SYSTEMS"
for c in $CONCURRENCY; do
  for system in "${SYSTEM_LIST[@]}"; do
    wait_quiet
    load="$(cut -d' ' -f1-3 /proc/loadavg)"
    n="$(instances_for "$system" "$c")"
    log "$system: concurrency $c, up to $n instances (load $load)"
    case "$system" in
      weir) run_weir "$c" "$n" "$load" ;;
      restate) run_restate "$c" "$n" "$load" ;;
      temporal) run_temporal "$c" "$n" "$load" ;;
      dbos) run_dbos "$c" "$n" "$load" ;;
      *) echo "unknown system $system" >&2; exit 2 ;;
    esac
    tail -1 "$RESULTS" | cut -c1-300 >&2
  done
done
# every point says which run measured it
"$PY" -c '
import json, sys
path, stamp = sys.argv[1], sys.argv[2]
pts = [json.loads(l) for l in open(path) if l.strip()]
with open(path, "w") as f:
    for p in pts:
        p.setdefault("run", stamp)
        f.write(json.dumps(p) + "\n")
' "$RESULTS" "$STAMP"
if [ -n "$MERGE_DIR" ]; then
  log "taking the other points from $MERGE_DIR"
  "$PY" -c '
import json, sys
new_path, old_path, old_stamp = sys.argv[1], sys.argv[2], sys.argv[3]
new = [json.loads(l) for l in open(new_path) if l.strip()]
have = {(p["system"], p["concurrency"]) for p in new}
old = [json.loads(l) for l in open(old_path) if l.strip()]
merged = []
for p in old:
    p.setdefault("run", old_stamp)
    if (p["system"], p["concurrency"]) not in have:
        merged.append(p)
merged += new
with open(new_path, "w") as f:
    for p in merged:
        f.write(json.dumps(p) + "\n")
' "$RESULTS" "$MERGE_DIR/points.jsonl" "$(basename "$MERGE_DIR")"
fi

# ---------------------------------------------------------------- report
if [ "$QUICK" = 1 ] && [ "$OUT_DIR" = "$HERE/results" ]; then
  OUT_DIR="$RUN_DIR"
fi
mkdir -p "$OUT_DIR"
"$PY" "$HERE/report.py" --run-dir "$RUN_DIR" --out "$OUT_DIR/$DATE" \
  --weir-commit "$WEIR_COMMIT" --weir-tree "$WEIR_DIRTY" --seconds-cap "$SECONDS_CAP" \
  --quick "$QUICK" --restate-sdk-lock "$HERE/restate-service/Cargo.lock"
log "results: $OUT_DIR/$DATE.json, $OUT_DIR/$DATE.png (run directory $RUN_DIR)"
