"""The lab every traffic test stands on must itself be right.

If netlab's topology were wrong (a pod path that skips the node's netfilter, a
VIP the node cannot route, an error reported as a timeout), pyproxy's kernel
tests would pass or fail for the wrong reasons. These tests pin the topology's
promises down with plain iptables rules written only inside the lab's node.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.lab import needs_root, netlab

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.kernel, needs_root]




@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        yield lab


def _root_veths() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _iptables(lab: Any, *rule: str) -> None:
    lab.run("node", "iptables", "-w", *rule)


def test_names_and_addresses(lab: Any) -> None:
    assert lab.ns_name("node") == f"{lab.prefix}-node"
    assert [(p.name, p.ip) for p in lab.pods] == [
        ("pod1", "198.18.1.1"),
        ("pod2", "198.18.1.2"),
        ("pod3", "198.18.1.3"),
    ]
    assert (lab.node_ip, lab.client_ip) == ("198.18.100.1", "198.18.100.2")
    routes = lab.run("client", "ip", "-4", "route").stdout.splitlines()
    assert [r.split()[0] for r in routes] == ["198.18.0.0/16", "198.18.100.0/24"]
    with pytest.raises(KeyError):
        lab.ns_name("pod9")


def test_pod_to_pod_crosses_the_node(lab: Any) -> None:
    # Routed, not NATed: the pod sees the other pod's own address.
    assert lab.probe("pod1", "tcp", "198.18.1.2", 8080) == ["pod2 198.18.1.1"]
    assert lab.probe("pod3", "tcp", "198.18.1.1", 8081, count=2) == ["pod1 198.18.1.3"] * 2
    # And forwarded by the node's netfilter, where pyproxy's rules will live.
    rule = ["FORWARD", "-s", "198.18.1.1", "-d", "198.18.1.2", "-p", "tcp", "--dport", "8081",
            "-j", "REJECT", "--reject-with", "tcp-reset"]  # fmt: skip
    _iptables(lab, "-I", *rule)
    try:
        assert lab.probe("pod1", "tcp", "198.18.1.2", 8081) == ["REFUSED"]
        assert lab.probe("pod3", "tcp", "198.18.1.2", 8081) == ["pod2 198.18.1.3"]
    finally:
        _iptables(lab, "-D", *rule)


def test_client_to_pods(lab: Any) -> None:
    for pod in lab.pods:
        assert lab.probe("client", "tcp", pod.ip, 8080) == [f"{pod.name} 198.18.100.2"]
    assert lab.probe("node", "tcp", "198.18.1.3", 8080) == ["pod3 198.18.0.1"]


def test_udp_echo(lab: Any) -> None:
    assert lab.probe("pod3", "udp", "198.18.1.1", 5353, count=3) == ["pod1 198.18.1.3"] * 3
    same = lab.probe("client", "udp", "198.18.1.2", 5353, count=3, same_socket=True)
    assert same == ["pod2 198.18.100.2"] * 3


def test_refused_is_immediate(lab: Any) -> None:
    start = time.monotonic()
    assert lab.probe("client", "tcp", "198.18.1.1", 9, count=3) == ["REFUSED"] * 3
    # ICMP port unreachable through a connected socket; not rate-limited in the lab.
    assert lab.probe("client", "udp", "198.18.1.1", 9, count=10) == ["REFUSED"] * 10
    assert time.monotonic() - start < 1.0


def test_timeout(lab: Any) -> None:
    start = time.monotonic()
    # 198.18.1.99 is no pod: the node's blackhole route for the pod CIDR drops it silently.
    assert lab.probe("client", "tcp", "198.18.1.99", 8080, timeout=0.3) == ["TIMEOUT"]
    assert lab.probe("pod1", "udp", "198.18.1.99", 5353, timeout=0.3) == ["TIMEOUT"]
    # A VIP nobody programmed: routed towards the client, which does not forward.
    assert lab.probe("node", "tcp", "198.18.200.10", 80, timeout=0.3) == ["TIMEOUT"]
    assert 0.8 <= time.monotonic() - start < 3.0


def test_vips_reach_pods_through_node_nat(lab: Any) -> None:
    """The contract pyproxy relies on: DNAT in PREROUTING and OUTPUT carries VIP traffic."""
    vip = ["-d", "198.18.200.10", "-p", "tcp", "--dport", "80"]
    # Deterministic round robin over the three pods (kube-proxy uses random mode).
    dnat = [
        ["-p", "tcp", "-m", "statistic", "--mode", "nth", "--every", "3", "--packet", "0",
         "-j", "DNAT", "--to-destination", "198.18.1.1:8080"],
        ["-p", "tcp", "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0",
         "-j", "DNAT", "--to-destination", "198.18.1.2:8080"],
        ["-p", "tcp", "-j", "DNAT", "--to-destination", "198.18.1.3:8080"],
    ]  # fmt: skip
    lab.run("node", "iptables", "-w", "-t", "nat", "-N", "NETLAB-TEST")
    for rule in dnat:
        _iptables(lab, "-t", "nat", "-A", "NETLAB-TEST", *rule)
    jumps = [["PREROUTING", *vip, "-j", "NETLAB-TEST"], ["OUTPUT", *vip, "-j", "NETLAB-TEST"]]
    hairpin = ["POSTROUTING", "-s", "198.18.1.1", "-d", "198.18.1.1", "-j", "MASQUERADE"]
    for rule in [*jumps, hairpin]:
        _iptables(lab, "-t", "nat", "-A", *rule)
    try:
        replies = lab.probe("client", "tcp", "198.18.200.10", 80, count=30)
        assert netlab.spread(replies) == {"pod1": 10, "pod2": 10, "pod3": 10}
        assert {r.split()[1] for r in replies} == {"198.18.100.2"}
        # From the node itself (OUTPUT): needs the node's route covering the VIPs.
        node = lab.probe("node", "tcp", "198.18.200.10", 80, count=3)
        assert sorted(node) == ["pod1 198.18.100.1", "pod2 198.18.100.1", "pod3 198.18.100.1"]
        # From a pod, including hairpin back to itself (masqueraded to the gateway).
        pod = lab.probe("pod1", "tcp", "198.18.200.10", 80, count=3)
        assert sorted(pod) == ["pod1 198.18.0.1", "pod2 198.18.1.1", "pod3 198.18.1.1"]
    finally:
        for rule in [*jumps, hairpin]:
            _iptables(lab, "-t", "nat", "-D", *rule)
        _iptables(lab, "-t", "nat", "-F", "NETLAB-TEST")
        _iptables(lab, "-t", "nat", "-X", "NETLAB-TEST")


def test_stop_and_restart_echo(lab: Any) -> None:
    lab.stop_echo("pod2")
    assert lab.probe("pod1", "tcp", "198.18.1.2", 8080) == ["REFUSED"]
    lab.start_echo("pod2", tcp_ports=[8080], udp_ports=[])
    assert lab.probe("pod1", "tcp", "198.18.1.2", 8080) == ["pod2 198.18.1.1"]
    lab.start_echo("pod2")


def test_spread_counts_first_words() -> None:
    replies = ["pod1 198.18.1.1", "pod2 198.18.1.1", "pod1 198.18.0.1", "TIMEOUT", "REFUSED"]
    assert netlab.spread(replies) == {"REFUSED": 1, "TIMEOUT": 1, "pod1": 2, "pod2": 1}


def test_labs_coexist_and_destroy_leaves_nothing() -> None:
    veths_before = _root_veths()
    first = netlab.Lab(pods=1).create()
    second = netlab.Lab(pods=2).create()
    try:
        assert first.prefix != second.prefix
        for lab in (first, second):
            lab.start_echo_all()
            assert lab.probe("client", "tcp", "198.18.1.1", 8080) == ["pod1 198.18.100.2"]
            assert lab.probe("client", "udp", "198.18.1.1", 5353) == ["pod1 198.18.100.2"]
        procs = first.processes + second.processes
        assert len(procs) == 5  # an agent in each client, an echo server in each of 3 pods
    finally:
        first.destroy()
        second.destroy()
    first.destroy()  # idempotent and quiet
    names = netlab.list_netns()
    assert not [n for n in names if n.startswith((f"{first.prefix}-", f"{second.prefix}-"))]
    assert all(proc.poll() is not None for proc in procs)
    assert _root_veths() <= veths_before
    assert not [v for v in _root_veths() if v.startswith("vpod")]
