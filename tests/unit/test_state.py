"""/state: per service port, what is programmed and why endpoints are (not) used.

`build_state` is pure, so most tests call it on hand-made service ports and
endpoints; the last ones go through the Agent (a stub dataplane, no kernel)
and over HTTP on a loopback port the OS picks. The end-to-end check against
`pyproxy run` in a network namespace is tests/kernel/test_state_http.py.
"""

from __future__ import annotations

import datetime
import http.client
import json
import threading
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import ip_address, ip_network
from types import SimpleNamespace
from typing import Any

import pytest

from pyproxy.agent import Agent
from pyproxy.config import HostPort, load_config
from pyproxy.iptables.plan import PlanContext, Planner, chain_name
from pyproxy.ipvs.plan import IPVSContext
from pyproxy.ipvs.plan import plan as ipvs_plan
from pyproxy.model import (
    Endpoint,
    IPFamily,
    NodeInfo,
    Protocol,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from pyproxy.serve import MetricsServer
from pyproxy.state import (
    FailureInfo,
    SyncInfo,
    build_state,
    service_state,
    virtual_servers_by_service,
)
from pyproxy.tracker import Snapshot

NODE = NodeInfo("node-a", (ip_address("198.18.100.1"),), zone="zone-a")
WEB = ServicePortName("t", "web", "http", Protocol.TCP)


def port(name: str = "web", *, ip: str = "198.18.200.10", **kw: Any) -> ServicePort:
    spn = ServicePortName("t", name, "http", Protocol.TCP)
    return ServicePort(spn, IPFamily.IPv4, kw.pop("type", ServiceType.CLUSTER_IP),
                       ip_address(ip), 80, **kw)


def ep(last: int, *, local: bool = True, **kw: Any) -> Endpoint:
    return Endpoint(ip_address(f"198.18.1.{last}"), 8080, is_local=local,
                    node_name="node-a" if local else "node-b", **kw)


def addresses(entries: Sequence[dict[str, Any]]) -> list[str]:
    return [e["address"] for e in entries]


def reasons(entry: dict[str, Any]) -> dict[str, str]:
    return {e["address"]: e["reason"] for e in entry["endpoints"]["notInUse"]}


# -- one service port ----------------------------------------------------------------------------


def test_ready_endpoints_in_use_others_named_with_the_reason() -> None:
    endpoints = [
        ep(1),
        ep(2, ready=False, serving=False),  # not ready
        ep(3, ready=False, serving=True, terminating=True),  # fallback only
        ep(4, ready=False, serving=False, terminating=True),  # going away
    ]
    entry = service_state(port(), endpoints, NODE, chains=("PYPROXY-SVC-X", "PYPROXY-SEP-Y"))
    assert entry["service"] == "t/web:http/TCP"
    assert entry["status"] == "ok"
    assert entry["addresses"] == {"clusterIP": "198.18.200.10:80"}
    assert addresses(entry["endpoints"]["inUse"]) == ["198.18.1.1:8080"]
    assert entry["endpoints"]["inUse"][0]["traffic"] == ["internal"]
    assert reasons(entry) == {
        "198.18.1.2:8080": "not ready",
        "198.18.1.3:8080": "terminating (used only as fallback, while no endpoint is ready)",
        "198.18.1.4:8080": "terminating, not serving",
    }
    assert entry["chains"] == ["PYPROXY-SVC-X", "PYPROXY-SEP-Y"]
    json.dumps(entry)  # plain JSON all the way down


def test_terminating_endpoints_are_used_when_none_is_ready() -> None:
    endpoints = [ep(1, ready=False, serving=True, terminating=True),
                 ep(2, ready=False, serving=False, terminating=True)]
    entry = service_state(port(), endpoints, NODE)
    (used,) = entry["endpoints"]["inUse"]
    assert used["address"] == "198.18.1.1:8080"
    assert used["terminating"] is True and "fallback" in used["note"]
    assert reasons(entry) == {"198.18.1.2:8080": "terminating, not serving"}


def test_no_endpoints_is_rejected() -> None:
    entry = service_state(port(), [], NODE)
    assert entry["status"] == "no endpoints: connections are rejected"
    assert entry["endpoints"] == {"inUse": [], "notInUse": []}


def test_external_traffic_policy_local_uses_remote_endpoints_for_internal_traffic_only() -> None:
    svc = port(type=ServiceType.LOAD_BALANCER, node_port=30080, external_policy_local=True,
               external_ips=(ip_address("198.18.201.10"),),
               load_balancer_ips=(ip_address("198.18.202.10"),),
               load_balancer_source_ranges=(ip_network("198.18.100.0/24"),),
               health_check_node_port=32000)
    entry = service_state(svc, [ep(1), ep(3, local=False)], NODE)
    assert entry["addresses"] == {
        "clusterIP": "198.18.200.10:80",
        "externalIPs": ["198.18.201.10:80"],
        "loadBalancerIPs": ["198.18.202.10:80"],
        "loadBalancerSourceRanges": ["198.18.100.0/24"],
        "nodePort": 30080,
        "healthCheckNodePort": 32000,
    }
    assert entry["trafficPolicy"] == {"internal": "Cluster", "external": "Local"}
    local, remote = entry["endpoints"]["inUse"]
    assert local["traffic"] == ["internal", "external"]
    assert remote["traffic"] == ["internal"]
    assert remote["notForExternal"] == "not local (externalTrafficPolicy: Local)"
    assert entry["status"] == "ok"


def test_external_traffic_policy_local_without_local_endpoint_drops_external_traffic() -> None:
    svc = port(type=ServiceType.NODE_PORT, node_port=30082, external_policy_local=True)
    entry = service_state(svc, [ep(3, local=False)], NODE)
    assert entry["status"] == "no local endpoints: external traffic is dropped"
    assert addresses(entry["endpoints"]["inUse"]) == ["198.18.1.3:8080"]


def test_internal_traffic_policy_local() -> None:
    svc = port(internal_policy_local=True)
    entry = service_state(svc, [ep(1), ep(3, local=False)], NODE)
    assert addresses(entry["endpoints"]["inUse"]) == ["198.18.1.1:8080"]
    assert reasons(entry) == {"198.18.1.3:8080": "not local (internalTrafficPolicy: Local)"}
    only_remote = service_state(svc, [ep(3, local=False)], NODE)
    assert only_remote["status"] == "no local endpoints: internal traffic is dropped"


def test_topology_hints_filter_endpoints_of_other_zones() -> None:
    endpoints = [ep(1, zone_hints=("zone-a",)), ep(2, zone_hints=("zone-b",))]
    entry = service_state(port(topology_aware=True), endpoints, NODE)
    assert addresses(entry["endpoints"]["inUse"]) == ["198.18.1.1:8080"]
    assert reasons(entry) == {"198.18.1.2:8080": "filtered by topology hints (not for zone zone-a)"}
    node_hints = [ep(1, node_hints=("node-a",)), ep(2, node_hints=("node-b",))]
    entry = service_state(port(prefer_same_node=True), node_hints, NODE)
    assert reasons(entry) == {"198.18.1.2:8080": "filtered by topology hints (not for node node-a)"}


def test_ipvs_mode_lists_virtual_servers() -> None:
    svc = port(type=ServiceType.NODE_PORT, node_port=30080, affinity_timeout=600)
    ctx = IPVSContext(NODE, node_port_addresses=NODE.addresses)
    planned = ipvs_plan({svc.name: svc}, {svc.name: (ep(1), ep(2))}, ctx)
    by_service = virtual_servers_by_service(planned.virtual_servers)
    entry = service_state(svc, [ep(1), ep(2)], NODE, mode="ipvs",
                          virtual_servers=by_service[svc.name])
    assert "chains" not in entry
    assert entry["virtualServers"] == [
        {"virtualServer": "tcp/198.18.100.1:30080", "scheduler": "rr", "persistence": 600,
         "realServers": ["198.18.1.1:8080", "198.18.1.2:8080"]},
        {"virtualServer": "tcp/198.18.200.10:80", "scheduler": "rr", "persistence": 600,
         "realServers": ["198.18.1.1:8080", "198.18.1.2:8080"]},
    ]
    assert entry["sessionAffinityTimeout"] == 600


# -- the whole document --------------------------------------------------------------------------


def test_build_state_document() -> None:
    web, empty = port(), port("empty", ip="198.18.200.11")
    at = datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC).timestamp()
    synced = SyncInfo(at, full=False, last_full=at - 30,
                      chains={web.name: ("PYPROXY-SVC-A",)})
    doc = build_state({empty.name: empty, web.name: web}, {web.name: (ep(1),)}, NODE,
                      mode="iptables", synced=synced,
                      failure=FailureInfo(at + 1, "iptables-restore failed"))
    assert doc["node"] == "node-a" and doc["mode"] == "iptables"
    assert doc["lastSync"] == {"time": "2026-01-02T03:04:05.678Z", "unix": round(at, 3),
                               "full": False}
    assert doc["lastFullSync"]["time"] == "2026-01-02T03:03:35.678Z"
    assert doc["lastFailedSync"]["error"] == "iptables-restore failed"
    assert [p["service"] for p in doc["servicePorts"]] == ["t/empty:http/TCP", "t/web:http/TCP"]
    assert doc["servicePorts"][1]["chains"] == ["PYPROXY-SVC-A"]
    assert doc["servicePorts"][0]["chains"] == []
    json.dumps(doc)


