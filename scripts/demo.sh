#!/usr/bin/env bash
# pyproxy end to end on a mini-cluster in network namespaces.
#
# Builds a node, a client and three pods (scripts/netlab.py), lets pyproxy program
# the node once from manifests/examples, sends real connections to the Services'
# ClusterIP and NodePort addresses, shows which pod answered each, then runs
# `pyproxy cleanup` and removes everything. Nothing outside the namespaces it
# creates is touched. Needs root (namespaces and iptables).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: needs root (it creates network namespaces)" >&2
    exit 1
fi

# shellcheck source=scripts/bootstrap.sh
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"

# netlab.py tears the lab down itself; this trap is the backstop if it is killed
# hard. It removes only the lab whose prefix the demo wrote into $state.
state="$(mktemp)"
cleanup() {
    if [ -s "$state" ]; then
        .venv/bin/python scripts/netlab.py destroy "$(cat "$state")" >/dev/null 2>&1 || true
    fi
    rm -f "$state"
}
trap cleanup EXIT

.venv/bin/python scripts/netlab.py demo --state-file "$state" "$@"
