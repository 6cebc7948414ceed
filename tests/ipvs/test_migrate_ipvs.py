"""`pyproxy cleanup --kube-proxy` on a node that ran kube-proxy in IPVS mode (User-mode Linux).

The node namespace holds pyproxy's own IPVS state (`pyproxy run --mode ipvs
--once`: pyproxy-ipvs0, PYPROXY-* ipsets, its virtual servers), kube-proxy's
(kube-ipvs0 with its Service addresses, KUBE-* ipsets, virtual servers on
those addresses and on a NodePort of the node's address, and the iptables
rules of its IPVS mode that match on the sets) and someone else's (a virtual
server on an address nobody binds, one on the node's address outside the
NodePort range, an ipset, iptables rules). Two of kube-proxy's entries are
also pyproxy's, as during a real migration: a Service address bound on both
dummy interfaces, and a NodePort both programmed. After the cleanup exactly
kube-proxy's part is gone; legacy iptables only (nf_tables does not work in
this kernel).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel import cluster
from tests.kernel import kube_proxy as kp
from tests.kernel.scenarios import CLIENT_IP, NODE_IP, NOT_SERVED, PODS, Cluster, pods_of

SHARED_VIP = cluster.CLUSTER_IPS["web"]  # bound on kube-ipvs0 and pyproxy-ipvs0
SHARED_NODE_PORT = cluster.NODE_PORTS["web"]  # programmed by both
KUBE_VIPS = [kp.KUBE_WEB_IP, kp.KUBE_LB_CLUSTER_IP, kp.KUBE_LB_IP]
FOREIGN_VS = ["tcp/198.18.250.1:80", f"tcp/{NODE_IP}:8443"]


@pytest.fixture(scope="module")
def k(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(lab, "legacy", tmp_path_factory.mktemp("migrate-ipvs"), mode="ipvs")
    c.sync()
    yield c
    c.pyproxy("cleanup", "--kube-proxy", check=False)
    c.pyproxy("cleanup", check=False)
    lab.run("node", "ipvsadm", "-C", check=False)
    lab.run("node", "ipset", "destroy", "FOREIGN-SET", check=False)


def ipvs_table(k: Cluster) -> dict[str, list[str]]:
    """``ipvsadm -Sn``: "tcp/ip:port" -> its lines (service and real servers)."""
    table: dict[str, list[str]] = {}
    for line in k.lab.run("node", "ipvsadm", "-Sn").stdout.splitlines():
        words = line.split()
        proto = {"-t": "tcp", "-u": "udp", "--sctp-service": "sctp"}[words[1]]
        table.setdefault(f"{proto}/{words[2]}", []).append(line)
    return table


def ipset_lines(k: Cluster) -> list[str]:
    return sorted(k.lab.run("node", "ipset", "save").stdout.splitlines())


def addresses(k: Cluster, dev: str) -> set[str]:
    out = k.lab.run("node", "ip", "-o", "-4", "addr", "show", "dev", dev, check=False)
    return {line.split()[3].split("/")[0] for line in out.stdout.splitlines()}


def kube_proxy_state(k: Cluster) -> None:
    """What kube-proxy's IPVS mode holds for its Services (on top of pyproxy's state)."""
    run = k.lab.run
    run("node", "ip", "link", "add", "kube-ipvs0", "type", "dummy")
    for vip in [*KUBE_VIPS, SHARED_VIP]:
        run("node", "ip", "addr", "add", f"{vip}/32", "dev", "kube-ipvs0")
    run("node", "ipset", "restore", input=kp.IPVS_SETS)
    rules = [
        f"-A -t {kp.KUBE_WEB_IP}:80 -s rr",
        f"-a -t {kp.KUBE_WEB_IP}:80 -r 198.18.1.1:8080 -m -w 1",
        f"-a -t {kp.KUBE_WEB_IP}:80 -r 198.18.1.2:8080 -m -w 1",
        f"-A -t {kp.KUBE_LB_CLUSTER_IP}:80 -s rr",
        f"-a -t {kp.KUBE_LB_CLUSTER_IP}:80 -r 198.18.1.1:8080 -m -w 1",
        f"-A -t {kp.KUBE_LB_IP}:80 -s rr",
        f"-a -t {kp.KUBE_LB_IP}:80 -r 198.18.1.1:8080 -m -w 1",
        f"-A -t {NODE_IP}:{kp.KUBE_NODE_PORT} -s rr",
        f"-a -t {NODE_IP}:{kp.KUBE_NODE_PORT} -r 198.18.1.1:8080 -m -w 1",
        f"-a -t {NODE_IP}:{kp.KUBE_NODE_PORT} -r 198.18.1.2:8080 -m -w 1",
        f"-A -u {NODE_IP}:{kp.KUBE_LB_NODE_PORT} -s rr",
    ]
    run("node", "ipvsadm", "-R", input="\n".join(rules) + "\n")
    run("node", "iptables-legacy-restore", "--noflush", input=kp.IPVS_MODE)


def foreign_state(k: Cluster) -> None:
    run = k.lab.run
    run("node", "ipvsadm", "-A", "-t", "198.18.250.1:80", "-s", "wlc")
    run("node", "ipvsadm", "-A", "-t", f"{NODE_IP}:8443", "-s", "rr")
    run("node", "ipvsadm", "-a", "-t", f"{NODE_IP}:8443", "-r", "198.18.1.3:8080", "-m")
    run("node", "ipset", "create", "FOREIGN-SET", "hash:ip")
    run("node", "ipset", "add", "FOREIGN-SET", "198.18.250.7")
    run("node", "iptables-legacy-restore", "--noflush", input=kp.FOREIGN)


def test_cleanup_kube_proxy_ipvs_removes_only_kube_proxys_state(k: Cluster) -> None:
    ours_before = addresses(k, "pyproxy-ipvs0")
    assert SHARED_VIP in ours_before
    kube_proxy_state(k)
    foreign_state(k)
    assert pods_of(k.probe("client", kp.KUBE_WEB_IP, 80, count=6)) == {"pod1", "pod2"}
    table, sets, saved = ipvs_table(k), ipset_lines(k), k.save()
    kube_vs = {f"tcp/{vip}:80" for vip in KUBE_VIPS} | {
        f"tcp/{NODE_IP}:{kp.KUBE_NODE_PORT}", f"udp/{NODE_IP}:{kp.KUBE_LB_NODE_PORT}"}
    assert kube_vs <= set(table) and set(FOREIGN_VS) <= set(table)
    assert f"tcp/{SHARED_VIP}:80" in table and f"tcp/{NODE_IP}:{SHARED_NODE_PORT}" in table

    result = k.pyproxy("cleanup", "--kube-proxy")
    out = result.stdout
    for vs in sorted(kube_vs):
        assert f"ipvs: removed virtual server {vs}" in out, out
    assert "link: deleted kube-ipvs0" in out
    assert "ipset: destroyed KUBE-CLUSTER-IP" in out

    # IPVS: exactly kube-proxy's virtual servers are gone; pyproxy's (including the
    # shared address and node port) and the foreign ones are untouched, real servers too.
    after = ipvs_table(k)
    assert after == {key: lines for key, lines in table.items() if key not in kube_vs}
    # ipsets: the KUBE-* ones are gone, the others are as they were, members and all.
    assert ipset_lines(k) == [line for line in sets if " KUBE-" not in line]
    # kube-ipvs0 and its addresses are gone; pyproxy's dummy keeps all of its own.
    assert k.lab.run("node", "ip", "link", "show", "kube-ipvs0", check=False).returncode != 0
    assert addresses(k, "pyproxy-ipvs0") == ours_before
    # iptables: kube-proxy's IPVS-mode chains and jumps are gone, the rest is unchanged.
    assert kp.normalized(k.save()) == kp.without_kube_proxy(saved)

    # pyproxy's Services carry traffic; kube-proxy's do not any more.
    assert pods_of(k.probe("client", SHARED_VIP, 80, count=9)) == PODS
    assert pods_of(k.probe("client", NODE_IP, SHARED_NODE_PORT, count=9)) == PODS
    assert set(k.probe("client", kp.KUBE_WEB_IP, 80, count=2, timeout=0.5)) <= NOT_SERVED
    # Nothing of pyproxy's needed repair.
    assert "lines_written=0" in k.sync().stderr


def test_trace_reads_the_ipvs_table(k: Cluster) -> None:
    """`pyproxy trace` in IPVS mode, against the kernel: virtual server, real servers and
    the masquerade decision of the iptables rules (from the ipsets' members)."""
    out = k.pyproxy("trace", "--json", "--iptables-backend", "legacy", "--src", CLIENT_IP,
                    "--dst", f"{NODE_IP}:{SHARED_NODE_PORT}").stdout
    doc = json.loads(out)
    assert doc["rules"] == "kernel (iptables-legacy, IPVS)"
    assert f"ipvs/tcp/{NODE_IP}:{SHARED_NODE_PORT}" in doc["chains"]
    assert sorted(e["endpoint"] for e in doc["endpoints"]) == [
        f"{ip}:8080" for ip in sorted(cluster.POD_IPS.values())]
    assert doc["masquerade"] is True
    replies = k.probe("client", NODE_IP, SHARED_NODE_PORT, count=9)
    assert pods_of(replies) == PODS
    local = json.loads(k.pyproxy("trace", "--json", "--iptables-backend", "legacy",
                                 "--src", CLIENT_IP,
                                 "--dst", f"{NODE_IP}:{cluster.NODE_PORTS['local']}").stdout)
    assert [(e["endpoint"], e["masquerade"]) for e in local["endpoints"]] == [
        ("198.18.1.1:8080", False)]
