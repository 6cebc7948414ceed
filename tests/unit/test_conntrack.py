"""Which conntrack entries go stale after a sync (pure), and the glue that deletes them.

No kernel here: the flow table is a fake holding Flow records. The node is
node-a; pod1 and pod2 (198.18.1.1, .2) run on it, pod3 (198.18.1.3) on node-b.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from typing import Any

import pytest

from pyproxy.conntrack import (
    ENDPOINT_GONE,
    NEWLY_SERVED,
    RECONCILE,
    Deletion,
    Flow,
    Matcher,
    StaleFlowCleaner,
    reconcile,
    service_addresses,
    stale_flows,
    udp_state,
)
from pyproxy.iptables.plan import PlanContext
from pyproxy.iptables.restore import Backend, IPTables
from pyproxy.iptables.sync import IPTablesDataplane
from pyproxy.model import (
    Endpoint,
    IPAddress,
    IPFamily,
    NodeInfo,
    Protocol,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from pyproxy.tracker import Snapshot

NODE = NodeInfo("node-a", (ip_address("198.18.100.1"),), zone="zone-a")
CLIENT = ip_address("198.18.100.2")
VIP = ip_address("198.18.200.53")
EXT_IP = ip_address("198.18.201.53")
LB_IP = ip_address("198.18.202.53")
POD = {n: ip_address(f"198.18.1.{n}") for n in (1, 2, 3)}
DNS = ServicePortName("t", "dns", "dns", Protocol.UDP)


def ep(n: int, *, port: int = 5353, ready: bool = True, serving: bool = True,
       terminating: bool = False) -> Endpoint:
    return Endpoint(POD[n], port, ready=ready, serving=serving, terminating=terminating,
                    node_name="node-a" if n < 3 else "node-b", is_local=n < 3)


def svc(name: ServicePortName = DNS, **kw: Any) -> ServicePort:
    return ServicePort(name=name, family=IPFamily.IPv4,
                       type=kw.pop("type", ServiceType.CLUSTER_IP),
                       cluster_ip=kw.pop("cluster_ip", VIP), port=kw.pop("port", 53), **kw)


def state(*ports: tuple[ServicePort, Sequence[Endpoint]]) -> dict[ServicePortName, Any]:
    return udp_state({p.name: p for p, _ in ports}, {p.name: tuple(e) for p, e in ports}, NODE)


def b(n: int, port: int = 5353) -> tuple[IPAddress, int]:
    return (POD[n], port)


def frontends(deletions: Iterable[Deletion]) -> set[tuple[str, int]]:
    return {(str(d.address) if d.address else "*", d.port) for d in deletions}


# -- endpoints that stop being usable ----------------------------------------------------------


def test_removed_endpoint_deletes_flows_dnated_to_it() -> None:
    before = state((svc(), [ep(1), ep(2)]))
    after = state((svc(), [ep(2)]))
    assert stale_flows(before, after) == [Deletion(DNS, ENDPOINT_GONE, 53, VIP, b(1))]


def test_endpoint_that_became_not_ready_is_no_longer_usable() -> None:
    before = state((svc(), [ep(1), ep(2)]))
    after = state((svc(), [ep(1, ready=False, serving=False), ep(2)]))
    assert stale_flows(before, after) == [Deletion(DNS, ENDPOINT_GONE, 53, VIP, b(1))]


def test_endpoint_port_change_deletes_flows_to_the_old_port_only() -> None:
    before = state((svc(), [ep(1)]))
    after = state((svc(), [ep(1, port=5354)]))
    assert stale_flows(before, after) == [Deletion(DNS, ENDPOINT_GONE, 53, VIP, b(1))]


def test_every_address_of_the_port_is_cleared() -> None:
    port = svc(type=ServiceType.LOAD_BALANCER, node_port=30053, external_ips=(EXT_IP,),
               load_balancer_ips=(LB_IP,))
    deletions = stale_flows(state((port, [ep(1), ep(2)])), state((port, [ep(2)])))
    assert {d.endpoint for d in deletions} == {b(1)}
    assert {d.reason for d in deletions} == {ENDPOINT_GONE}
    assert frontends(deletions) == {(str(VIP), 53), (str(EXT_IP), 53), (str(LB_IP), 53),
                                    ("*", 30053)}


def test_last_endpoint_removed_still_deletes_its_flows() -> None:
    deletions = stale_flows(state((svc(), [ep(1)])), state((svc(), [])))
    assert deletions == [Deletion(DNS, ENDPOINT_GONE, 53, VIP, b(1))]


def test_deleted_service_clears_its_old_addresses() -> None:
    port = svc(type=ServiceType.NODE_PORT, node_port=30053)
    deletions = stale_flows(state((port, [ep(1)])), state())
    assert frontends(deletions) == {(str(VIP), 53), ("*", 30053)}
    assert {d.endpoint for d in deletions} == {b(1)}


def test_address_removed_with_the_endpoint_is_still_cleared() -> None:
    before = state((svc(external_ips=(EXT_IP,)), [ep(1), ep(2)]))
    after = state((svc(), [ep(2)]))
    assert frontends(stale_flows(before, after)) == {(str(VIP), 53), (str(EXT_IP), 53)}


def test_nothing_changed_nothing_deleted() -> None:
    s = state((svc(), [ep(1), ep(2)]))
    assert stale_flows(s, state((svc(), [ep(2), ep(1)]))) == []
    # An endpoint that was never usable (not ready) leaves nothing behind.
    before = state((svc(), [ep(1), ep(2, ready=False, serving=False)]))
    assert stale_flows(before, state((svc(), [ep(1)]))) == []


def test_terminating_fallback_ends_when_a_ready_endpoint_appears() -> None:
    before = state((svc(), [ep(1, ready=False, terminating=True)]))
    after = state((svc(), [ep(1, ready=False, terminating=True), ep(2)]))
    assert stale_flows(before, after) == [Deletion(DNS, ENDPOINT_GONE, 53, VIP, b(1))]


# -- ports that gain their first usable endpoint -----------------------------------------------


def test_first_endpoint_clears_flows_to_the_bare_addresses() -> None:
    port = svc(type=ServiceType.LOAD_BALANCER, node_port=30053, external_ips=(EXT_IP,),
               load_balancer_ips=(LB_IP,))
    deletions = stale_flows(state((port, [])), state((port, [ep(1)])))
    assert {d.reason for d in deletions} == {NEWLY_SERVED}
    assert frontends(deletions) == {(str(VIP), 53), (str(EXT_IP), 53), (str(LB_IP), 53),
                                    ("*", 30053)}
    # Flows already DNATed to the new endpoint (sent after the write) are kept.
    assert all(d.endpoint is None and d.keep == {b(1)} for d in deletions)


def test_new_service_with_endpoints_is_newly_served() -> None:
    deletions = stale_flows(state(), state((svc(), [ep(1), ep(2)])))
    assert deletions == [Deletion(DNS, NEWLY_SERVED, 53, VIP, None, frozenset({b(1), b(2)}))]


def test_not_ready_to_ready_is_newly_served() -> None:
    before = state((svc(), [ep(1, ready=False, serving=False)]))
    after = state((svc(), [ep(1)]))
    assert [d.reason for d in stale_flows(before, after)] == [NEWLY_SERVED]


def test_more_endpoints_is_not_newly_served() -> None:
    assert stale_flows(state((svc(), [ep(1)])), state((svc(), [ep(1), ep(2)]))) == []


# -- protocols ---------------------------------------------------------------------------------


def test_tcp_is_ignored() -> None:
    web = svc(ServicePortName("t", "web", "http", Protocol.TCP), port=80)
    before = state((web, [ep(1, port=8080), ep(2, port=8080)]))
    assert before == {}
    assert stale_flows(before, state((web, [ep(2, port=8080)]))) == []
    assert stale_flows(state((web, [])), state((web, [ep(1, port=8080)]))) == []


def test_sctp_is_cleared_like_udp() -> None:
    name = ServicePortName("t", "sig", "", Protocol.SCTP)
    port = svc(name, port=3868)
    deletions = stale_flows(state((port, [ep(1, port=3868), ep(2, port=3868)])),
                            state((port, [ep(2, port=3868)])))
    assert deletions == [Deletion(name, ENDPOINT_GONE, 3868, VIP, b(1, 3868))]
    assert deletions[0].protocol is Protocol.SCTP


# -- traffic policies --------------------------------------------------------------------------


def test_etp_local_remote_endpoint_is_cleared_on_external_addresses_too() -> None:
    # Pod and node traffic to an eTP=Local Service's external addresses is sent to
    # every endpoint, so a remote one leaving can strand flows on them as well.
    port = svc(type=ServiceType.LOAD_BALANCER, node_port=30053, external_ips=(EXT_IP,),
               load_balancer_ips=(LB_IP,), external_policy_local=True)
    deletions = stale_flows(state((port, [ep(1), ep(3)])), state((port, [ep(1)])))
    assert {d.endpoint for d in deletions} == {b(3)}
    assert frontends(deletions) == {(str(VIP), 53), (str(EXT_IP), 53), (str(LB_IP), 53),
                                    ("*", 30053)}


def test_etp_local_gaining_a_local_endpoint_is_not_newly_served() -> None:
    # External traffic was DROPped (never tracked), the rest was already served by pod3.
    port = svc(type=ServiceType.NODE_PORT, node_port=30053, external_policy_local=True)
    assert stale_flows(state((port, [ep(3)])), state((port, [ep(3), ep(1)]))) == []


def test_itp_local_remote_endpoint_was_never_usable() -> None:
    port = svc(internal_policy_local=True)
    assert state((port, [ep(1), ep(3)]))[DNS].usable == {b(1)}
    assert stale_flows(state((port, [ep(1), ep(3)])), state((port, [ep(1)]))) == []
    # ...and the local endpoint going away is what empties it.
    assert stale_flows(state((port, [ep(1), ep(3)])), state((port, [ep(3)]))) == [
        Deletion(DNS, ENDPOINT_GONE, 53, VIP, b(1))]


# -- matching flows, and reconciling from nothing ----------------------------------------------


def flow(dst: IPAddress, dport: int, reply: tuple[IPAddress, int] | None = None, *,
         proto: Protocol = Protocol.UDP, sport: int = 40000) -> Flow:
    r_src, r_sport = reply if reply is not None else (dst, dport)
    return Flow(proto, CLIENT, sport, dst, dport, r_src, r_sport)


def test_deletion_matches_by_frontend_and_backend() -> None:
    gone = Deletion(DNS, ENDPOINT_GONE, 53, VIP, b(1))
    assert gone.matches(flow(VIP, 53, b(1)))
    assert not gone.matches(flow(VIP, 53, b(2)))
    assert not gone.matches(flow(VIP, 54, b(1)))
    assert not gone.matches(flow(EXT_IP, 53, b(1)))
    assert not gone.matches(flow(VIP, 53, b(1), proto=Protocol.TCP))
    assert gone.describe() == ("-p udp --orig-dst 198.18.200.53 --orig-port-dst 53 "
                               "--reply-src 198.18.1.1 --reply-port-src 5353")
    served = Deletion(DNS, NEWLY_SERVED, 53, VIP, keep=frozenset({b(1)}))
    assert served.matches(flow(VIP, 53))  # tracked to the address itself
    assert not served.matches(flow(VIP, 53, b(1)))


def test_node_port_matches_any_address_but_not_another_services_address() -> None:
    other = ip_address("198.18.200.99")
    current = state((svc(type=ServiceType.NODE_PORT, node_port=30053), [ep(1)]),
                    (svc(ServicePortName("t", "other", "", Protocol.UDP), cluster_ip=other,
                         port=30053), [ep(2, port=30053)]))
    m = Matcher(reconcile(current), service_addresses(current))
    node_ip = NODE.addresses[0]
    assert m.first_match(flow(node_ip, 30053)) is not None  # tracked to the node itself
    assert m.first_match(flow(ip_address("127.0.0.1"), 30053, b(2))) is not None
    assert m.first_match(flow(node_ip, 30053, b(1))) is None
    # ClusterIP port 30053 of "other", DNATed to its endpoint: not the NodePort's business.
    assert m.first_match(flow(other, 30053, b(2, 30053))) is None


def test_reconcile_deletes_flows_not_sent_to_a_usable_endpoint() -> None:
    empty = svc(ServicePortName("t", "empty", "", Protocol.UDP),
                cluster_ip=ip_address("198.18.200.54"))
    current = state((svc(), [ep(2)]), (empty, []))
    m = Matcher(reconcile(current), service_addresses(current))
    flows = {
        "to removed pod1": flow(VIP, 53, b(1)),
        "to live pod2": flow(VIP, 53, b(2)),
        "to the bare VIP": flow(VIP, 53),
        "to a service without endpoints": flow(empty.cluster_ip, 53, b(3)),
        "not a service": flow(ip_address("198.18.50.1"), 53),
        "tcp": flow(VIP, 53, proto=Protocol.TCP),
    }
    stale = {name for name, f in flows.items() if m.first_match(f) is not None}
    assert stale == {"to removed pod1", "to the bare VIP", "to a service without endpoints"}
    assert {d.reason for d in reconcile(current)} == {RECONCILE}


# -- the cleaner: state between syncs, the table, logs -----------------------------------------


@dataclass
class FakeTable:
    entries: list[Flow] = field(default_factory=list)
    opened: int = 0
    fail: bool = False
    deleted: list[Flow] = field(default_factory=list)

    def open(self, family: IPFamily) -> FakeTable:
        self.opened += 1
        if self.fail:
            raise OSError("ctnetlink unavailable")
        return self

    def flows(self, frontends: Sequence[tuple[Protocol, IPAddress | None, int]]) -> list[Flow]:
        return [f for f in self.entries if any(
            f.protocol is proto and f.orig_dport == port and addr in (None, f.orig_dst)
            for proto, addr, port in frontends)]

    def delete(self, f: Flow) -> bool:
        if f not in self.entries:
            return False
        self.entries.remove(f)
        self.deleted.append(f)
        return True

    def close(self) -> None:
        pass


def maps(*ports: tuple[ServicePort, Sequence[Endpoint]]) -> tuple[dict[Any, Any], dict[Any, Any]]:
    return {p.name: p for p, _ in ports}, {p.name: tuple(e) for p, e in ports}


def test_cleaner_reconciles_first_then_diffs(caplog: pytest.LogCaptureFixture) -> None:
    table = FakeTable([flow(VIP, 53, b(1), sport=1), flow(VIP, 53, b(2), sport=2),
                       flow(VIP, 53, sport=3)])
    cleaner = StaleFlowCleaner(NODE, open_table=table.open)
    # First sync: no record of the past, so the table is checked against the state.
    result = cleaner.after_sync(*maps((svc(), [ep(1), ep(2)])))
    assert result.reconciled and result.deleted == 1
    assert table.deleted == [flow(VIP, 53, sport=3)]
    # Nothing changed: the table is not even opened.
    opened = table.opened
    assert cleaner.after_sync(*maps((svc(), [ep(1), ep(2)]))).deleted == 0
    assert table.opened == opened
    # pod1 removed: only its flow goes.
    caplog.set_level(logging.INFO, logger="pyproxy.conntrack")
    result = cleaner.after_sync(*maps((svc(), [ep(2)])))
    assert not result.reconciled and result.deleted == 1
    assert table.entries == [flow(VIP, 53, b(2), sport=2)]
    [record] = [r for r in caplog.records if r.getMessage() == "deleted stale conntrack entries"]
    assert record.__dict__["service"] == "t/dns"
    assert record.__dict__["reason"] == ENDPOINT_GONE
    assert record.__dict__["entries"] == 1


def test_cleaner_failure_raises_and_reconciles_next_time() -> None:
    table = FakeTable([flow(VIP, 53, b(1))], fail=True)
    cleaner = StaleFlowCleaner(NODE, open_table=table.open)
    with pytest.raises(OSError):
        cleaner.after_sync(*maps((svc(), [ep(2)])))
    assert cleaner.previous is None
    table.fail = False
    assert cleaner.after_sync(*maps((svc(), [ep(2)]))).reconciled
    assert table.entries == []


def test_cleaner_keeps_its_own_copy_of_the_live_maps() -> None:
    services, endpoints = maps((svc(), [ep(1), ep(2)]))
    table = FakeTable()
    cleaner = StaleFlowCleaner(NODE, open_table=table.open)
    cleaner.after_sync(services, endpoints)
    endpoints[DNS] = (ep(2),)  # the tracker mutates its maps in place
    table.entries = [flow(VIP, 53, b(1))]
    assert cleaner.after_sync(services, endpoints).deleted == 1


# -- the dataplane calls it after a successful write, and survives its failure ----------------


@dataclass
class FakeRunner:
    fail_restore: bool = False
    calls: list[str] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], stdin: str | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv[0])
        rc = 1 if self.fail_restore and "restore" in argv[0] else 0
        return subprocess.CompletedProcess(list(argv), rc, "", "boom" if rc else "")


@dataclass
class RecordingCleaner(StaleFlowCleaner):
    calls: list[str] = field(default_factory=list)
    raise_error: bool = False

    def after_sync(self, services: Any, endpoints: Any, changed: Any = None) -> Any:
        self.calls.append("after_sync")
        if self.raise_error:
            raise OSError("netlink says no")
        return super().after_sync(services, endpoints, changed)


def dataplane(runner: FakeRunner, cleaner: StaleFlowCleaner) -> IPTablesDataplane:
    # localhost_node_ports off: a full sync would otherwise set a sysctl on this host.
    ctx = PlanContext(NODE, localhost_node_ports=False)
    return IPTablesDataplane(IPTables(Backend.NFT, runner=runner), ctx, conntrack=cleaner)


def snapshot(*ports: tuple[ServicePort, Sequence[Endpoint]]) -> Snapshot:
    services, endpoints = maps(*ports)
    return Snapshot(services, endpoints, frozenset({("t", "dns")}), frozenset(services))


def test_dataplane_cleans_after_restore_and_never_fails_for_it(
        caplog: pytest.LogCaptureFixture) -> None:
    table = FakeTable([flow(VIP, 53, sport=7)])
    runner = FakeRunner()

    def open_table(family: IPFamily) -> FakeTable:
        runner.calls.append("conntrack")
        return table.open(family)

    cleaner = RecordingCleaner(NODE, open_table=open_table)
    dp = dataplane(runner, cleaner)
    result = dp.sync(snapshot((svc(), [ep(1)])), full=True)
    assert cleaner.calls == ["after_sync"]
    assert runner.calls[-2:] == ["iptables-nft-restore", "conntrack"], runner.calls
    assert result.conntrack_deleted == 1 and not result.conntrack_failed
    cleaner.raise_error = True
    result = dp.sync(snapshot((svc(), [ep(2)])), full=False)
    assert result.conntrack_failed and result.conntrack_deleted == 0
    assert "could not delete stale conntrack entries" in caplog.text


def test_dataplane_skips_cleanup_when_the_write_fails() -> None:
    cleaner = RecordingCleaner(NODE, open_table=FakeTable().open)
    cleaner.previous = {}
    dp = dataplane(FakeRunner(fail_restore=True), cleaner)
    with pytest.raises(Exception, match="boom"):
        dp.sync(snapshot((svc(), [ep(1)])), full=True)
    assert cleaner.calls == []
    assert cleaner.previous is None, "after a failed write the next cleanup must reconcile"


def test_set_context_moves_the_cleaner_to_the_new_node() -> None:
    cleaner = StaleFlowCleaner(NODE, open_table=FakeTable().open)
    dp = dataplane(FakeRunner(), cleaner)
    moved = replace(NODE, name="node-b")
    dp.set_context(PlanContext(moved, localhost_node_ports=False))
    assert cleaner.node == moved
