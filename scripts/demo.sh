#!/usr/bin/env bash
# The README's demo. By default it reads PostgreSQL's logical replication stream: it starts its own
# PostgreSQL cluster (wal_level=logical), a physical standby of it replaying 200 ms behind (listed
# in freshness.replicas) and Redis, runs the real cdc-invalidator against them, performs UPDATEs,
# a DELETE and a TRUNCATE, and shows the cached keys disappearing with the time since each
# commit, a stale refill from the standby removed by the second pass, then the staleness, settled
# seconds and replica lag the daemon measured. With `kafka` it takes the Kafka path
# instead: its own Kafka-compatible broker (Tansu), Debezium change events, dead letters, explain.
# Doubles as a smoke test: exits non-zero if an expected invalidation does not happen within 30 s
# or the daemon does not drain cleanly.
#
#   bash scripts/demo.sh            # PostgreSQL
#   bash scripts/demo.sh kafka      # Debezium events through Kafka
#
# Steps: scripts/install-deps.sh (quick when everything is present), a release build of the
# binary and the example, then target/release/examples/demo (source: examples/demo/).
# Environment it honours:
#   PG_BIN            PostgreSQL's server binaries (default: the newest /usr/lib/postgresql/*/bin)
#   TANSU_BIN         a tansu binary to use instead of the verified one install-deps.sh provides
#   CARGO_TARGET_DIR  cargo's build directory (default: target/ in the repository)
#   DEMO_KEEP=1       keep the demo's work directory (config, rules, logs, dead letters)
# Works without a TTY; everything it starts listens on 127.0.0.1 only and is stopped at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '==> %s\n' "$*" >&2; }

case "${1:-postgres}" in
postgres | kafka) source=${1:-postgres} ;;
*)
    printf 'usage: bash scripts/demo.sh [postgres|kafka]   (default: postgres)\n' >&2
    exit 2
    ;;
esac

step "installing dependencies (PostgreSQL 15, redis-server, the Tansu broker)"
tansu=$(bash scripts/install-deps.sh)
export TANSU_BIN="${TANSU_BIN:-$tansu}"

step "building (cargo build --release --bins --examples; the first build takes a few minutes)"
cargo build --release --bins --examples

target="${CARGO_TARGET_DIR:-target}"
step "running the demo ($source)"
exec "$target/release/examples/demo" "$source"
