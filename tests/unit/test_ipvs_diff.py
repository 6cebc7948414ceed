"""The IPVS diff: kernel state and plan in, ordered operations out. No kernel needed.

Plans come from the kernel tests' scenarios (tests/kernel/cluster.py) through
the change tracker and the IPVS planner, changed the way the API would change
them. ``apply_to`` plays the operations on a KernelState, so every scenario
can end with the convergence check: once applied, a plan diffs to nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import replace
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from pyproxy.ipvs.diff import (
    AddAddress,
    AddDest,
    AddMember,
    AddService,
    CreateSet,
    DelAddress,
    DelDest,
    DelMember,
    DelService,
    DestroySet,
    KernelRealServer,
    KernelSet,
    KernelState,
    KernelVirtualServer,
    Operation,
    Ownership,
    Scope,
    SetDest,
    SetService,
    apply_to,
    diff,
    pending,
)
from pyproxy.ipvs.plan import (
    IPSet,
    IPVSContext,
    IPVSPlan,
    SetEntry,
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
WEB = VirtualServerKey(Protocol.TCP, cluster.CLUSTER_IPS["web"], 80)
WEB_NODE_PORT = VirtualServerKey(Protocol.TCP, NODE_IP, cluster.NODE_PORTS["web"])
DNS = VirtualServerKey(Protocol.UDP, cluster.CLUSTER_IPS["dns"], 53)
STICKY = VirtualServerKey(Protocol.TCP, cluster.CLUSTER_IPS["sticky"], 80)
POD1, POD2, POD3 = (cluster.POD_IPS[p] for p in ("pod1", "pod2", "pod3"))


def plan_of(objs: Iterable[dict[str, Any]] | None = None, ctx: IPVSContext = CTX) -> IPVSPlan:
    objs = list(cluster.objects() if objs is None else objs)
    tracker = ChangeTracker(node_name=cluster.NODE)
    tracker.replace([o for o in objs if o["kind"] == "Service"],
                    [o for o in objs if o["kind"] == "EndpointSlice"])
    snap = tracker.checkout()
    return plan(snap.services, snap.endpoints, ctx)


def edited(**changes: Any) -> list[dict[str, Any]]:
    """The scenarios' objects with some replaced (by Service or slice name) or dropped (None)."""
    out = []
    seen = set()
    for obj in cluster.objects():
        name = obj["metadata"]["name"]
        key = f"{obj['kind']}:{name}"
        seen.add(key)
        if key in changes:
            if changes[key] is not None:
                out.append(changes[key])
        else:
            out.append(copy.deepcopy(obj))
    out += [v for k, v in changes.items() if k not in seen and v is not None]
    return out


def converged(desired: IPVSPlan, state: KernelState) -> KernelState:
    """Apply the diff, then check that nothing is left to do."""
    after = apply_to(state, diff(desired, state))
    assert diff(desired, after) == []
    return after


def fresh() -> KernelState:
    return converged(plan_of(), KernelState())


def with_connections(state: KernelState, key: VirtualServerKey, address: str,
                     active: int = 0, inactive: int = 0) -> KernelState:
    vs = state.virtual_servers[key]
    real = tuple(replace(rs, active=active, inactive=inactive) if rs.address == address else rs
                 for rs in vs.real_servers)
    return replace(state, virtual_servers={**state.virtual_servers,
                                           key: replace(vs, real_servers=real)})


def index(ops: Sequence[Operation], op: Operation) -> int:
    assert op in ops, f"{op} not in {ops}"
    return ops.index(op)


# --------------------------------------------------------------------------- adding


def test_programming_from_nothing_creates_everything_in_a_safe_order() -> None:
    desired = plan_of()
    ops = diff(desired, KernelState())

    kinds = [type(op).__name__ for op in ops]
    phases = ["CreateSet", "AddAddress", "AddService", "AddMember"]
    # every CreateSet, then every AddAddress, then services with their real servers, then members
    firsts = [kinds.index(k) for k in phases]
    assert firsts == sorted(firsts)
    assert set(kinds) == {"CreateSet", "AddAddress", "AddService", "AddDest", "AddMember"}
    assert {op.name for op in ops if isinstance(op, CreateSet)} == {str(s) for s in IPSet}
    # a virtual server's real servers come right after it
    at = index(ops, AddService(WEB, "rr", 0))
    assert ops[at + 1:at + 4] == [AddDest(WEB, ip, 8080, 1) for ip in (POD1, POD2, POD3)]
    # its address is bound before it exists
    assert index(ops, AddAddress(WEB.address)) < at
    assert AddService(STICKY, "rr", 600) in ops
    assert AddService(WEB_NODE_PORT, "rr", 0) in ops
    # NodePort addresses are the node's own: never bound on the dummy interface
    assert AddAddress(NODE_IP) not in ops


