"""iptables mode end to end: pyproxy programs a real kernel and real packets go through it.

Every scenario of tests/kernel/scenarios.py runs on both iptables backends
(legacy and nf_tables) in a fresh mini-cluster (scripts/netlab.py), plus the
scenarios only iptables mode has.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel import cluster
from tests.kernel.lab import needs_root, netlab
from tests.kernel.scenarios import *  # noqa: F403 - the shared scenarios run here
from tests.kernel.scenarios import PODS, Cluster, pods_of

pytestmark = [pytest.mark.kernel, needs_root]


@pytest.fixture(scope="module", params=["legacy", "nft"])
def k(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
      ) -> Iterator[Cluster]:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        c = Cluster(lab, request.param, tmp_path_factory.mktemp(f"manifests-{request.param}"))
        c.sync()
        yield c


def test_node_port_on_localhost_from_the_node(k: Cluster) -> None:
    # kube-proxy's default localhostNodePorts: 127.0.0.1:<nodePort> works on the node.
    replies = k.probe("node", "127.0.0.1", cluster.NODE_PORTS["web"], count=30)
    assert pods_of(replies) == PODS


