"""IPVS mode end to end, inside the User-mode Linux test kernel.

The same traffic scenarios as iptables mode (tests/kernel/scenarios.py), with
pyproxy `run --mode ipvs --once` programming IPVS virtual servers, its dummy
interface, ipsets and the few iptables rules IPVS needs (legacy iptables:
nf_tables does not work in this kernel).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel.scenarios import *  # noqa: F403 - the shared scenarios run here
from tests.kernel.scenarios import Cluster


@pytest.fixture(scope="module")
def k(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(lab, "legacy", tmp_path_factory.mktemp("manifests-ipvs"), mode="ipvs")
    c.sync()
    yield c
    c.pyproxy("cleanup", check=False)
