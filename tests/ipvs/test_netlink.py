"""pyproxy's IPVS applier against the real IPVS kernel (User-mode Linux; see conftest.py).

Each test works in a network namespace of its own, so IPVS, ipsets and links
start empty. What the kernel holds is checked with the kernel's own tools
(``ipvsadm -Sn``, ``ipset save``, ``ip addr``), never with the reader under
test. The plan is the kernel tests' mini-cluster (tests/kernel/cluster.py)
through the change tracker and the IPVS planner, as pyproxy itself builds it.
"""

from __future__ import annotations

import copy
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from pyproxy.ipvs.diff import (
    AddDest,
    AddService,
    IPVSOperation,
    KernelRealServer,
    Scope,
    SetDest,
    diff,
    pending,
)
from pyproxy.ipvs.genl import Counters
from pyproxy.ipvs.netlink import IPVSApplyError, IPVSKernel
from pyproxy.ipvs.plan import (
    DUMMY_INTERFACE,
    IPSet,
    IPVSContext,
    IPVSPlan,
    RealServer,
    SetEntry,
    VirtualServer,
    VirtualServerKey,
    plan,
)
from pyproxy.model import NodeInfo, Protocol
from pyproxy.tracker import ChangeTracker
from tests.kernel import cluster

NODE_IP = "198.18.100.1"
CTX = IPVSContext(
    node=NodeInfo(cluster.NODE, (ip_address(NODE_IP),)),
    cluster_cidrs=(ip_network("198.18.1.0/24"),),
    node_port_addresses=(ip_address(NODE_IP),),
)
FOREIGN_VIP = "198.18.250.1"
WEB = VirtualServerKey(Protocol.TCP, cluster.CLUSTER_IPS["web"], 80)


# --------------------------------------------------------------------------- helpers


def plan_of(objs: Iterable[dict[str, Any]] | None = None, ctx: IPVSContext = CTX) -> IPVSPlan:
    objs = list(cluster.objects() if objs is None else objs)
    tracker = ChangeTracker(node_name=cluster.NODE)
    tracker.replace([o for o in objs if o["kind"] == "Service"],
                    [o for o in objs if o["kind"] == "EndpointSlice"])
    snap = tracker.checkout()
    return plan(snap.services, snap.endpoints, ctx)


def run(ns: str, *argv: str, input: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          input=input, timeout=600, check=False)
    if done.returncode:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def ipvs_table(ns: str) -> dict[str, tuple[str, int, dict[str, tuple[int, str]]]]:
    """``ipvsadm -Sn``: "tcp/198.18.200.10:80" -> (scheduler, persistence, {rs: (weight, fwd)})."""
    table: dict[str, tuple[str, int, dict[str, tuple[int, str]]]] = {}
    for line in run(ns, "ipvsadm", "-Sn").splitlines():
        words = line.split()
        if not words:
            continue
        proto = {"-t": "tcp", "-u": "udp", "--sctp-service": "sctp"}[words[1]]
        key = f"{proto}/{words[2]}"
        if words[0] == "-A":
            sched = words[words.index("-s") + 1]
            persist = int(words[words.index("-p") + 1]) if "-p" in words else 0
            table[key] = (sched, persist, {})
        elif words[0] == "-a":
            fwd = next(w for w in words if w in ("-m", "-g", "-i"))
            table[key][2][words[words.index("-r") + 1]] = (int(words[words.index("-w") + 1]), fwd)
    return table


def expected_table(p: IPVSPlan) -> dict[str, tuple[str, int, dict[str, tuple[int, str]]]]:
    return {str(k): (vs.scheduler, vs.persistence_timeout,
                     {f"{rs.address}:{rs.port}": (rs.weight, "-m") for rs in vs.real_servers})
            for k, vs in p.virtual_servers.items()}


def ipset_members(ns: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in run(ns, "ipset", "save").splitlines():
        words = line.split()
        if words[:1] == ["create"]:
            out[words[1]] = set()
        elif words[:1] == ["add"]:
            out[words[1]].add(words[2])
    return out


def dummy_addresses(ns: str, dev: str = DUMMY_INTERFACE) -> set[str]:
    out = run(ns, "ip", "-o", "addr", "show", "dev", dev)
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def links(ns: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0]
            for line in run(ns, "ip", "-o", "link").splitlines()}


