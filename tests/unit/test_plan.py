"""The iptables planner, tested by what happens to packets (kube-proxy's runPacketFlowTests).

Services and EndpointSlices start as API dicts (the kernel tests' scenarios in
tests/kernel/cluster.py, plus a few of our own), go through the change tracker
and the planner, and then packets are pushed through the planned ruleset with
the tracer. Assertions are about endpoints, masquerading and verdicts, never
about rule text, so a refactor of the rules' wording cannot break these tests
while a change in what a packet meets does.

The node is node-a (198.18.100.1) in zone-a; pods are in 198.18.1.0/24; pod1
and pod2 run on node-a, pod3 on node-b.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from pyproxy.iptables.plan import (
    Plan,
    PlanContext,
    Planner,
    chain_name,
    plan,
    probability,
)
from pyproxy.iptables.ruleset import BUILTIN_CHAINS, MAX_CHAIN_NAME, Ruleset, Table, render
from pyproxy.iptables.trace import Packet, TraceResult, trace
from pyproxy.model import IPFamily, NodeInfo, Protocol, ServicePortName
from pyproxy.tracker import ChangeTracker, Snapshot
from tests.kernel import cluster

NODE_IP = "198.18.100.1"
CLIENT = "198.18.100.2"  # off the cluster, beside the node
POD = "198.18.1.9"  # a pod in the cluster CIDR that backs no Service
ALLOWED_CLIENT = "198.18.150.7"  # inside lbranged's loadBalancerSourceRanges
CLUSTER_CIDR = ip_network("198.18.1.0/24")
NODE = NodeInfo(cluster.NODE, (ip_address(NODE_IP),))

VIP = cluster.CLUSTER_IPS
NODE_PORT = cluster.NODE_PORTS
LB_IP = cluster.LB_IPS
P1, P2, P3 = (f"{cluster.POD_IPS[p]}:8080" for p in ("pod1", "pod2", "pod3"))
ALL = (P1, P2, P3)
DNS = tuple(f"{cluster.POD_IPS[p]}:5353" for p in ("pod1", "pod2", "pod3"))


# ---------------------------------------------------------------------------
# From API objects to a plan, and packets through it


def split(objs: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    objs = list(objs)
    return ([o for o in objs if o["kind"] == "Service"],
            [o for o in objs if o["kind"] == "EndpointSlice"])


def snapshot(objs: Iterable[dict[str, Any]], family: IPFamily = IPFamily.IPv4) -> Snapshot:
    tracker = ChangeTracker(node_name=cluster.NODE, family=family)
    tracker.replace(*split(objs))
    return tracker.checkout()


def context(**kw: Any) -> PlanContext:
    kw.setdefault("node", NODE)
    kw.setdefault("cluster_cidrs", (CLUSTER_CIDR,))
    return PlanContext(**kw)


def plan_of(objs: Iterable[dict[str, Any]] | None = None, ctx: PlanContext | None = None) -> Plan:
    snap = snapshot(cluster.objects() if objs is None else objs,
                    ctx.family if ctx else IPFamily.IPv4)
    return plan(snap.services, snap.endpoints, ctx or context())


def send(ruleset: Ruleset, src: str, dst: str, dport: int, protocol: str = "tcp", *,
         from_local: bool = False, affinity: bool = False,
         local: Sequence[str] = (NODE_IP,)) -> TraceResult:
    return trace(ruleset, Packet(src, dst, dport, protocol), local_addresses=local,
                 from_local=from_local, affinity=affinity)


@dataclass(frozen=True)
class Branch:
    """One statistic/affinity outcome of a trace: what the tracer prints as ``path k/N``."""

    verdict: str
    endpoint: str | None
    masquerade: bool
    notes: tuple[str, ...]


_PATH = re.compile(r"path \d+/\d+(?: p=\S+)?: (?P<verdict>[A-Z]+)"
                   r"(?: -> (?P<endpoint>[^,\s]+))?(?P<masq>, masquerade)?$")


def branches(result: TraceResult) -> list[Branch]:
    if not any(_PATH.match(n) for n in result.notes):  # one path: the result is the branch
        endpoint = result.endpoints[0] if result.endpoints else None
        return [Branch(result.verdict, endpoint, result.masquerade, result.notes)]
    out: list[Branch] = []
    head: re.Match[str] | None = None
    body: list[str] = []
    for note in [*result.notes, "path 0/0: END"]:
        m = _PATH.match(note)
        if m is None:
            if note.startswith("  "):
                body.append(note.strip())
            continue
        if head is not None:
            out.append(Branch(head["verdict"], head["endpoint"], bool(head["masq"]),
                              tuple(body)))
        head, body = m, []
    return out


def stopped_in(result: TraceResult) -> set[str]:
    """The chains whose DROP/REJECT rules ended the packet (over every branch)."""
    return {note.strip().split("#")[0] for note in result.notes
            if re.search(r": (DROP|REJECT)(\s|$)", note)}


def own_service(name: str, cluster_ip: str, *, annotations: dict[str, str] | None = None,
                **spec: Any) -> dict[str, Any]:
    """A Service beyond cluster.py's, built the same way."""
    obj = cluster.service("web", **spec)
    obj["metadata"]["name"] = name
    if annotations:
        obj["metadata"]["annotations"] = annotations
    obj["spec"]["clusterIP"] = cluster_ip
    obj["spec"]["clusterIPs"] = [cluster_ip]
    return obj


