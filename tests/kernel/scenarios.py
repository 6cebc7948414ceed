"""Traffic scenarios every dataplane must pass, written once.

Each test module imports these functions and provides a `k` fixture (a
`Cluster`: a netlab mini-cluster plus a manifests directory pyproxy syncs from)
for its dataplane: iptables on both backends on the host kernel
(tests/kernel/test_iptables_traffic.py), IPVS inside the User-mode Linux test
kernel (tests/ipvs/test_ipvs_traffic.py). pyproxy runs `--once` inside the
node namespace; clients in the client and pod namespaces open real
connections to Service addresses and count which pod answered.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from tests.kernel import cluster
from tests.kernel.lab import PYPROXY, netlab

spread = netlab.spread
REFUSED, TIMEOUT = netlab.REFUSED, netlab.TIMEOUT
NODE_IP = "198.18.100.1"
CLIENT_IP = "198.18.100.2"
GATEWAY = "198.18.0.1"  # the node's address on the pod links: what masquerade leaves
PODS = {"pod1", "pod2", "pod3"}
NOT_SERVED = {REFUSED, TIMEOUT}


class Cluster:
    """A lab plus a manifests directory that pyproxy syncs from."""

    def __init__(self, lab: Any, backend: str, manifests: Path, mode: str = "iptables",
                 extra: tuple[str, ...] = ()) -> None:
        self.lab, self.backend, self.manifests = lab, backend, manifests
        self.mode, self.extra = mode, extra

    def sync(self, objs: list[dict[str, Any]] | None = None) -> subprocess.CompletedProcess[str]:
        cluster.write(self.manifests, cluster.objects() if objs is None else objs)
        return self.pyproxy("run", "--manifests", str(self.manifests),
                            "--hostname-override", cluster.NODE,
                            "--cluster-cidr", "198.18.1.0/24", "--once", *self.extra)

    def pyproxy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [PYPROXY, *args]
        if args[0] == "run":
            argv += ["--mode", self.mode, "--iptables-backend", self.backend]
        return self.lab.run("node", *argv, check=check)

    def save(self) -> str:
        out = self.lab.run("node", f"iptables-{self.backend}-save").stdout
        return "\n".join(line for line in out.splitlines() if not line.startswith("#"))

    def probe(self, ns: str, ip: str, port: int, count: int = 30, proto: str = "tcp",
              timeout: float = 1.0) -> list[str]:
        return list(self.lab.probe(ns, proto, ip, port, count=count, timeout=timeout))


def pods_of(replies: list[str]) -> set[str]:
    return {r.split()[0] for r in replies}


def peers_of(replies: list[str]) -> set[str]:
    return {r.split()[1] for r in replies if len(r.split()) == 2}


# -- ClusterIP ------------------------------------------------------------------------------


def test_cluster_ip_from_node_spreads_over_all_endpoints(k: Cluster) -> None:
    replies = k.probe("node", cluster.CLUSTER_IPS["web"], 80, count=60)
    counts = spread(replies)
    assert set(counts) == PODS, counts
    assert min(counts.values()) >= 5, f"uneven spread {counts}"
    # The node's own traffic is not from the cluster CIDR: masqueraded to the node.
    assert peers_of(replies) == {GATEWAY}


def test_cluster_ip_from_pod_keeps_pod_source(k: Cluster) -> None:
    replies = k.probe("pod2", cluster.CLUSTER_IPS["web"], 80, count=60)
    assert pods_of(replies) == PODS
    others = [r for r in replies if not r.startswith("pod2 ")]
    assert others and peers_of(others) == {"198.18.1.2"}, "pod traffic must not be SNATed"


def test_hairpin_to_itself_is_masqueraded(k: Cluster) -> None:
    replies = k.probe("pod1", cluster.CLUSTER_IPS["web"], 80, count=60)
    own = [r for r in replies if r.startswith("pod1 ")]
    assert own, "pod1 never reached itself through the ClusterIP"
    # Without masquerade pod1 would answer itself directly and the connection would break.
    assert peers_of(own) == {GATEWAY}


# -- NodePort, externalIP, LoadBalancer ----------------------------------------------------


def test_node_port_from_outside(k: Cluster) -> None:
    replies = k.probe("client", NODE_IP, cluster.NODE_PORTS["web"], count=60)
    assert pods_of(replies) == PODS
    assert peers_of(replies) == {GATEWAY}, "eTP Cluster traffic must be masqueraded"


def test_external_ip(k: Cluster) -> None:
    replies = k.probe("client", cluster.EXTERNAL_IP, 80, count=30)
    assert pods_of(replies) == PODS
    assert peers_of(replies) == {GATEWAY}


def test_load_balancer_ip(k: Cluster) -> None:
    replies = k.probe("client", cluster.LB_IPS["lb"], 80, count=30)
    assert pods_of(replies) == PODS


def test_source_ranges_block_other_sources(k: Cluster) -> None:
    # lbranged admits only 198.18.150.0/24; the client (198.18.100.2) is dropped.
    assert set(k.probe("client", cluster.LB_IPS["lbranged"], 80, count=3,
                       timeout=0.5)) == {TIMEOUT}
    # lballowed admits the client's /24.
    assert pods_of(k.probe("client", cluster.LB_IPS["lballowed"], 80, count=10)) <= PODS


# -- endpoint selection -----------------------------------------------------------------------


def test_no_endpoints_is_refused_at_once(k: Cluster) -> None:
    replies = k.probe("node", cluster.CLUSTER_IPS["empty"], 80, count=5, timeout=2.0)
    assert set(replies) == {REFUSED}
    replies = k.probe("pod1", cluster.CLUSTER_IPS["empty"], 80, count=5, timeout=2.0)
    assert set(replies) == {REFUSED}


def test_session_affinity_sticks(k: Cluster) -> None:
    for ns in ("pod1", "pod2", "node"):
        replies = k.probe(ns, cluster.CLUSTER_IPS["sticky"], 80, count=20)
        assert len(pods_of(replies)) == 1, f"{ns} was spread: {spread(replies)}"


def test_udp_service(k: Cluster) -> None:
    replies = k.probe("pod1", cluster.CLUSTER_IPS["dns"], 53, proto="udp", count=60)
    assert pods_of(replies) == PODS


def test_not_ready_endpoint_never_used(k: Cluster) -> None:
    replies = k.probe("node", cluster.CLUSTER_IPS["notready"], 80, count=30)
    assert pods_of(replies) == {"pod1"}


def test_terminating_fallback_uses_serving_only(k: Cluster) -> None:
    replies = k.probe("node", cluster.CLUSTER_IPS["terminating"], 80, count=30)
    assert pods_of(replies) == {"pod1"}


def test_multi_port_service(k: Cluster) -> None:
    assert pods_of(k.probe("node", cluster.CLUSTER_IPS["multi"], 80, count=10)) == {"pod1"}
    assert pods_of(k.probe("node", cluster.CLUSTER_IPS["multi"], 81, count=10)) == {"pod2"}


# -- traffic policies ----------------------------------------------------------------------------


def test_external_traffic_policy_local(k: Cluster) -> None:
    replies = k.probe("client", NODE_IP, cluster.NODE_PORTS["local"], count=30)
    assert pods_of(replies) == {"pod1"}, "external traffic must stay on this node"
    assert peers_of(replies) == {CLIENT_IP}, "the client's source IP must be preserved"
    # Pod traffic to the same service still reaches every endpoint.
    assert pods_of(k.probe("pod2", cluster.CLUSTER_IPS["local"], 80, count=40)) == {
        "pod1", "pod3"}


def test_external_traffic_policy_local_without_local_endpoint(k: Cluster) -> None:
    replies = k.probe("client", NODE_IP, cluster.NODE_PORTS["localnone"], count=3,
                      timeout=0.5)
    # Not served: iptables mode drops it (as upstream), IPVS mode has no real server.
    assert set(replies) <= NOT_SERVED, "external traffic must not reach a remote endpoint"
    # Internal traffic is still served by the remote endpoint.
    assert pods_of(k.probe("pod1", cluster.CLUSTER_IPS["localnone"], 80, count=5)) == {"pod3"}


# -- syncs ---------------------------------------------------------------------------------------


def _owned(save: str) -> list[str]:
    return [line for line in save.splitlines() if "PYPROXY" in line]


def test_identical_resync_leaves_identical_ruleset(k: Cluster) -> None:
    before = k.save()
    result = k.sync()
    assert "lines_written=0" in result.stderr, result.stderr
    assert k.save() == before


def test_endpoint_removal_after_resync(k: Cluster) -> None:
    objs = cluster.objects()
    for obj in objs:
        if obj["kind"] == "EndpointSlice" and obj["metadata"]["name"] == "web-a":
            obj["endpoints"] = [cluster.endpoint("pod1"), cluster.endpoint("pod2")]
    try:
        k.sync(objs)
        assert pods_of(k.probe("client", NODE_IP, cluster.NODE_PORTS["web"], count=40)) == {
            "pod1", "pod2"}
    finally:
        k.sync()
    assert pods_of(k.probe("client", NODE_IP, cluster.NODE_PORTS["web"], count=60)) == PODS


def test_malformed_objects_are_skipped_and_named(k: Cluster) -> None:
    try:
        result = k.sync(cluster.objects() + cluster.malformed())
        log = result.stderr
        assert re.search(r"kind=Service object=t/bad-ip field=spec.clusterIP", log), log
        assert re.search(r"kind=Service object=t/bad-port field=spec.ports\[0\].port", log), log
        assert re.search(r"kind=EndpointSlice object=t/web-broken "
                         r"field=endpoints\[0\].addresses\[0\]", log), log
        assert pods_of(k.probe("client", NODE_IP, cluster.NODE_PORTS["web"], count=30)) == PODS
        assert "198.18.200.99" not in k.save()
    finally:
        k.sync()


def test_cleanup_removes_only_pyproxys_rules(k: Cluster) -> None:
    ipt = f"iptables-{k.backend}"
    foreign = [
        [ipt, "-t", "nat", "-N", "FOREIGN-CHAIN"],
        [ipt, "-t", "nat", "-A", "FOREIGN-CHAIN", "-d", "198.18.250.1/32", "-j", "RETURN"],
        [ipt, "-t", "nat", "-I", "PREROUTING", "-j", "FOREIGN-CHAIN"],
        [ipt, "-t", "filter", "-A", "INPUT", "-s", "198.18.250.2/32", "-j", "ACCEPT"],
    ]
    for cmd in foreign:
        k.lab.run("node", *cmd)
    try:
        assert _owned(k.save())
        k.pyproxy("cleanup")
        after = k.save()
        assert _owned(after) == []
        assert "-A FOREIGN-CHAIN -d 198.18.250.1/32 -j RETURN" in after
        assert "-A PREROUTING -j FOREIGN-CHAIN" in after
        assert "-A INPUT -s 198.18.250.2/32 -j ACCEPT" in after
        # Nothing pyproxy owns is left, so the services are gone too.
        assert set(k.probe("client", NODE_IP, cluster.NODE_PORTS["web"], count=2,
                           timeout=0.5)) <= NOT_SERVED
    finally:
        k.lab.run("node", ipt, "-t", "nat", "-D", "PREROUTING", "-j", "FOREIGN-CHAIN",
                  check=False)
        k.lab.run("node", ipt, "-t", "nat", "-F", "FOREIGN-CHAIN", check=False)
        k.lab.run("node", ipt, "-t", "nat", "-X", "FOREIGN-CHAIN", check=False)
        k.lab.run("node", ipt, "-t", "filter", "-D", "INPUT", "-s", "198.18.250.2/32",
                  "-j", "ACCEPT", check=False)
        k.sync()
    assert pods_of(k.probe("client", NODE_IP, cluster.NODE_PORTS["web"], count=30)) == PODS