def test_applied_plan_diffs_to_nothing() -> None:
    state = fresh()
    assert diff(plan_of(), state) == []
    assert pending(plan_of(), state) == frozenset()
    assert state.virtual_servers[WEB].real_servers == tuple(
        KernelRealServer(ip, 8080, 1) for ip in (POD1, POD2, POD3))


def test_new_endpoint_adds_one_real_server_per_virtual_server() -> None:
    state = fresh()
    slice_ = cluster.endpoint_slice("web", cluster.all_pods() + [
        {"addresses": ["198.18.1.4"], "conditions": {"ready": True}, "nodeName": cluster.NODE}])
    ops = diff(plan_of(edited(**{"EndpointSlice:web-a": slice_})), state)
    assert ops == [AddDest(WEB_NODE_PORT, "198.18.1.4", 8080, 1),
                   AddDest(WEB, "198.18.1.4", 8080, 1),
                   AddMember(str(IPSet.LOOP_BACK), SetEntry("198.18.1.4", "tcp", 8080,
                                                            "198.18.1.4"))]


# --------------------------------------------------------------------------- updating


def test_scheduler_change_is_a_set_service() -> None:
    state = fresh()
    ops = diff(plan_of(ctx=replace(CTX, scheduler="wrr")), state)
    assert ops and all(isinstance(op, SetService) and op.scheduler == "wrr" for op in ops)
    assert len(ops) == len(state.virtual_servers)


def test_persistence_change_is_a_set_service() -> None:
    state = fresh()
    web = edited(**{"Service:web": cluster.service(
        "web", type="NodePort", sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}},
        ports=[{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                "nodePort": cluster.NODE_PORTS["web"]}])})
    assert diff(plan_of(web), state) == [SetService(WEB_NODE_PORT, "rr", 30),
                                         SetService(WEB, "rr", 30)]
    sticky = edited(**{"Service:sticky": cluster.service("sticky")})
    assert diff(plan_of(sticky), state) == [SetService(STICKY, "rr", 0)]


def test_drifted_weight_and_forwarding_are_repaired() -> None:
    state = fresh()
    vs = state.virtual_servers[WEB]
    real = (replace(vs.real_servers[0], weight=0), replace(vs.real_servers[1], masquerade=False),
            vs.real_servers[2])
    state.virtual_servers[WEB] = replace(vs, real_servers=real)
    assert diff(plan_of(), state) == [SetDest(WEB, POD1, 8080, 1), SetDest(WEB, POD2, 8080, 1)]


def test_endpoint_coming_back_while_draining_gets_its_weight_back() -> None:
    state = fresh()
    only12 = edited(**{"EndpointSlice:web-a": cluster.endpoint_slice(
        "web", [cluster.endpoint("pod1"), cluster.endpoint("pod2")])})
    state = with_connections(state, WEB, POD3, active=1)
    state = apply_to(state, diff(plan_of(only12), state))
    assert KernelRealServer(POD3, 8080, 0, 1, 0) in state.virtual_servers[WEB].real_servers
    assert SetDest(WEB, POD3, 8080, 1) in diff(plan_of(), state)
    converged(plan_of(), state)


# --------------------------------------------------------------------------- removing, gracefully


def without_pod3() -> IPVSPlan:
    return plan_of(edited(**{
        "EndpointSlice:web-a": cluster.endpoint_slice(
            "web", [cluster.endpoint("pod1"), cluster.endpoint("pod2")]),
        "EndpointSlice:dns-a": cluster.endpoint_slice(
            "dns", [cluster.endpoint("pod1"), cluster.endpoint("pod2")],
            ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]),
    }))