def endpoint(pod: str, *, zone: str = "", hints: Sequence[str] | None = None,
             **conditions: bool | None) -> dict[str, Any]:
    ep = cluster.endpoint(pod, **conditions)
    if zone:
        ep["zone"] = zone
    if hints is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in hints]}
    return ep


def variant(name: str, objs: list[dict[str, Any]] | None = None, *,
            endpoints: list[dict[str, Any]] | None = None, **spec: Any) -> list[dict[str, Any]]:
    """cluster.objects() with one Service's spec and/or endpoints changed."""
    objs = copy.deepcopy(cluster.objects() if objs is None else objs)
    for obj in objs:
        if obj["kind"] == "Service" and obj["metadata"]["name"] == name:
            obj["spec"].update(spec)
        if (endpoints is not None and obj["kind"] == "EndpointSlice"
                and obj["metadata"]["labels"]["kubernetes.io/service-name"] == name):
            obj["endpoints"] = endpoints
    return objs


@pytest.fixture(scope="module")
def rules() -> Ruleset:
    return plan_of().ruleset


# ---------------------------------------------------------------------------
# Packet flows over every scenario of cluster.py


@dataclass(frozen=True)
class Flow:
    name: str
    src: str
    dst: str
    dport: int
    endpoints: tuple[str, ...]
    masq: bool = False
    verdict: str = "ACCEPT"
    protocol: str = "tcp"
    from_local: bool = False