def assert_kernel_holds(ns: str, p: IPVSPlan) -> None:
    table = ipvs_table(ns)
    ours = {k: v for k, v in table.items() if FOREIGN_VIP not in k and ":22" not in k}
    assert ours == expected_table(p)
    sets = ipset_members(ns)
    assert {n: m for n, m in sets.items() if n.startswith("PYPROXY-")} == {
        str(name): {str(e) for e in members} for name, members in p.ipsets.items()}
    assert dummy_addresses(ns) == p.addresses


def sync(kernel: IPVSKernel, p: IPVSPlan, scope: Scope | None = None) -> int:
    """One sync as the reconciler does it; the number of operations it carried out."""
    ops = diff(p, kernel.read(scope))
    kernel.apply(ops)
    return len(ops)


def add_foreign(ns: str) -> None:
    """What pyproxy must leave alone: someone else's service, ipset and dummy interface."""
    run(ns, "ip", "link", "add", "foreign0", "type", "dummy")
    run(ns, "ip", "addr", "add", f"{FOREIGN_VIP}/32", "dev", "foreign0")
    run(ns, "ipvsadm", "-A", "-t", f"{FOREIGN_VIP}:80", "-s", "wlc")
    run(ns, "ipvsadm", "-a", "-t", f"{FOREIGN_VIP}:80", "-r", "198.18.1.1:80", "-m")
    run(ns, "ipvsadm", "-A", "-t", f"{NODE_IP}:22", "-s", "rr")  # node address, not a NodePort
    run(ns, "ipset", "create", "KUBE-FOREIGN", "hash:ip")
    run(ns, "ipset", "add", "KUBE-FOREIGN", FOREIGN_VIP)


