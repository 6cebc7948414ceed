#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, unit tests, API tests, kernel tests.
# Installs what it needs (Debian packages, .venv) on a fresh machine. Run as root:
# the kernel tests create network namespaces and program real iptables in them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh

if [ "$(id -u)" != 0 ]; then
    echo "test.sh: run as root (the kernel tests use network namespaces)" >&2
    exit 2
fi

echo "== lint: ruff"
.venv/bin/ruff check pyproxy tests scripts
echo "== types: mypy"
.venv/bin/mypy
echo "== tests"
.venv/bin/pytest -q -p no:cacheprovider --ignore=tests/ipvs "$@"
echo "== IPVS tests (inside the User-mode Linux test kernel: the host kernel has no IPVS)"
python3 scripts/uml.py run --timeout 900 -- .venv/bin/pytest -q -p no:cacheprovider tests/ipvs