FLOWS = [
    # ClusterIP: pods keep their source, everything from off the pod network is masqueraded.
    Flow("pod to cluster IP", POD, VIP["web"], 80, ALL),
    Flow("node to cluster IP", NODE_IP, VIP["web"], 80, ALL, masq=True, from_local=True),
    Flow("off-cluster client to cluster IP", CLIENT, VIP["web"], 80, ALL, masq=True),
    Flow("pod to cluster IP, other port: not proxied", POD, VIP["web"], 81, ()),
    # NodePort, externalTrafficPolicy Cluster: every endpoint, always masqueraded.
    Flow("client to NodePort", CLIENT, NODE_IP, NODE_PORT["web"], ALL, masq=True),
    Flow("pod to NodePort", POD, NODE_IP, NODE_PORT["web"], ALL, masq=True),
    Flow("node to its own NodePort", NODE_IP, NODE_IP, NODE_PORT["web"], ALL, masq=True,
         from_local=True),
    Flow("node to NodePort on localhost", "127.0.0.1", "127.0.0.1", NODE_PORT["web"], ALL,
         masq=True, from_local=True),
    Flow("client to a port that is no NodePort", CLIENT, NODE_IP, 30099, ()),
    Flow("client to NodePort on a non-local address", CLIENT, "198.18.100.3",
         NODE_PORT["web"], ()),
    # No endpoints at all: rejected at once, from pods and from the node.
    Flow("pod to service without endpoints", POD, VIP["empty"], 80, (), verdict="REJECT"),
    Flow("node to service without endpoints", NODE_IP, VIP["empty"], 80, (),
         verdict="REJECT", from_local=True),
    # Endpoint conditions.
    Flow("not-ready endpoint excluded", POD, VIP["notready"], 80, (P1,)),
    Flow("serving terminating endpoint used when none is ready, non-serving never",
         POD, VIP["terminating"], 80, (P1,)),
    # Multi-port: each port to its own target port and endpoints.
    Flow("multi-port service, first port", POD, VIP["multi"], 80, (P1,)),
    Flow("multi-port service, second port", POD, VIP["multi"], 81,
         (f"{cluster.POD_IPS['pod2']}:8081",)),
    # UDP.
    Flow("pod to UDP service", POD, VIP["dns"], 53, DNS, protocol="udp"),
    Flow("client to UDP service", CLIENT, VIP["dns"], 53, DNS, masq=True, protocol="udp"),
    Flow("TCP to a UDP-only service: not proxied", POD, VIP["dns"], 53, ()),
    # externalTrafficPolicy Local, with a local endpoint (pod1) and a remote one (pod3).
    Flow("eTP Local: client reaches only local endpoints, source kept",
         CLIENT, NODE_IP, NODE_PORT["local"], (P1,)),
    Flow("eTP Local: pod to NodePort reaches all endpoints", POD, NODE_IP,
         NODE_PORT["local"], (P1, P3)),
    Flow("eTP Local: node to NodePort is masqueraded, reaches all", NODE_IP, NODE_IP,
         NODE_PORT["local"], (P1, P3), masq=True, from_local=True),
    Flow("eTP Local: cluster IP is not affected", POD, VIP["local"], 80, (P1, P3)),
    Flow("eTP Local: cluster IP from off-cluster still masqueraded", CLIENT, VIP["local"],
         80, (P1, P3), masq=True),
    # externalTrafficPolicy Local without a local endpoint (only pod3, on node-b).
    Flow("eTP Local, no local endpoint: client dropped", CLIENT, NODE_IP,
         NODE_PORT["localnone"], (), verdict="DROP"),
    Flow("eTP Local, no local endpoint: pod to NodePort still works", POD, NODE_IP,
         NODE_PORT["localnone"], (P3,)),
    Flow("eTP Local, no local endpoint: node to NodePort still works", NODE_IP, NODE_IP,
         NODE_PORT["localnone"], (P3,), masq=True, from_local=True),
    Flow("eTP Local, no local endpoint: cluster IP still works", POD, VIP["localnone"], 80,
         (P3,)),
    # externalIPs (eTP Cluster).
    Flow("client to external IP", CLIENT, cluster.EXTERNAL_IP, 80, ALL, masq=True),
    Flow("pod to external IP", POD, cluster.EXTERNAL_IP, 80, ALL, masq=True),
    Flow("external IP, other port: not proxied", CLIENT, cluster.EXTERNAL_IP, 81, ()),
    # LoadBalancer.
    Flow("client to LoadBalancer IP", CLIENT, LB_IP["lb"], 80, ALL, masq=True),
    Flow("pod to LoadBalancer IP", POD, LB_IP["lb"], 80, ALL, masq=True),
    Flow("client to LoadBalancer's NodePort", CLIENT, NODE_IP, NODE_PORT["lb"], ALL,
         masq=True),
    Flow("LoadBalancer cluster IP from pod", POD, VIP["lb"], 80, ALL),
    # loadBalancerSourceRanges.
    Flow("source range: allowed client", ALLOWED_CLIENT, LB_IP["lbranged"], 80, ALL,
         masq=True),
    Flow("source range: other client dropped", CLIENT, LB_IP["lbranged"], 80, (),
         verdict="DROP"),
    Flow("source range: pods are filtered too", POD, LB_IP["lbranged"], 80, (),
         verdict="DROP"),
    Flow("source range: node outside the ranges dropped", NODE_IP, LB_IP["lbranged"], 80, (),
         verdict="DROP", from_local=True),
    Flow("source range: cluster IP not filtered", CLIENT, VIP["lbranged"], 80, ALL, masq=True),
    Flow("source range covering the node: client allowed", CLIENT, LB_IP["lballowed"], 80,
         ALL, masq=True),
    Flow("source range covering the node: node allowed", NODE_IP, LB_IP["lballowed"], 80,
         ALL, masq=True, from_local=True),
]


@pytest.mark.parametrize("flow", FLOWS, ids=[f.name for f in FLOWS])
def test_packet_flow(rules: Ruleset, flow: Flow) -> None:
    result = send(rules, flow.src, flow.dst, flow.dport, flow.protocol,
                  from_local=flow.from_local)
    assert result.verdict == flow.verdict, result.notes
    assert result.endpoints == tuple(sorted(flow.endpoints)), result.notes
    assert result.masquerade is flow.masq, result.notes
    if flow.verdict == "ACCEPT":
        # Every branch agrees: none dropped, and masquerade is all or nothing.
        assert {(b.verdict, b.masquerade) for b in branches(result)} == {
            ("ACCEPT", flow.masq)}, result.notes


def test_each_endpoint_is_reached_evenly(rules: Ruleset) -> None:
    result = send(rules, POD, VIP["web"], 80)
    probabilities = [float(m[1]) for note in result.notes
                     if (m := re.match(r"path \d+/\d+ p=(\S+):", note))]
    assert len(probabilities) == 3
    assert probabilities == pytest.approx([1 / 3] * 3, abs=1e-3)


