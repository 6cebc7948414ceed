#!/usr/bin/env bash
# Installs what pyproxy's scripts need on a fresh Debian machine; safe to run again.
# Sourced by demo.sh and test.sh so each works on its own.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APT_PACKAGES=(iptables ipset conntrack iproute2 kmod user-mode-linux ipvsadm)

need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    echo "bootstrap: installing ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "bootstrap: creating .venv" >&2
    "$PY" -m venv "$ROOT/.venv"
fi
stamp="$ROOT/.venv/.pyproxy-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
    echo "bootstrap: installing pyproxy and its test tools into .venv" >&2
    "$ROOT/.venv/bin/pip" install -q -e "$ROOT[test]"
    touch "$stamp"
fi
