"""The IPVS test harness itself: kernel, pyroute2 and netlab working together in UML.

Before any pyproxy IPVS test can mean anything, the ground it stands on must
hold: the User-mode Linux kernel has IPVS, pyroute2 can program it inside the
lab's node namespace, and a virtual service programmed by hand carries real TCP
connections to all three pods, from outside the node (client) and from the
node itself. This is the hand-written equivalent of what kube-proxy's IPVS mode
sets up for one ClusterIP: a dummy interface holding the VIP, a round-robin
virtual server, masquerading real servers, ip_forward and vs.conntrack.
"""

from __future__ import annotations

from pathlib import Path
from socket import IPPROTO_TCP
from typing import Any

from tests.kernel.lab import netlab

VIP = "198.18.200.10"
PORT = 80
TARGET_PORT = 8080
MASQUERADE = 0  # IPVSDest fwd_method; pyroute2 defaults to 3 (direct routing)


def _sysctl(lab: Any, ns: str, values: dict[str, str]) -> None:
    script = "; ".join(f"echo {v} > /proc/sys/{k.replace('.', '/')}" for k, v in values.items())
    lab.run(ns, "sh", "-ec", script)


def test_kernel_has_ipvs_and_its_schedulers() -> None:
    assert Path("/proc/net/ip_vs").exists()
    from pyroute2 import IPVS

    with IPVS() as ipvs:  # the root namespace of the UML kernel: empty, but answering
        assert list(ipvs.service("dump")) == []
    loaded = Path("/proc/modules").read_text()
    for scheduler in ("ip_vs_rr", "ip_vs_wrr", "ip_vs_sh"):
        assert f"{scheduler} " in loaded


def test_virtual_service_reaches_every_pod(lab: Any, node_ipvs: Any) -> None:
    from pyroute2 import IPVSDest, IPVSService

    # The VIP lives on a dummy interface, as on kube-proxy's kube-ipvs0, so the
    # node accepts packets for it locally, where IPVS intercepts them.
    lab.run("node", "ip", "link", "add", "kube-ipvs0", "type", "dummy")
    lab.run("node", "ip", "addr", "add", f"{VIP}/32", "dev", "kube-ipvs0")
    _sysctl(lab, "node", {"net.ipv4.ip_forward": "1", "net.ipv4.vs.conntrack": "1"})
    try:
        service = IPVSService(addr=VIP, port=PORT, protocol=IPPROTO_TCP, sched_name="rr")
        node_ipvs.service("add", service=service)
        for pod in lab.pods:
            dest = IPVSDest(addr=pod.ip, port=TARGET_PORT, fwd_method=MASQUERADE, weight=1)
            node_ipvs.dest("add", service=service, dest=dest)

        # ipvsadm, reading the table independently of pyroute2, sees what was meant.
        listed = lab.run("node", "ipvsadm", "-Ln", "-t", f"{VIP}:{PORT}").stdout.splitlines()
        assert [line.split()[:3] for line in listed if line.startswith("TCP")] == [
            ["TCP", f"{VIP}:{PORT}", "rr"]
        ]
        rows = [line.split() for line in listed if line.strip().startswith("->")]
        real_servers = sorted(row[1:4] for row in rows if row[1] != "RemoteAddress:Port")
        assert real_servers == [[f"{p.ip}:{TARGET_PORT}", "Masq", "1"] for p in lab.pods]

        # From outside the node: forwarded through IPVS, DNAT only, so pods see the client.
        replies = lab.probe("client", "tcp", VIP, PORT, count=30)
        assert netlab.spread(replies) == {"pod1": 10, "pod2": 10, "pod3": 10}
        assert {reply.split()[1] for reply in replies} == {lab.client_ip}

        # From the node itself (IPVS on LOCAL_OUT): every pod answers here too.
        replies = lab.probe("node", "tcp", VIP, PORT, count=6)
        assert netlab.spread(replies) == {"pod1": 2, "pod2": 2, "pod3": 2}
    finally:
        lab.run("node", "ip", "link", "del", "kube-ipvs0", check=False)