def test_tcp_real_server_with_connections_drains_then_goes() -> None:
    desired = without_pod3()
    state = with_connections(fresh(), WEB, POD3, active=2, inactive=1)
    ops = diff(desired, state)
    assert SetDest(WEB, POD3, 8080, 0) in ops  # no new connections, established ones go on
    assert DelDest(WEB, POD3, 8080) not in ops
    assert DelDest(WEB_NODE_PORT, POD3, 8080) in ops  # that one had no connections
    assert DelDest(DNS, POD3, 5353) in ops  # UDP: no graceful termination
    state = apply_to(state, ops)
    assert pending(desired, state) == {WEB}

    # while the connections last, a sync changes nothing
    assert diff(desired, state) == []
    state = with_connections(state, WEB, POD3, active=0, inactive=1)
    assert diff(desired, state) == []
    # once they are gone, the real server goes
    state = with_connections(state, WEB, POD3)
    assert diff(desired, state) == [DelDest(WEB, POD3, 8080)]
    state = converged(desired, state)
    assert pending(desired, state) == frozenset()


def test_udp_and_sctp_real_servers_go_at_once() -> None:
    desired = without_pod3()
    state = with_connections(fresh(), DNS, POD3, active=5, inactive=5)
    assert DelDest(DNS, POD3, 5353) in diff(desired, state)
    assert pending(desired, state) == frozenset()
    sctp = VirtualServerKey(Protocol.SCTP, "198.18.200.99", 80)
    state.virtual_servers[sctp] = KernelVirtualServer(
        sctp, "rr", 0, (KernelRealServer(POD1, 80, 1, 3, 3),))
    state.addresses.add(sctp.address)
    ops = diff(desired, state)
    assert DelService(sctp) in ops and DelAddress(sctp.address) in ops


def test_removed_service_waits_for_its_tcp_connections() -> None:
    desired = plan_of(edited(**{"Service:web": None, "EndpointSlice:web-a": None}))
    state = with_connections(fresh(), WEB, POD1, active=1)
    ops = diff(desired, state)
    # the virtual server stays, drained, with its address bound
    assert DelService(WEB) not in ops
    assert DelAddress(WEB.address) not in ops
    assert SetDest(WEB, POD1, 8080, 0) in ops
    assert DelDest(WEB, POD2, 8080) in ops and DelDest(WEB, POD3, 8080) in ops
    # the NodePort virtual server had no connections: gone at once
    assert DelService(WEB_NODE_PORT) in ops
    # the ipsets follow the plan at once (only new connections consult them)
    assert DelMember(str(IPSet.CLUSTER_IP), SetEntry(WEB.address, "tcp", 80)) in ops
    state = apply_to(state, ops)
    assert pending(desired, state) == {WEB}
    assert diff(desired, state) == []
    state = with_connections(state, WEB, POD1)
    assert diff(desired, state) == [DelService(WEB), DelAddress(WEB.address)]
    converged(desired, state)


def test_removed_udp_service_goes_at_once() -> None:
    desired = plan_of(edited(**{"Service:dns": None, "EndpointSlice:dns-a": None}))
    state = with_connections(fresh(), DNS, POD1, active=3)
    ops = diff(desired, state)
    assert index(ops, DelService(DNS)) < index(ops, DelAddress(DNS.address))
    assert not any(isinstance(op, SetDest | DelDest) for op in ops)
    converged(desired, state)


def test_losing_the_last_endpoint_rejects_before_the_real_servers_go() -> None:
    desired = plan_of(edited(**{"EndpointSlice:web-a": cluster.endpoint_slice("web", None)}))
    ops = diff(desired, fresh())
    reject = AddMember(str(IPSet.NO_ENDPOINTS), SetEntry(WEB.address, "tcp", 80))
    assert index(ops, reject) < index(ops, DelDest(WEB, POD1, 8080))
    # and back: the real servers are there before the service stops rejecting
    state = apply_to(fresh(), ops)
    back = diff(plan_of(), state)
    unreject = DelMember(str(IPSet.NO_ENDPOINTS), SetEntry(WEB.address, "tcp", 80))
    assert index(back, AddDest(WEB, POD1, 8080, 1)) < index(back, unreject)