def test_before_the_first_sync() -> None:
    doc = build_state({}, {}, NODE, mode="iptables", synced=None)
    assert doc["lastSync"] is None and doc["lastFullSync"] is None
    assert doc["servicePorts"] == []


# -- through the agent -----------------------------------------------------------------------


class StubDataplane:
    """Plans like the iptables dataplane, touches no kernel."""

    def __init__(self, ctx: PlanContext, fail: bool = False) -> None:
        self.ctx = ctx
        self.fail = fail

    def sync(self, snapshot: Snapshot, *, full: bool) -> Any:
        if self.fail:
            raise RuntimeError("iptables-restore failed (exit 1)")
        plan = Planner(self.ctx).plan(snapshot.services, snapshot.endpoints)
        return SimpleNamespace(plan=plan, lines_written=0, full=full)


def service_obj(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "t"},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                "protocol": "TCP"}]}}


def slice_obj(service: str, ips: Sequence[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-a", "namespace": "t",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "nodeName": "node-a"} for ip in ips],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


@pytest.fixture
def agent() -> Agent:
    config, _ = load_config(None, {})
    config = replace(config, metrics_bind_address=HostPort("127.0.0.1", 0),
                     healthz_bind_address=HostPort("127.0.0.1", 0))
    dp = StubDataplane(PlanContext(NODE, localhost_node_ports=False))
    a = Agent(config, "node-a", dp)  # type: ignore[arg-type]
    a.tracker.replace([service_obj("web", "198.18.200.10")],
                      [slice_obj("web", ["198.18.1.1", "198.18.1.2"])])
    return a


def test_agent_state_after_a_sync_names_the_planned_chains(agent: Agent) -> None:
    assert agent.state()["lastSync"] is None
    agent.reconciler.sync_once(full=True)
    doc = agent.state()
    assert doc["lastSync"]["full"] is True
    assert doc["lastFullSync"] == {k: doc["lastSync"][k] for k in ("time", "unix")}
    (web,) = doc["servicePorts"]
    assert addresses(web["endpoints"]["inUse"]) == ["198.18.1.1:8080", "198.18.1.2:8080"]
    assert chain_name("SVC", WEB) in web["chains"]
    assert chain_name("SEP", WEB, "198.18.1.1:8080") in web["chains"]


def test_agent_state_reports_a_failed_sync_until_the_next_success(agent: Agent) -> None:
    agent.reconciler.sync_once(full=True)
    agent.dataplane.fail = True  # type: ignore[union-attr]
    with pytest.raises(RuntimeError):
        agent.reconciler.sync_once(full=False)
    doc = agent.state()
    assert "iptables-restore failed" in doc["lastFailedSync"]["error"]
    assert doc["lastSync"] is not None
    agent.dataplane.fail = False  # type: ignore[union-attr]
    agent.reconciler.sync_once(full=False)
    assert agent.state()["lastFailedSync"] is None


def test_state_is_served_next_to_metrics(agent: Agent) -> None:
    agent.reconciler.sync_once(full=True)
    agent.start_servers()
    try:
        metrics = next(s for s in agent._servers if isinstance(s, MetricsServer))
        conn = http.client.HTTPConnection("127.0.0.1", metrics.port, timeout=5)
        conn.request("GET", "/state")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("application/json")
        doc = json.loads(resp.read())
        assert doc["servicePorts"][0]["service"] == "t/web:http/TCP"
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 200
    finally:
        agent.close()
    assert not [t for t in threading.enumerate() if t.name == "pyproxy-metrics" and t.is_alive()]