def test_hairpin_is_masqueraded_only_on_the_branch_back_to_the_sender(rules: Ruleset) -> None:
    pod1 = cluster.POD_IPS["pod1"]
    result = send(rules, pod1, VIP["web"], 80)
    assert result.verdict == "ACCEPT"
    assert {b.endpoint: b.masquerade for b in branches(result)} == {
        P1: True, P2: False, P3: False}


def test_no_endpoints_rejects_in_filter_services(rules: Ruleset) -> None:
    result = send(rules, POD, VIP["empty"], 80)
    assert result.verdict == "REJECT"
    assert stopped_in(result) == {"filter/PYPROXY-SERVICES"}


def test_no_endpoints_rejects_node_port_in_filter_external_services() -> None:
    svc = own_service("emptynp", "198.18.200.40", type="NodePort",
                      ports=[{"name": "http", "port": 80, "nodePort": 30086}])
    rs = plan_of([svc, cluster.endpoint_slice("emptynp", None)]).ruleset
    result = send(rs, CLIENT, NODE_IP, 30086)
    assert result.verdict == "REJECT"
    assert stopped_in(result) == {"filter/PYPROXY-EXTERNAL-SERVICES"}
    assert send(rs, POD, "198.18.200.40", 80).verdict == "REJECT"


def test_etp_local_without_local_endpoint_drops_in_filter_external_services(
        rules: Ruleset) -> None:
    result = send(rules, CLIENT, NODE_IP, NODE_PORT["localnone"])
    assert result.verdict == "DROP"
    assert stopped_in(result) == {"filter/PYPROXY-EXTERNAL-SERVICES"}


def test_source_ranges_drop_in_filter_firewall(rules: Ruleset) -> None:
    result = send(rules, CLIENT, LB_IP["lbranged"], 80)
    assert result.verdict == "DROP"
    assert stopped_in(result) == {"filter/PYPROXY-FIREWALL"}


def test_source_ranges_do_not_filter_the_node_port() -> None:
    # As upstream: node ports are not subject to loadBalancerSourceRanges.
    objs = variant("lbranged", allocateLoadBalancerNodePorts=True,
                   ports=[{"name": "http", "port": 80, "targetPort": 8080,
                           "protocol": "TCP", "nodePort": 30084}])
    rs = plan_of(objs).ruleset
    assert send(rs, CLIENT, LB_IP["lbranged"], 80).verdict == "DROP"
    result = send(rs, CLIENT, NODE_IP, 30084)
    assert (result.verdict, result.endpoints, result.masquerade) == ("ACCEPT", ALL, True)


@pytest.mark.parametrize(("service", "verdict"), [("lballowed", "ACCEPT"), ("lbranged", "DROP")])
def test_node_traffic_to_a_local_vip_sourced_from_the_vip(
        rules: Ruleset, service: str, verdict: str) -> None:
    # A VIP bound on the node: a connection from the node to it leaves with the
    # VIP as source. Allowed only when the ranges cover the node's own address.
    lb = LB_IP[service]
    result = send(rules, lb, lb, 80, from_local=True, local=(NODE_IP, lb))
    assert result.verdict == verdict, result.notes


def test_session_affinity_without_a_record_spreads(rules: Ruleset) -> None:
    result = send(rules, POD, VIP["sticky"], 80, affinity=False)
    assert result.endpoints == ALL
    assert not any("branch with an affinity record" in n for n in result.notes)


def test_session_affinity_sends_a_client_back_to_its_endpoint(rules: Ruleset) -> None:
    result = send(rules, POD, VIP["sticky"], 80, affinity=True)
    assert result.verdict == "ACCEPT"
    assert result.endpoints == ALL
    recorded: dict[str, str | None] = {}
    for branch in branches(result):
        hit = next((m[1] for n in branch.notes
                    if (m := re.search(r"recent --rcheck (\S+): branch with an affinity", n))),
                   None)
        if hit is None:
            continue
        assert not any("statistic" in n and "branch taken" in n for n in branch.notes), (
            "a client with an affinity record must not be load-balanced")
        recorded[hit] = branch.endpoint
    # One record per endpoint, each leading back to the endpoint that set it.
    assert sorted(recorded.values()) == list(ALL)
    nat = rules.table(Table.NAT)
    for name, ep in recorded.items():
        assert any(f"--set --name {name} " in r and f"--to-destination {ep}" in r
                   for r in nat[name]), f"{name} does not record clients sent to {ep}"