# --------------------------------------------------------------------------- addresses and ipsets


def test_address_and_member_churn() -> None:
    state = fresh()
    ext = edited(**{"Service:ext": cluster.service("ext", externalIPs=["198.18.201.11"])})
    desired = plan_of(ext)
    ops = diff(desired, state)
    old = VirtualServerKey(Protocol.TCP, cluster.EXTERNAL_IP, 80)
    new = VirtualServerKey(Protocol.TCP, "198.18.201.11", 80)
    assert index(ops, AddAddress(new.address)) < index(ops, AddService(new, "rr", 0))
    assert index(ops, DelService(old)) < index(ops, DelAddress(old.address))
    assert AddMember(str(IPSet.EXTERNAL_IP), SetEntry(new.address, "tcp", 80)) in ops
    assert DelMember(str(IPSet.EXTERNAL_IP), SetEntry(old.address, "tcp", 80)) in ops
    assert AddMember(str(IPSet.IPVS_IPS), SetEntry(new.address)) in ops
    assert DelMember(str(IPSet.IPVS_IPS), SetEntry(old.address)) in ops
    converged(desired, state)


def test_drifted_ipsets_are_repaired() -> None:
    state = fresh()
    desired = plan_of()
    sets = dict(state.ipsets)
    cluster_ip = sets.pop(str(IPSet.CLUSTER_IP))  # deleted by hand
    sets[str(IPSet.IPVS_IPS)] = KernelSet("hash:ip,port")  # wrong type
    stray = SetEntry("198.18.200.200", "tcp", 80)
    sets[str(IPSet.NO_ENDPOINTS)] = replace(
        sets[str(IPSet.NO_ENDPOINTS)],
        members=sets[str(IPSet.NO_ENDPOINTS)].members | {stray})
    sets["PYPROXY-OLD"] = KernelSet("hash:ip")  # left over by an older version
    state = replace(state, ipsets=sets)
    ops = diff(desired, state)
    assert ops[:3] == [CreateSet(str(IPSet.CLUSTER_IP), "hash:ip,port"),
                       DestroySet(str(IPSet.IPVS_IPS)),
                       CreateSet(str(IPSet.IPVS_IPS), "hash:ip")]
    assert {op.entry for op in ops if isinstance(op, AddMember)
            and op.set == IPSet.CLUSTER_IP} == set(cluster_ip.members)
    assert DelMember(str(IPSet.NO_ENDPOINTS), stray) in ops
    assert ops[-1] == DestroySet("PYPROXY-OLD")
    converged(desired, state)


def test_ipv6_sets_are_created_as_inet6() -> None:
    ops = diff(IPVSPlan(addresses={"fd00::10"}), KernelState())
    assert CreateSet(str(IPSet.CLUSTER_IP), "hash:ip,port", True) in ops
    state = apply_to(KernelState(), diff(IPVSPlan(), KernelState()))  # IPv4 sets
    v6 = diff(IPVSPlan(addresses={"fd00::10"}), state)
    assert DestroySet(str(IPSet.CLUSTER_IP)) in v6
    assert DestroySet(str(IPSet.NODE_PORT_TCP)) not in v6  # bitmap:port has no family


# --------------------------------------------------------------------------- ownership


def test_ownership() -> None:
    own = Ownership(node_port_addresses=frozenset({NODE_IP}),
                    exclude_cidrs=(ip_network("198.18.250.0/24"),))
    bound = {"198.18.200.10", "198.18.250.1"}
    assert own.owns(VirtualServerKey(Protocol.TCP, "198.18.200.10", 80), bound)
    assert own.owns(VirtualServerKey(Protocol.UDP, "198.18.200.10", 9999), bound)
    assert not own.owns(VirtualServerKey(Protocol.TCP, "198.18.200.11", 80), bound)
    assert own.owns(VirtualServerKey(Protocol.TCP, NODE_IP, 30000), bound)
    assert own.owns(VirtualServerKey(Protocol.TCP, NODE_IP, 32767), bound)
    assert not own.owns(VirtualServerKey(Protocol.TCP, NODE_IP, 22), bound)
    assert not own.owns(VirtualServerKey(Protocol.TCP, NODE_IP, 32768), bound)
    assert not own.owns(VirtualServerKey(Protocol.TCP, "198.18.250.1", 80), bound)
    assert own.owns_set("PYPROXY-CLUSTER-IP")
    assert not own.owns_set("KUBE-CLUSTER-IP")