def assert_foreign_intact(ns: str) -> None:
    table = ipvs_table(ns)
    assert table[f"tcp/{FOREIGN_VIP}:80"] == ("wlc", 0, {"198.18.1.1:80": (1, "-m")})
    assert f"tcp/{NODE_IP}:22" in table
    assert ipset_members(ns)["KUBE-FOREIGN"] == {FOREIGN_VIP}
    assert "foreign0" in links(ns)
    assert dummy_addresses(ns, "foreign0") == {FOREIGN_VIP}


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with a node address on a "node0" dummy interface."""
    name = f"ppipvs-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        run(name, "ip", "link", "add", "node0", "type", "dummy")
        run(name, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "node0")
        run(name, "ip", "link", "set", "node0", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def kernel(netns: str) -> Iterator[IPVSKernel]:
    with IPVSKernel(node_port_addresses=[NODE_IP], netns=netns) as k:
        yield k


# --------------------------------------------------------------------------- the tests


def test_programs_exactly_the_plan_and_leaves_the_rest(netns: str, kernel: IPVSKernel) -> None:
    add_foreign(netns)
    p = plan_of()
    assert NODE_IP in kernel.local_addresses()
    assert sync(kernel, p) > 0
    assert_kernel_holds(netns, p)
    assert_foreign_intact(netns)
    # what pyproxy reads back is exactly its own part
    state = kernel.read()
    assert set(state.virtual_servers) == set(p.virtual_servers)
    assert state.addresses == p.addresses
    assert set(state.ipsets) == {str(s) for s in p.ipsets}
    assert state.virtual_servers[WEB].real_servers == tuple(
        KernelRealServer(cluster.POD_IPS[pod], 8080, 1) for pod in ("pod1", "pod2", "pod3"))
    # and a second sync has nothing to do
    assert diff(p, state) == []
    before = kernel.counters
    assert sync(kernel, p) == 0
    assert kernel.counters.messages - before.messages > 0  # it read, but wrote nothing


def test_drift_is_repaired_on_the_next_sync(netns: str, kernel: IPVSKernel) -> None:
    add_foreign(netns)
    p = plan_of()
    sync(kernel, p)
    run(netns, "ipvsadm", "-D", "-t", f"{WEB.address}:80")  # a virtual server deleted by hand
    run(netns, "ipvsadm", "-d", "-t", f"{cluster.CLUSTER_IPS['ext']}:80",
        "-r", f"{cluster.POD_IPS['pod2']}:8080")  # a real server
    run(netns, "ipvsadm", "-E", "-t", f"{cluster.CLUSTER_IPS['sticky']}:80", "-s", "wlc")
    run(netns, "ipvsadm", "-e", "-t", f"{cluster.CLUSTER_IPS['lb']}:80",
        "-r", f"{cluster.POD_IPS['pod1']}:8080", "-m", "-w", "7")
    run(netns, "ip", "addr", "del", f"{cluster.CLUSTER_IPS['dns']}/32", "dev", DUMMY_INTERFACE)
    run(netns, "ipset", "del", "PYPROXY-CLUSTER-IP", f"{WEB.address},tcp:80")
    run(netns, "ipset", "add", "PYPROXY-CLUSTER-IP", "198.18.200.77,tcp:80")
    run(netns, "ipset", "destroy", "PYPROXY-LB-SOURCE-CIDR")
    assert sync(kernel, p) > 0
    assert_kernel_holds(netns, p)
    assert_foreign_intact(netns)
    assert sync(kernel, p) == 0


def test_a_deleted_dummy_interface_comes_back(netns: str, kernel: IPVSKernel) -> None:
    p = plan_of()
    sync(kernel, p)
    run(netns, "ip", "link", "del", DUMMY_INTERFACE)  # its addresses go with it
    # the virtual servers on those addresses are not provably pyproxy's any more; the sync
    # rebinds the addresses and adopts the virtual servers it wants
    sync(kernel, p)
    sync(kernel, p)
    assert_kernel_holds(netns, p)


def test_changes_and_removals(netns: str, kernel: IPVSKernel) -> None:
    p = plan_of()
    sync(kernel, p)
    objs = [o for o in cluster.objects() if o["metadata"]["name"] not in ("ext", "ext-a")]
    objs = [copy.deepcopy(o) for o in objs]
    for obj in objs:
        if obj["kind"] == "EndpointSlice" and obj["metadata"]["name"] == "web-a":
            obj["endpoints"] = [cluster.endpoint("pod1"), cluster.endpoint("pod2")]
    changed = plan_of(objs, ctx=replace(CTX, scheduler="wrr"))
    sync(kernel, changed)  # no connections anywhere: everything goes at once
    assert_kernel_holds(netns, changed)
    assert sync(kernel, changed) == 0
    assert pending(changed, kernel.read()) == frozenset()
    sync(kernel, p)
    assert_kernel_holds(netns, p)


def test_partial_sync_reads_and_writes_only_the_change(netns: str, kernel: IPVSKernel) -> None:
    p = plan_of()
    sync(kernel, p)
    objs = copy.deepcopy(cluster.objects())
    for obj in objs:
        if obj["kind"] == "EndpointSlice" and obj["metadata"]["name"] == "web-a":
            obj["endpoints"] = [cluster.endpoint("pod1"), cluster.endpoint("pod2")]
    changed = plan_of(objs)
    scope = Scope.between(p, changed)
    before = kernel.counters
    sync(kernel, changed, scope)
    cost = kernel.counters - before
    assert cost.messages <= 8 and cost.sends <= 8, cost
    assert_kernel_holds(netns, changed)


def test_timeouts_are_set_only_when_they_differ(kernel: IPVSKernel, netns: str) -> None:
    now = kernel.timeouts()
    assert now.tcp > 0 and now.tcpfin > 0 and now.udp > 0
    assert kernel.set_timeouts(now.tcp, now.tcpfin, now.udp) is False
    assert kernel.set_timeouts(tcp=901, udp=301) is True
    after = kernel.timeouts()
    assert (after.tcp, after.tcpfin, after.udp) == (901, now.tcpfin, 301)
    assert "901 " in run(netns, "ipvsadm", "-L", "--timeout")
    assert kernel.set_timeouts(tcp=901) is False


def test_cleanup_removes_only_what_is_pyproxys(netns: str, kernel: IPVSKernel) -> None:
    add_foreign(netns)
    sync(kernel, plan_of())
    kernel.cleanup()
    assert set(ipvs_table(netns)) == {f"tcp/{FOREIGN_VIP}:80", f"tcp/{NODE_IP}:22"}
    assert set(ipset_members(netns)) == {"KUBE-FOREIGN"}
    assert DUMMY_INTERFACE not in links(netns)
    assert_foreign_intact(netns)
    kernel.cleanup()  # nothing left: a no-op


def test_ipv6(netns: str, kernel: IPVSKernel) -> None:
    key = VirtualServerKey(Protocol.TCP, "fd00::10", 80)
    p = IPVSPlan(
        virtual_servers={key: VirtualServer(key, "rr", 300, (RealServer("fd00:1::1", 8080),
                                                              RealServer("fd00:1::2", 8080)))},
        addresses={"fd00::10"},
    )
    p.ipsets[IPSet.CLUSTER_IP] = {SetEntry("fd00::10", "tcp", 80)}
    p.ipsets[IPSet.LOOP_BACK] = {SetEntry("fd00:1::1", "tcp", 8080, "fd00:1::1")}
    p.ipsets[IPSet.NODE_PORT_TCP] = {SetEntry(port=30080)}
    run(netns, "ip", "-6", "addr", "add", "fd00:1::ff/64", "dev", "node0")
    sync(kernel, p)
    assert ipvs_table(netns) == {"tcp/[fd00::10]:80": (
        "rr", 300, {"[fd00:1::1]:8080": (1, "-m"), "[fd00:1::2]:8080": (1, "-m")})}
    sets = ipset_members(netns)
    assert sets["PYPROXY-CLUSTER-IP"] == {"fd00::10,tcp:80"}
    assert sets["PYPROXY-LOOP-BACK"] == {"fd00:1::1,tcp:8080,fd00:1::1"}
    assert "family inet6" in run(netns, "ipset", "list", "PYPROXY-CLUSTER-IP")
    assert dummy_addresses(netns) == {"fd00::10"}
    assert diff(p, kernel.read()) == []


def test_a_failed_operation_is_reported_and_the_rest_carried_out(
        netns: str, kernel: IPVSKernel) -> None:
    good = VirtualServerKey(Protocol.TCP, "198.18.200.1", 80)
    bad = VirtualServerKey(Protocol.TCP, "198.18.200.2", 80)
    ops = [AddService(bad, "no-such-scheduler", 0), AddService(good, "rr", 0),
           AddDest(good, "198.18.1.1", 8080, 1), AddDest(bad, "198.18.1.1", 8080, 1)]
    with pytest.raises(IPVSApplyError) as failed:
        kernel.apply(ops)
    assert [op for op, _ in failed.value.failures] == [ops[0], ops[3]]
    assert set(ipvs_table(netns)) == {str(good)}


def test_connections_are_read_and_drained_gracefully(lab: Any) -> None:
    """A removed real server with an open connection is drained, not deleted, as upstream."""
    ns = lab.ns_name("node")
    p = plan_of()
    with IPVSKernel(node_port_addresses=[lab.node_ip], netns=ns) as kernel:
        try:
            lab.run("node", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/vs/conntrack")
            sync(kernel, p)
            # one connection to each pod through the ClusterIP, kept open by the node
            conns = [_connect(ns, WEB.address, 80) for _ in range(3)]
            try:
                state = kernel.read()
                counts = {rs.address: rs.connections
                          for rs in state.virtual_servers[WEB].real_servers}
                assert counts == {cluster.POD_IPS[p]: 1 for p in ("pod1", "pod2", "pod3")}
                objs = copy.deepcopy(cluster.objects())
                for obj in objs:
                    if obj["kind"] == "EndpointSlice" and obj["metadata"]["name"] == "web-a":
                        obj["endpoints"] = [cluster.endpoint("pod1"), cluster.endpoint("pod2")]
                without3 = plan_of(objs)
                ops = diff(without3, kernel.read())
                pod3 = cluster.POD_IPS["pod3"]
                assert SetDest(WEB, pod3, 8080, 0) in ops
                kernel.apply(ops)
                assert ipvs_table(ns)[str(WEB)][2][f"{pod3}:8080"] == (0, "-m")
                assert pending(without3, kernel.read()) == {WEB}
                # new connections avoid the drained real server
                replies = lab.probe("client", "tcp", WEB.address, 80, count=6)
                assert {r.split()[0] for r in replies} == {"pod1", "pod2"}
                assert diff(without3, kernel.read()) == []
                # the endpoint comes back: its weight too (the NodePort's went at once)
                ops = diff(p, kernel.read())
                assert SetDest(WEB, pod3, 8080, 1) in ops
                assert [op for op in ops if isinstance(op, AddDest)] == [
                    AddDest(VirtualServerKey(Protocol.TCP, lab.node_ip, 30080), pod3, 8080, 1)]
            finally:
                for conn in conns:
                    conn.close()
        finally:
            kernel.cleanup()


def _connect(ns: str, address: str, port: int) -> socket.socket:
    from pyroute2 import netns as pr_netns

    sock: socket.socket = pr_netns.create_socket(ns, family=socket.AF_INET,
                                                 socket_type=socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect((address, port))
    sock.recv(100)  # the echo's answer: the connection went through
    return sock


# --------------------------------------------------------------------------- scale


def synthetic(services: int, endpoints: int) -> list[dict[str, Any]]:
    """``services`` ClusterIP services with ``endpoints`` ready endpoints each, as API dicts."""
    objs: list[dict[str, Any]] = []
    for i in range(services):
        name = f"s{i}"
        vip = f"198.19.{i // 250}.{i % 250 + 1}"
        objs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "scale"},
            "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                "protocol": "TCP"}]},
        })
        eps = []
        for j in range(endpoints):
            n = i * endpoints + j
            eps.append({"addresses": [f"198.18.{128 + n // 250}.{n % 250 + 1}"],
                        "conditions": {"ready": True}, "nodeName": "node-b"})
        objs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-a", "namespace": "scale",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        })
    return objs


def ipvsadm_restore_input(p: IPVSPlan) -> str:
    lines = []
    for key, vs in sorted(p.virtual_servers.items()):
        flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[key.protocol]
        persist = f" -p {vs.persistence_timeout}" if vs.persistence_timeout else ""
        lines.append(f"-A {flag} {key.address}:{key.port} -s {vs.scheduler}{persist}")
        lines += [f"-a {flag} {key.address}:{key.port} -r {rs.address}:{rs.port} -m -w {rs.weight}"
                  for rs in vs.real_servers]
    return "\n".join(lines) + "\n"


def fresh_netns() -> str:
    name = f"ppscale-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    # IPVS refuses masquerading real servers ("address not unicast") until the
    # namespace has a local routing table, which its first address creates.
    run(name, "ip", "link", "set", "lo", "up")
    return name


def test_scale_message_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """1,000 services x 3 endpoints: full programming, one endpoint change, idle resync.

    Prints netlink message counts and, for scale, the bare ``ipvsadm --restore``
    of the same virtual and real servers in the same boot. No timed assertions.
    """
    services = int(os.environ.get("PYPROXY_IPVS_SCALE", "1000"))
    p = plan_of(synthetic(services, 3))
    restore = ipvsadm_restore_input(p)
    names = [fresh_netns(), fresh_netns()]
    report: list[str] = []
    try:
        t0 = time.perf_counter()
        run(names[0], "ipvsadm", "--restore", input=restore)
        bare = time.perf_counter() - t0
        assert len(ipvs_table(names[0])) == services

        with IPVSKernel(netns=names[1]) as kernel:
            kernel.open()  # sockets first: in a namespace each one costs a fork
            kernel.ensure_dummy()
            t0 = time.perf_counter()
            state = kernel.read()
            ops = diff(p, state)
            # virtual and real servers first (what ipvsadm --restore does), then the rest
            ipvs_ops = [op for op in ops if isinstance(op, IPVSOperation)]
            other_ops = [op for op in ops if not isinstance(op, IPVSOperation)]
            t1 = time.perf_counter()
            kernel.apply(ipvs_ops)
            t2 = time.perf_counter()
            full_ipvs = kernel.counters
            kernel.apply(other_ops)
            t3 = time.perf_counter()
            full = kernel.counters
            assert_kernel_holds(names[1], p)

            objs = synthetic(services, 3)
            objs[1]["endpoints"][0]["addresses"] = ["198.18.255.250"]  # one endpoint replaced
            changed = plan_of(objs)
            scope = Scope.between(p, changed)
            before = kernel.counters
            t4 = time.perf_counter()
            n_ops = sync(kernel, changed, scope)
            t5 = time.perf_counter()
            one = kernel.counters - before

            before = kernel.counters
            t6 = time.perf_counter()
            idle_ops = sync(kernel, changed)
            t7 = time.perf_counter()
            idle = kernel.counters - before
            assert idle_ops == 0
            assert_kernel_holds(names[1], changed)

        def row(what: str, c: Counters, seconds: float, extra: str = "") -> str:
            return (f"  {what:<54} {c.messages:>5} msgs {c.sends:>5} sends {c.recvs:>5} recvs"
                    f" {seconds:>6.2f} s{extra}")

        report += [
            f"IPVS scale, {services} services x 3 endpoints "
            f"({len(p.virtual_servers)} virtual servers, {len(ops)} operations):",
            f"  {'ipvsadm --restore (virtual + real servers only)':<54} {bare:>43.2f} s",
            row("pyproxy: virtual + real servers", full_ipvs, t2 - t1,
                f"  ({(t2 - t1) / bare:.2f}x ipvsadm --restore)"),
            row("pyproxy: first sync (+ read, diff, ipsets, addresses)", full, t3 - t0,
                f"  ({(t3 - t0) / bare:.2f}x)"),
            row(f"pyproxy: one endpoint changed ({n_ops} ops, scoped)", one, t5 - t4),
            row("pyproxy: resync, nothing changed (full read)", idle, t7 - t6),
        ]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert one.messages <= 10

