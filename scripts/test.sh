#!/usr/bin/env bash
# The project's test command (the README names it; CI runs it through .ci/run):
#   1. scripts/install-deps.sh  (quick when everything is present)
#   2. every test target, with cargo-nextest when installed, else cargo test
#   3. cargo fmt --check, and cargo clippy over every target (benches included) with warnings
#      as errors (cargo check of the benches where clippy is not installed)
#   4. cargo deny check licenses bans sources (deny.toml; advisories need the network, see
#      docs/design.md "Dependency checks")
# Exits non-zero if any step fails. Arguments are passed to the test runner, e.g. a name filter:
#   scripts/test.sh tansu_smoke
# Environment it honours:
#   TANSU_BIN         a tansu binary to use instead of the verified one install-deps.sh provides
#   CARGO_TARGET_DIR  cargo's build directory (default: target/ in the repository)
#   CARGO_DENY        a cargo-deny binary to use instead of the one install-deps.sh provides
#   TEST_TIMEOUT      hard limit for running the tests, build excluded (default 15m: the suite
#                     must stay well inside CI's budget, and a hung test must fail, not block CI)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '\n==> %s\n' "$*" >&2; }

step "installing dependencies"
tansu=$(bash scripts/install-deps.sh)
export TANSU_BIN="${TANSU_BIN:-$tansu}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
test_timeout="${TEST_TIMEOUT:-15m}"

# cargo-nextest runs each test in its own process (and process group). Our integration tests
# start redis-server, tansu, varnishd, promtool and in-process librdkafka mock clusters: per-process
# isolation means one test's panic, leaked child or process-wide state (signal handlers, env,
# a global tracing subscriber) cannot disturb another, a test killed on timeout takes its
# children with it, and it reports which test hung. Plain `cargo test` is the fallback on
# machines without nextest; both print the closing summary CI reads.
if cargo nextest --version >/dev/null 2>&1; then
    build=(cargo nextest run --lib --bins --tests --no-run)
    run=(cargo nextest run --lib --bins --tests --no-fail-fast)
else
    build=(cargo test --lib --bins --tests --no-run)
    run=(cargo test --lib --bins --tests --no-fail-fast)
fi
# Benchmarks are programs (harness = false), run with `cargo bench --bench NAME`, not tests;
# they are only compiled here (by clippy, at the end) so they cannot rot.

# Build first, without a time limit (a fresh clone compiles librdkafka and every dependency), so
# the limit below measures the tests alone.
step "building tests (${build[*]})"
"${build[@]}"
# The reference examples (broadcast subscriber, warmer) are run by tests as the programs users
# would run, and test targets do not build examples.
cargo build --examples --quiet

status=0
step "running tests (${run[*]}, limit $test_timeout)"
# --kill-after: if the runner ignores SIGTERM, SIGKILL follows.
timeout --kill-after=30s "$test_timeout" "${run[@]}" "$@" || status=$?
if ((status == 124 || status == 137)); then
    printf 'test.sh: the tests did not finish within %s\n' "$test_timeout" >&2
fi

# Formatting is checked even when tests failed, so one run reports everything; on success it
# prints nothing, leaving the test runner's summary as the last line.
fmt_status=0
cargo fmt --check || fmt_status=$?
if ((fmt_status != 0)); then
    printf 'test.sh: cargo fmt --check failed: run `cargo fmt`\n' >&2
fi

# Lints (and the benches, which no test runs, compile): quiet on success, like fmt.
lint_status=0
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --all-targets --quiet -- -D warnings || lint_status=$?
    ((lint_status == 0)) || printf 'test.sh: cargo clippy found problems (above)\n' >&2
else
    printf 'test.sh: clippy is not installed; only checking that the benches compile\n' >&2
    cargo check --benches --quiet || lint_status=$?
fi

# The locked dependency tree against deny.toml: licences, bans (duplicates warn), sources.
# Offline (--locked --offline): the advisory database needs the network (docs/design.md,
# "Dependency checks"). Quiet on success, like fmt and clippy; everything it said on failure.
# cargo deny reads `cargo metadata`, which wants every locked package, including those of
# other platforms (Windows-only crates) that building here never downloads: on a fresh
# machine, with --offline, it failed on the first of them. So fetch the whole locked tree
# first (from crates.io, as the build does; a no-op once cached).
deny_status=0
deny_out=""
cargo_deny="${CARGO_DENY:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-invalidator/bin/cargo-deny}"
fetch_out=$(cargo fetch --locked 2>&1) || {
    deny_status=$?
    printf '%s\ntest.sh: cargo fetch --locked failed, so cargo deny cannot read the tree\n' "$fetch_out" >&2
}
if ((deny_status == 0)); then
    deny_out=$("$cargo_deny" --locked --offline --color never check --hide-inclusion-graph licenses bans sources 2>&1) ||
        deny_status=$?
fi
if ((deny_status != 0)); then
    printf '%s\ntest.sh: cargo deny found problems (above; deny.toml)\n' "$deny_out" >&2
fi

if ((status != 0 || fmt_status != 0 || lint_status != 0 || deny_status != 0)); then
    exit 1
fi