def test_terminating_endpoints_are_a_fallback_only() -> None:
    objs = variant("terminating", endpoints=[
        endpoint("pod1", ready=False, serving=True, terminating=True),
        endpoint("pod2", ready=False, serving=False, terminating=True),
        endpoint("pod3")])
    result = send(plan_of(objs).ruleset, POD, VIP["terminating"], 80)
    assert result.endpoints == (P3,)


def test_only_non_serving_endpoints_rejects() -> None:
    objs = variant("terminating", endpoints=[
        endpoint("pod2", ready=False, serving=False, terminating=True)])
    result = send(plan_of(objs).ruleset, POD, VIP["terminating"], 80)
    assert result.verdict == "REJECT"


def test_etp_local_falls_back_to_local_terminating_endpoints() -> None:
    objs = variant("local", endpoints=[
        endpoint("pod1", ready=False, serving=True, terminating=True), endpoint("pod3")])
    rs = plan_of(objs).ruleset
    external = send(rs, CLIENT, NODE_IP, NODE_PORT["local"])
    assert (external.verdict, external.endpoints, external.masquerade) == (
        "ACCEPT", (P1,), False)
    # Cluster traffic has a ready endpoint, so it never meets the terminating one.
    assert send(rs, POD, VIP["local"], 80).endpoints == (P3,)


def test_etp_local_external_ip_and_load_balancer() -> None:
    objs = variant("ext", externalTrafficPolicy="Local",
                   endpoints=[endpoint("pod1"), endpoint("pod3")])
    objs = variant("lb", objs, externalTrafficPolicy="Local",
                   endpoints=[endpoint("pod2"), endpoint("pod3")])
    rs = plan_of(objs).ruleset
    for dst, local in ((cluster.EXTERNAL_IP, P1), (LB_IP["lb"], P2)):
        result = send(rs, CLIENT, dst, 80)
        assert (result.endpoints, result.masquerade) == ((local,), False), dst
        assert len(send(rs, POD, dst, 80).endpoints) == 2, dst


def test_sctp_service() -> None:
    objs = [own_service("sctp", "198.18.200.32",
                        ports=[{"name": "s", "port": 9, "targetPort": 9000, "protocol": "SCTP"}]),
            cluster.endpoint_slice("sctp", [endpoint("pod1")],
                                   ports=[{"name": "s", "port": 9000, "protocol": "SCTP"}])]
    rs = plan_of(objs).ruleset
    assert send(rs, POD, "198.18.200.32", 9, "sctp").endpoints == (
        f"{cluster.POD_IPS['pod1']}:9000",)
    assert send(rs, POD, "198.18.200.32", 9, "tcp").endpoints == ()


def test_single_unnamed_port() -> None:
    objs = [own_service("plain", "198.18.200.33", ports=[{"port": 80, "targetPort": 8080}]),
            cluster.endpoint_slice("plain", [endpoint("pod2")],
                                   ports=[{"name": "", "port": 8080, "protocol": "TCP"}])]
    assert send(plan_of(objs).ruleset, POD, "198.18.200.33", 80).endpoints == (P2,)


# ---------------------------------------------------------------------------
# internalTrafficPolicy Local


def itp_objects(*pods: str, **spec: Any) -> list[dict[str, Any]]:
    return [own_service("itp", "198.18.200.30", internalTrafficPolicy="Local", **spec),
            cluster.endpoint_slice("itp", [endpoint(p) for p in pods])]


def test_itp_local_reaches_only_local_endpoints() -> None:
    rs = plan_of(itp_objects("pod1", "pod3")).ruleset
    result = send(rs, POD, "198.18.200.30", 80)
    assert (result.endpoints, result.masquerade) == ((P1,), False)
    node = send(rs, NODE_IP, "198.18.200.30", 80, from_local=True)
    assert (node.endpoints, node.masquerade) == ((P1,), True)


def test_itp_local_without_local_endpoint_drops() -> None:
    rs = plan_of(itp_objects("pod3")).ruleset
    for result in (send(rs, POD, "198.18.200.30", 80),
                   send(rs, NODE_IP, "198.18.200.30", 80, from_local=True)):
        assert result.verdict == "DROP", result.notes
        assert stopped_in(result) == {"filter/PYPROXY-SERVICES"}


def test_itp_local_does_not_limit_external_traffic() -> None:
    rs = plan_of(itp_objects(
        "pod1", "pod3", type="NodePort",
        ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30085}])).ruleset
    assert send(rs, POD, "198.18.200.30", 80).endpoints == (P1,)
    external = send(rs, CLIENT, NODE_IP, 30085)
    assert (external.endpoints, external.masquerade) == ((P1, P3), True)


