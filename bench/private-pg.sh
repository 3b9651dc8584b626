# Sourced by the bench scripts that run weir on a private PostgreSQL (not run alone).
# The caller sets WORK, a temporary directory it removes, and calls stop_private_pg
# before removing it.

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)

# Runs a command as the postgres user when this script runs as root (initdb refuses root).
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_private_pg [SERVER OPTIONS]: a new cluster in $WORK/pg with PostgreSQL's defaults
# (fsync on, synchronous_commit on), on 127.0.0.1 and a free port, set in PG_PORT.
start_private_pg() {
  PG_PORT=$(free_port)
  mkdir -p "$WORK/pg"
  if [[ $(id -u) == 0 ]]; then chown postgres "$WORK/pg"; fi
  as_pg "$PG_BIN/initdb" -D "$WORK/pg" -U postgres -A trust >/dev/null
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w \
    -o "-h 127.0.0.1 -p $PG_PORT -k $WORK/pg $*" start >/dev/null
}

stop_private_pg() { as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null 2>&1 || true; }
