"""Kernel settings a dataplane needs, each written only when it differs.

Writing an unchanged sysctl is harmless but noisy (and some, like the IPVS
ones, reset state when written), so every setter reads first.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc/sys")


def path_of(name: str) -> Path:
    return PROC / name.replace(".", "/")


def read(name: str) -> str | None:
    try:
        return path_of(name).read_text().strip()
    except OSError:
        return None


def ensure(name: str, value: int | str) -> bool:
    """Set ``name`` (dotted, e.g. net.ipv4.ip_forward) to ``value``; True if it changed."""
    want = str(value)
    if read(name) == want:
        return False
    path_of(name).write_text(want)
    log.info("sysctl set", extra={"sysctl": name, "value": want})
    return True
