"""Keeps tests/ipvs inside User-mode Linux and gives them a netlab mini-cluster there.

The host kernel has no IPVS. scripts/uml.py boots the User-mode Linux kernel
(which has it) with the host's filesystem as root and sets PYPROXY_IN_UML=1 for
the command it runs; anywhere else these tests are collected but skipped, with
the command that runs them as the reason, so a plain ``pytest`` stays green on
the host and still lists them. Inside UML a missing ip_vs module is an error,
not a skip: it means the harness is broken, and a skip would hide that.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.lab import netlab

HERE = Path(__file__).resolve().parent
IN_UML = os.environ.get("PYPROXY_IN_UML") == "1"
RUN_COMMAND = "python scripts/uml.py run -- .venv/bin/pytest -q -p no:cacheprovider tests/ipvs"
IPVS_PROC = Path("/proc/net/ip_vs")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ipvs: needs the IPVS kernel of User-mode Linux (runs only via scripts/uml.py)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/ipvs; outside UML, also skip it (this hook sees all items)."""
    skip = pytest.mark.skip(reason=f"IPVS tests run only inside User-mode Linux: {RUN_COMMAND}")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.ipvs)
            if not IN_UML:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _ipvs_kernel() -> None:
    """Inside UML, IPVS must be there: scripts/uml.py loads ip_vs before the tests start."""
    if not IPVS_PROC.exists():
        pytest.fail(f"{IPVS_PROC} is missing: ip_vs is not loaded (is this scripts/uml.py?)")


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    """A netlab mini-cluster (node, client, pod1..pod3) with echo servers, inside UML."""
    with netlab.Lab() as lab:
        lab.start_echo_all()
        yield lab


@pytest.fixture
def node_ipvs(lab: Any) -> Iterator[Any]:
    """A pyroute2 IPVS socket in the lab's node namespace; clears the IPVS table after.

    pyroute2 opens the netlink socket inside the namespace (``netns=``), so the
    test process itself need not enter it. ``ipvsadm -C`` empties the node's
    table afterwards, so tests sharing the module's lab start from nothing.
    """
    from pyroute2 import IPVS

    ipvs = IPVS(netns=lab.ns_name("node"))
    try:
        yield ipvs
    finally:
        ipvs.close()
        lab.run("node", "ipvsadm", "-C")