# ---------------------------------------------------------------------------
# Masquerade settings


def test_masquerade_all_masquerades_pod_traffic() -> None:
    rs = plan_of(ctx=context(masquerade_all=True)).ruleset
    result = send(rs, POD, VIP["web"], 80)
    assert (result.endpoints, result.masquerade) == (ALL, True)
    assert {b.masquerade for b in branches(result)} == {True}


def test_without_cluster_cidr_cluster_ip_traffic_is_not_masqueraded() -> None:
    rs = plan_of(ctx=context(cluster_cidrs=())).ruleset
    for src, from_local in ((POD, False), (NODE_IP, True)):
        result = send(rs, src, VIP["web"], 80, from_local=from_local)
        assert (result.endpoints, result.masquerade) == (ALL, False), src
    # External traffic is still masqueraded (eTP Cluster) ...
    assert send(rs, CLIENT, NODE_IP, NODE_PORT["web"]).masquerade is True
    # ... and with eTP Local, pods can no longer be told from clients.
    assert send(rs, POD, NODE_IP, NODE_PORT["local"]).endpoints == (P1,)


def test_cluster_cidr_of_the_other_family_is_ignored() -> None:
    rs = plan_of(ctx=context(cluster_cidrs=(ip_network("fd00:1::/64"),))).ruleset
    assert send(rs, POD, VIP["web"], 80).masquerade is False


def test_masquerade_bit() -> None:
    rs = plan_of(ctx=context(masquerade_bit=0)).ruleset
    assert send(rs, CLIENT, VIP["web"], 80).masquerade is True
    assert send(rs, POD, VIP["web"], 80).masquerade is False


# ---------------------------------------------------------------------------
# Topology (zone hints)


TOPO_IP = "198.18.200.31"
AUTO = {"service.kubernetes.io/topology-mode": "Auto"}


def topo_objects(*eps: dict[str, Any], annotations: dict[str, str] | None = AUTO,
                 **spec: Any) -> list[dict[str, Any]]:
    return [own_service("topo", TOPO_IP, annotations=annotations, **spec),
            cluster.endpoint_slice("topo", list(eps))]


HINTED = (endpoint("pod1", zone="zone-a", hints=["zone-a"]),
          endpoint("pod2", zone="zone-b", hints=["zone-b"]),
          endpoint("pod3", zone="zone-a", hints=["zone-a"]))
ZONE_A = context(node=replace(NODE, zone="zone-a"))


def test_topology_hints_keep_traffic_in_zone() -> None:
    rs = plan_of(topo_objects(*HINTED), ZONE_A).ruleset
    assert send(rs, POD, TOPO_IP, 80).endpoints == (P1, P3)
    assert send(rs, CLIENT, TOPO_IP, 80).endpoints == (P1, P3)


def test_topology_hints_with_traffic_distribution() -> None:
    rs = plan_of(topo_objects(*HINTED, annotations=None,
                              trafficDistribution="PreferClose"), ZONE_A).ruleset
    assert send(rs, POD, TOPO_IP, 80).endpoints == (P1, P3)


@pytest.mark.parametrize(("case", "eps", "ctx"), [
    ("an endpoint lacks hints", (*HINTED[:2], endpoint("pod3", zone="zone-a")), ZONE_A),
    ("no endpoint hinted for this zone",
     tuple(endpoint(p, hints=["zone-c"]) for p in ("pod1", "pod2", "pod3")), ZONE_A),
    ("node has no zone", HINTED, context()),
])
def test_topology_falls_back_to_all_endpoints(
        case: str, eps: tuple[dict[str, Any], ...], ctx: PlanContext) -> None:
    rs = plan_of(topo_objects(*eps), ctx).ruleset
    assert send(rs, POD, TOPO_IP, 80).endpoints == ALL, case


@pytest.mark.parametrize("annotations", [
    {"service.kubernetes.io/topology-aware-hints": "Auto"},
    None,
], ids=["deprecated-annotation", "no-annotation"])
def test_topology_hints_are_used_whatever_the_service_says(
        annotations: dict[str, str] | None) -> None:
    rs = plan_of(topo_objects(*HINTED, annotations=annotations), ZONE_A).ruleset
    assert send(rs, POD, TOPO_IP, 80).endpoints == (P1, P3)


def test_topology_ignores_hints_of_unready_endpoints() -> None:
    eps = (HINTED[0], endpoint("pod2", ready=False), HINTED[2])
    rs = plan_of(topo_objects(*eps), ZONE_A).ruleset
    assert send(rs, POD, TOPO_IP, 80).endpoints == (P1, P3)


