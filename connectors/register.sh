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
command -v jq >/dev/null || die "jq is needed (it extracts name and config from each file)"

log "waiting for Kafka Connect at $connect"
for _ in $(seq 1 120); do
    curl -fsS "$connect/connectors" >/dev/null 2>&1 && break
    sleep 2
done
curl -fsS "$connect/connectors" >/dev/null || die "Kafka Connect does not answer at $connect"

for file in "${files[@]}"; do
    name=$(jq -er '.name' "$file") || die "$file: no \"name\""
    log "applying $name from $file"
    status=$(jq -c '.config' "$file" | curl -sS -o /tmp/register.$$ -w '%{http_code}' -X PUT \
        -H 'Content-Type: application/json' --data @- "$connect/connectors/$name/config")
    if [[ $status != 200 && $status != 201 ]]; then
        cat /tmp/register.$$ >&2
        rm -f /tmp/register.$$
        die "$name: Kafka Connect answered HTTP $status"
    fi
    rm -f /tmp/register.$$
done

for file in "${files[@]}"; do
    name=$(jq -er '.name' "$file")
    state=""
    for _ in $(seq 1 60); do
        state=$(curl -fsS "$connect/connectors/$name/status" | jq -r '.tasks[0].state // "UNASSIGNED"') || state=""
        [[ $state == RUNNING || $state == FAILED ]] && break
        sleep 2
    done
    if [[ $state != RUNNING ]]; then
        curl -fsS "$connect/connectors/$name/status" | jq -r '.tasks[0].trace // empty' >&2 || true
        die "$name: task is ${state:-unknown}, not RUNNING"
    fi
    log "$name: RUNNING"
done
