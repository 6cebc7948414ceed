"""Imports scripts/netlab.py (a script, not a package module) for the kernel tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROXY = str(Path(sys.executable).parent / "pyproxy")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="needs root, iproute2 and iptables",
)


def _load_netlab() -> ModuleType:
    if "netlab" in sys.modules:
        return sys.modules["netlab"]
    spec = importlib.util.spec_from_file_location("netlab", ROOT / "scripts" / "netlab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netlab"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


netlab = _load_netlab()


T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float,
             what: str | Callable[[], str], interval: float = 0.05) -> T:
    """Poll until ``predicate`` returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        time.sleep(interval)