# ---------------------------------------------------------------------------
# IPv6


V6_VIP = "fd00:200::10"
V6_NODE = "fd00:100::1"


def v6_objects() -> list[dict[str, Any]]:
    svc = own_service("v6", V6_VIP, type="NodePort",
                      ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30090}])
    svc["spec"]["ipFamilies"] = ["IPv6"]
    sl = cluster.endpoint_slice("v6", [
        {"addresses": ["fd00:1::1"], "conditions": {"ready": True}, "nodeName": cluster.NODE},
        {"addresses": ["fd00:1::3"], "conditions": {"ready": True}, "nodeName": "node-b"}])
    sl["addressType"] = "IPv6"
    return [svc, sl]


V6_CTX = context(family=IPFamily.IPv6, node=NodeInfo(cluster.NODE, (ip_address(V6_NODE),)),
                 cluster_cidrs=(ip_network("fd00:1::/64"), CLUSTER_CIDR))
V6_EPS = ("[fd00:1::1]:8080", "[fd00:1::3]:8080")


def test_ipv6_cluster_ip_and_node_port() -> None:
    rs = plan_of(v6_objects(), V6_CTX).ruleset
    pod = send(rs, "fd00:1::9", V6_VIP, 80, local=(V6_NODE,))
    assert (pod.endpoints, pod.masquerade) == (V6_EPS, False)
    client = send(rs, "fd00:100::2", V6_NODE, 30090, local=(V6_NODE,))
    assert (client.endpoints, client.masquerade) == (V6_EPS, True)


def test_ipv6_no_endpoints_rejects() -> None:
    objs = v6_objects()
    objs[1]["endpoints"] = []
    rs = plan_of(objs, V6_CTX).ruleset
    assert send(rs, "fd00:1::9", V6_VIP, 80, local=(V6_NODE,)).verdict == "REJECT"


def test_ipv6_node_ports_are_not_served_on_localhost() -> None:
    rs = plan_of(v6_objects(), V6_CTX).ruleset
    result = send(rs, "::1", "::1", 30090, from_local=True, local=(V6_NODE,))
    assert result.endpoints == ()


# ---------------------------------------------------------------------------
# Chain names


def all_chains(rs: Ruleset) -> set[str]:
    return {c for t in (Table.FILTER, Table.NAT) for c in rs.table(t)}


def test_chain_names_are_owned_and_fit_the_kernel_limit(rules: Ruleset) -> None:
    names = all_chains(rules)
    assert names
    for name in names:
        assert name.startswith("PYPROXY-"), name
        assert len(name) <= MAX_CHAIN_NAME, name
    assert {j.rule.split(" -j ")[-1] for j in rules.jumps} <= names
    for jump in rules.jumps:
        assert jump.chain in BUILTIN_CHAINS[jump.table]


def test_every_jump_target_exists(rules: Ruleset) -> None:
    builtin_targets = {"ACCEPT", "DROP", "RETURN", "REJECT", "DNAT", "MARK", "MASQUERADE"}
    for table in (Table.FILTER, Table.NAT):
        chains = rules.table(table)
        for rule in (r for rs in chains.values() for r in rs):
            m = re.search(r"-j (\S+)", rule)
            if m:
                assert m[1] in builtin_targets or m[1] in chains, rule


def test_chain_names_are_stable(rules: Ruleset) -> None:
    again = plan_of()
    assert all_chains(again.ruleset) == all_chains(rules)
    # Only identity counts: a new cluster IP, port and endpoint set keep the SVC chain.
    objs = variant("web", clusterIP="198.18.200.99", clusterIPs=["198.18.200.99"],
                   ports=[{"name": "http", "port": 8000, "targetPort": 8080, "protocol": "TCP",
                           "nodePort": 30080}],
                   endpoints=[endpoint("pod1")])
    moved = plan_of(objs)
    web = ServicePortName(cluster.NS, "web", "http", Protocol.TCP)
    assert moved.chains_by_service[web][0] == again.chains_by_service[web][0]
    assert set(moved.chains_by_service[web]) < set(again.chains_by_service[web])


def test_chain_name_depends_only_on_identity() -> None:
    a = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    assert chain_name("SVC", a) == chain_name("SVC", ServicePortName("ns1", "svc1", "p80",
                                                                      Protocol.TCP))
    others = [replace(a, namespace="ns2"), replace(a, name="svc2"), replace(a, port="p81"),
              replace(a, protocol=Protocol.UDP)]
    names = {chain_name("SVC", n) for n in [a, *others]}
    assert len(names) == 5
    kinds = {chain_name(k, a) for k in ("SVC", "SVL", "EXT", "FW")}
    assert len({n.split("-", 2)[2] for n in kinds}) == 1  # one hash, four kinds
    assert chain_name("SEP", a, "10.0.0.1:80") != chain_name("SEP", a, "10.0.0.2:80")


