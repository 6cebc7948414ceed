"""IPVS tests: they need a kernel with IPVS, so they run inside User-mode Linux.

Run them with ``python scripts/uml.py run -- .venv/bin/pytest -q -p no:cacheprovider
tests/ipvs``; anywhere else they are collected and skipped (see conftest.py).
"""