def test_foreign_sets_are_never_destroyed() -> None:
    state = fresh()
    state.ipsets["KUBE-CLUSTER-IP"] = KernelSet("hash:ip,port")  # should a read ever leak one
    assert diff(plan_of(), state) == []


# --------------------------------------------------------------------------- partial syncs


def test_scope_between_plans_names_only_what_changed() -> None:
    before = plan_of()
    after = without_pod3()
    scope = Scope.between(before, after)
    assert scope.virtual_servers == {WEB, WEB_NODE_PORT, DNS}
    assert scope.addresses == frozenset()
    assert set(scope.members) == {str(IPSet.LOOP_BACK)}
    assert not Scope.between(before, plan_of())
    merged = scope | Scope(frozenset({STICKY}), frozenset({"198.18.200.99"}))
    assert STICKY in merged.virtual_servers and "198.18.200.99" in merged.addresses


def test_scoped_diff_touches_only_the_scope() -> None:
    full = fresh()
    after = without_pod3()
    scope = Scope.between(plan_of(), after)
    # a scoped read holds the scope's virtual servers only, no addresses, no sets
    partial = KernelState({k: v for k, v in full.virtual_servers.items()
                           if k in scope.virtual_servers}, scope=scope)
    ops = diff(after, partial)
    assert sorted(map(str, ops)) == sorted(map(str, [
        DelDest(WEB, POD3, 8080), DelDest(WEB_NODE_PORT, POD3, 8080), DelDest(DNS, POD3, 5353),
        # pod3:8080 still backs other services: only its DNS hairpin entry goes
        DelMember(str(IPSet.LOOP_BACK), SetEntry(POD3, "udp", 5353, POD3)),
    ]))
    # the same result as a full diff
    assert sorted(map(str, diff(after, full))) == sorted(map(str, ops))
    # and the dataplane's bookkeeping after a partial sync works on the scoped state
    # (it once raised KeyError: set members are written blind there)
    assert pending(after, apply_to(partial, ops)) == frozenset()
    back = Scope.between(after, plan_of())
    adds = diff(plan_of(), KernelState({}, scope=back))
    assert any(isinstance(op, AddMember) for op in adds)
    apply_to(KernelState({}, scope=back), adds)


def test_scoped_diff_of_a_new_service() -> None:
    before = plan_of()
    svc = cluster.service("web")
    svc["metadata"]["name"] = "new"
    svc["spec"]["clusterIP"] = svc["spec"]["clusterIPs"][0] = "198.18.200.99"
    slice_ = cluster.endpoint_slice("web", [cluster.endpoint("pod1")])
    slice_["metadata"]["name"] = "new-a"
    slice_["metadata"]["labels"]["kubernetes.io/service-name"] = "new"
    after = plan_of(edited(**{"Service:new": svc, "EndpointSlice:new-a": slice_}))
    scope = Scope.between(before, after)
    key = VirtualServerKey(Protocol.TCP, "198.18.200.99", 80)
    ops = diff(after, KernelState(scope=scope))
    assert ops[:3] == [AddAddress(key.address), AddService(key, "rr", 0),
                       AddDest(key, POD1, 8080, 1)]
    assert {type(op) for op in ops[3:]} == {AddMember}
    # removing it again, with the scope of that change
    removal = Scope.between(after, before)
    state = KernelState({key: KernelVirtualServer(key, "rr", 0, (KernelRealServer(POD1, 8080),))},
                        scope=removal)
    ops = diff(before, state)
    assert ops[-2:] == [DelService(key), DelAddress(key.address)]
    assert {type(op) for op in ops[:-2]} == {DelMember}


@pytest.mark.parametrize("active, pending_keys", [(0, set()), (1, {WEB})])
def test_pending_names_what_still_drains(active: int, pending_keys: set[VirtualServerKey]
                                         ) -> None:
    desired = without_pod3()
    state = with_connections(fresh(), WEB, POD3, active=active)
    state = apply_to(state, diff(desired, state))
    assert pending(desired, state) == pending_keys