def test_chain_names_hash_like_kube_proxy() -> None:
    # Upstream's own test fixtures name ns1/svc1:p80 KUBE-SVC-XPGD46QRK7WJZT7O and its
    # endpoint 10.180.0.1:80 KUBE-SEP-SXIVWICOYRO3J4NJ: operators can correlate.
    spn = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    assert chain_name("SVC", spn) == "PYPROXY-SVC-XPGD46QRK7WJZT7O"
    assert chain_name("SEP", spn, "10.180.0.1:80") == "PYPROXY-SEP-SXIVWICOYRO3J4NJ"


def test_service_chains_are_distinct() -> None:
    snap = snapshot(cluster.objects())
    svc_chains = {chain_name("SVC", spn) for spn in snap.services}
    assert len(svc_chains) == len(snap.services)


# ---------------------------------------------------------------------------
# statistic probabilities


def _kernel(text: str) -> int:
    """libxt_statistic's parse: lround(0x80000000 * probability)."""
    return math.floor(0x80000000 * float(text) + 0.5)


def _saved(value: int) -> str:
    """libxt_statistic's save: %.11f of the 31-bit fraction."""
    return f"{value / 0x80000000:.11f}"


@pytest.mark.parametrize(("n", "text"), [
    (2, "0.50000000000"), (3, "0.33333333349"), (4, "0.25000000000"), (5, "0.20000000019"),
    (10, "0.10000000009"),
])
def test_probability_is_what_iptables_save_prints(n: int, text: str) -> None:
    assert probability(n) == text


def test_probability_survives_restore_and_save() -> None:
    for n in range(2, 3000):
        p = probability(n)
        assert _saved(_kernel(p)) == p, n
        assert _kernel(p) == round(0x80000000 / n), n  # the closest the kernel can hold


# ---------------------------------------------------------------------------
# Determinism and the planner's cache


def test_plan_is_deterministic(rules: Ruleset) -> None:
    first = render(rules, Ruleset()).text
    assert render(plan_of().ruleset, Ruleset()).text == first
    # The order the objects arrive in does not matter either.
    shuffled = list(reversed(cluster.objects()))
    for obj in shuffled:
        if obj["kind"] == "EndpointSlice" and obj.get("endpoints"):
            obj["endpoints"] = list(reversed(obj["endpoints"]))
    assert render(plan_of(shuffled).ruleset, Ruleset()).text == first


def _changed_snapshots() -> tuple[Snapshot, Snapshot]:
    tracker = ChangeTracker(node_name=cluster.NODE)
    tracker.replace(*split(cluster.objects()))
    before = tracker.checkout()
    before = Snapshot(dict(before.services), dict(before.endpoints), before.changed)
    objs = variant("web", endpoints=[endpoint("pod1"), endpoint("pod2")])
    objs = variant("sticky", objs, sessionAffinity="None")
    objs = [o for o in objs if o["metadata"]["name"] not in ("dns", "dns-a")]
    tracker.replace(*split(objs))
    after = tracker.checkout()
    assert after.changed == {(cluster.NS, "web"), (cluster.NS, "sticky"), (cluster.NS, "dns")}
    return before, after


def test_planner_cache_gives_the_same_result_as_a_fresh_plan() -> None:
    before, after = _changed_snapshots()
    planner = Planner(context())
    first = planner.plan(before.services, before.endpoints).ruleset.copy()
    cached = planner.plan(after.services, after.endpoints)
    fresh = plan(after.services, after.endpoints, context())
    assert cached.ruleset == fresh.ruleset
    assert dict(cached.chains_by_service) == dict(fresh.chains_by_service)
    assert cached.no_local_endpoints == fresh.no_local_endpoints
    assert render(cached.ruleset, Ruleset()).text == render(fresh.ruleset, Ruleset()).text
    assert cached.ruleset != first
    assert send(cached.ruleset, POD, VIP["web"], 80).endpoints == (P1, P2)
    assert send(cached.ruleset, POD, VIP["dns"], 53, "udp").endpoints == ()
    # And back again: the cache does not keep what was dropped.
    again = planner.plan(before.services, before.endpoints)
    assert again.ruleset == first


def test_no_local_endpoints_counts_local_policies_without_local_endpoints() -> None:
    # localnone (eTP Local, endpoint only on node-b); local has pod1 here.
    assert plan_of().no_local_endpoints == 1
