#!/usr/bin/env bash
# Registers (or updates) Debezium connectors through the Kafka Connect REST API.
#
#   connectors/register.sh [CONNECT_URL] [FILE.json ...]
#
# CONNECT_URL defaults to $CONNECT_URL, then http://localhost:8083. FILE defaults to every
# *.json next to this script. Each file is {"name": ..., "config": {...}}; it is applied with
# `PUT /connectors/NAME/config`, which creates the connector or updates it in place (so running
# this twice is harmless). Waits for Connect to answer first, then for each connector's task to
# be RUNNING, and exits non-zero naming the connector whose task failed.
#
# Needs curl and bash. With jq it creates or updates; without jq (e.g. inside the Debezium
# Connect image) it creates with `POST /connectors` and leaves an existing connector as it is.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
connect="${1:-${CONNECT_URL:-http://localhost:8083}}"
shift || true
files=("$@")
if ((${#files[@]} == 0)); then
    files=("$here"/*.json)
fi

log() { printf 'register: %s\n' "$*" >&2; }
die() {
    printf 'register: ERROR: %s\n' "$*" >&2
    exit 1
}
command -v curl >/dev/null || die "curl is needed"
have_jq=0
command -v jq >/dev/null && have_jq=1

# The connector's name: the first "name" in the file (the top-level one in these files).
name_of() {
    if ((have_jq)); then
        jq -er '.name' "$1"
    else
        grep -o '"name"[[:space:]]*:[[:space:]]*"[^"]*"' "$1" | head -n1 | sed 's/.*"\([^"]*\)"$/\1/'
    fi
}

# The state of the connector's first task, or UNASSIGNED.
task_state() {
    local body
    body=$(curl -fsS "$connect/connectors/$1/status") || return 1
    if ((have_jq)); then
        jq -r '.tasks[0].state // "UNASSIGNED"' <<<"$body"
    else
        local s
        s=$(grep -o '"tasks":\[{[^]]*' <<<"$body" | grep -o '"state":"[A-Z_]*"' | head -n1 | cut -d'"' -f4)
        echo "${s:-UNASSIGNED}"
    fi
}

log "waiting for Kafka Connect at $connect"
for _ in $(seq 1 120); do
    curl -fsS "$connect/connectors" >/dev/null 2>&1 && break
    sleep 2
done
curl -fsS "$connect/connectors" >/dev/null || die "Kafka Connect does not answer at $connect"

for file in "${files[@]}"; do
    name=$(name_of "$file") || die "$file: no \"name\""
    [[ -n $name ]] || die "$file: no \"name\""
    log "applying $name from $file"
    out=$(mktemp)
    if ((have_jq)); then
        status=$(jq -c '.config' "$file" | curl -sS -o "$out" -w '%{http_code}' -X PUT \
            -H 'Content-Type: application/json' --data @- "$connect/connectors/$name/config")
    else
        status=$(curl -sS -o "$out" -w '%{http_code}' -X POST \
            -H 'Content-Type: application/json' --data @"$file" "$connect/connectors")
        if [[ $status == 409 ]]; then
            log "$name exists already; left as it is (install jq to update it in place)"
            status=200
        fi
    fi
    if [[ $status != 200 && $status != 201 ]]; then
        cat "$out" >&2
        rm -f "$out"
        die "$name: Kafka Connect answered HTTP $status"
    fi
    rm -f "$out"
done

for file in "${files[@]}"; do
    name=$(name_of "$file")
    state=""
    for _ in $(seq 1 60); do
        state=$(task_state "$name") || state=""
        [[ $state == RUNNING || $state == FAILED ]] && break
        sleep 2
    done
    if [[ $state != RUNNING ]]; then
        curl -fsS "$connect/connectors/$name/status" >&2 || true
        die "$name: task is ${state:-unknown}, not RUNNING"
    fi
    log "$name: RUNNING"
done
