#!/usr/bin/env bash
# The README's demo: starts its own Redis and Kafka-compatible broker (Tansu), runs the real
# cdc-invalidator against them, produces Debezium change events and shows the cached keys
# disappearing, the dead letters and the metrics. Doubles as a smoke test: exits non-zero if an
# expected invalidation does not happen within 30 s or the daemon does not drain cleanly.
#
#   bash scripts/demo.sh
#
# Steps: scripts/install-deps.sh (quick when everything is present), a release build of the
# binary and the example, then target/release/examples/demo (source: examples/demo.rs).
# Environment it honours:
#   TANSU_BIN         a tansu binary to use instead of the verified one install-deps.sh provides
#   CARGO_TARGET_DIR  cargo's build directory (default: target/ in the repository)
#   DEMO_KEEP=1       keep the demo's work directory (config, rules, logs, dead letters)
# Works without a TTY; everything it starts listens on 127.0.0.1 only and is stopped at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '==> %s\n' "$*" >&2; }

step "installing dependencies (redis-server, the Tansu broker)"
tansu=$(bash scripts/install-deps.sh)
export TANSU_BIN="${TANSU_BIN:-$tansu}"

step "building (cargo build --release --bins --examples; the first build takes a few minutes)"
cargo build --release --bins --examples

target="${CARGO_TARGET_DIR:-target}"
step "running the demo"
exec "$target/release/examples/demo"
