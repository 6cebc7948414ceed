"""`pyproxy cleanup --kube-proxy` on a node that ran kube-proxy (iptables mode), both backends.

The node namespace gets what a real migration finds: kube-proxy v1.30's rules
with the kubelet's chains (tests/kernel/kube_proxy.py, IPv4 and IPv6), then
pyproxy's own rules from `pyproxy run --once`, then other software's rules.
After the cleanup every kube-proxy chain and every jump into one is gone, and
every other line of iptables-save (all tables, both families) is exactly what
it was; pyproxy's Services still carry traffic and kube-proxy's no longer do.
The IPVS half (kube-ipvs0, virtual servers, ipsets) runs under User-mode
Linux: tests/ipvs/test_migrate_ipvs.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel import cluster
from tests.kernel import kube_proxy as kp
from tests.kernel.lab import needs_root, netlab
from tests.kernel.scenarios import NODE_IP, NOT_SERVED, PODS, Cluster, pods_of

pytestmark = [pytest.mark.kernel, needs_root]

KUBELET_CHAINS = {"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-MASQ", "KUBE-IPTABLES-HINT"}


@pytest.fixture(scope="module", params=["legacy", "nft"])
def k(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
      ) -> Iterator[Cluster]:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        yield Cluster(lab, request.param, tmp_path_factory.mktemp(f"migrate-{request.param}"))


def restore(k: Cluster, rules: str, *, ipv6: bool = False) -> None:
    k.lab.run("node", f"{'ip6' if ipv6 else 'ip'}tables-{k.backend}-restore", "--noflush",
              input=rules)


def save_all(k: Cluster) -> str:
    """Every table of both families, as iptables-save prints them."""
    return "".join(k.lab.run("node", f"{family}tables-{k.backend}-save").stdout
                   for family in ("ip", "ip6"))


def declared_chains(save: str) -> set[str]:
    return {line.split()[0][1:] for line in kp.normalized(save) if line.startswith(":")}


def test_cleanup_kube_proxy_removes_its_leftovers_and_nothing_else(k: Cluster) -> None:
    # kube-proxy ran here first, and its rules carry traffic.
    restore(k, kp.IPTABLES_MODE)
    restore(k, kp.IPTABLES_MODE_V6, ipv6=True)
    assert pods_of(k.probe("client", kp.KUBE_WEB_IP, 80, count=20)) == {"pod1", "pod2"}
    assert pods_of(k.probe("client", NODE_IP, kp.KUBE_NODE_PORT, count=20)) == {"pod1", "pod2"}
    # Then pyproxy was deployed, next to other software's rules.
    k.sync()
    restore(k, kp.FOREIGN)
    restore(k, kp.FOREIGN_V6, ipv6=True)
    before = save_all(k)
    assert [line for line in kp.normalized(before) if kp.kube_proxy_line(line)]
    assert "PYPROXY-SERVICES" in before

    result = k.pyproxy("cleanup", "--kube-proxy")
    assert f"iptables-{k.backend}: removed kube-proxy's chains" in result.stdout
    assert f"ip6tables-{k.backend}: removed kube-proxy's chains" in result.stdout

    after = save_all(k)
    assert [line for line in kp.normalized(after) if kp.kube_proxy_line(line)] == []
    # Everything that was not kube-proxy's is byte for byte what it was: the kubelet's
    # chains, the foreign rules and pyproxy's own rules, in the same order.
    assert kp.normalized(after) == kp.without_kube_proxy(before)
    assert declared_chains(after) >= KUBELET_CHAINS
    assert "-A INPUT -s 198.18.250.2/32 -j ACCEPT" in after
    assert "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER" in after

    # pyproxy's Services still work; kube-proxy's are gone.
    assert pods_of(k.probe("client", NODE_IP, cluster.NODE_PORTS["web"], count=30)) == PODS
    assert pods_of(k.probe("pod2", cluster.CLUSTER_IPS["web"], 80, count=30)) == PODS
    assert set(k.probe("client", kp.KUBE_WEB_IP, 80, count=2, timeout=0.5)) <= NOT_SERVED
    assert set(k.probe("client", NODE_IP, kp.KUBE_NODE_PORT, count=2,
                       timeout=0.5)) <= NOT_SERVED
    # A full resync finds pyproxy's rules intact: nothing to write.
    assert "lines_written=0" in k.sync().stderr


def test_cleanup_kube_proxy_twice_changes_nothing(k: Cluster) -> None:
    before = save_all(k)
    result = k.pyproxy("cleanup", "--kube-proxy")
    assert "removed" not in result.stdout
    assert kp.normalized(save_all(k)) == kp.normalized(before)


def test_plain_cleanup_leaves_kube_proxy_alone(k: Cluster) -> None:
    """The other way round: `pyproxy cleanup` removes pyproxy's rules only."""
    restore(k, kp.IPTABLES_MODE)
    try:
        before = save_all(k)
        k.pyproxy("cleanup")
        after = save_all(k)
        assert "PYPROXY" not in after
        assert [line for line in kp.normalized(before) if kp.kube_proxy_line(line)] == [
            line for line in kp.normalized(after) if kp.kube_proxy_line(line)]
    finally:
        k.pyproxy("cleanup", "--kube-proxy")
        k.sync()
