"""Health, metrics and per-service health-check listeners, over loopback on ephemeral ports.

Health logic runs on a fake clock; the HTTP tests talk to real listeners on
127.0.0.1 so status codes, headers and JSON bodies are checked as a probe or
load balancer would see them.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyproxy.iptables.ruleset import Ruleset, Table
from pyproxy.model import (
    Endpoint,
    IPFamily,
    Protocol,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from pyproxy.reconciler import Reconciler
from pyproxy.serve import (
    HealthServer,
    Metrics,
    MetricsServer,
    ProxyHealth,
    ServiceHealthServers,
    health_check_targets,
    rfc3339,
)
from pyproxy.tracker import ChangeTracker

WALL0 = 1_700_000_000.0  # a fixed Unix time for the fake wall clock


class FakeClock:
    """Monotonic and wall clocks that move together, only when told."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL0 + self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> ProxyHealth:
    return ProxyHealth(sync_period=30.0, clock=clock, wall_clock=clock.wall)


def succeed(h: Any, clock: FakeClock, *, took: float = 0.5, changes: list[float] | None = None,
            full: bool = True, result: Any = None) -> None:
    started = clock()
    clock.advance(took)
    h.sync_succeeded(result, full=full, started=started, finished=clock(),
                     change_times=changes or [])


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- ProxyHealth ------------------------------------------------------------------


def test_healthy_at_start_until_timeout_without_a_sync(health: ProxyHealth,
                                                       clock: FakeClock) -> None:
    assert health.health_timeout == 60.0
    assert health.is_healthy()
    clock.advance(59)
    assert health.is_healthy()
    clock.advance(1)
    assert not health.is_healthy()  # never synced within 2 x syncPeriod of start
    succeed(health, clock)
    assert health.is_healthy()


def test_queued_change_turns_unhealthy_only_when_sync_is_late(health: ProxyHealth,
                                                            clock: FakeClock) -> None:
    succeed(health, clock)
    clock.advance(1000)
    assert health.is_healthy()  # quiet cluster: no change, no staleness
    health.change_queued(clock())
    clock.advance(30)
    health.change_queued(clock())  # a newer change must not reset the oldest one
    clock.advance(29.9)
    assert health.is_healthy()
    clock.advance(0.2)
    assert not health.is_healthy()
    succeed(health, clock)
    assert health.is_healthy()


def test_change_queued_during_a_sync_stays_pending(health: ProxyHealth,
                                                   clock: FakeClock) -> None:
    started = clock()
    clock.advance(1)
    health.change_queued(clock())  # arrived while the sync ran: not in it
    clock.advance(1)
    health.sync_succeeded(None, full=False, started=started, finished=clock(), change_times=[])
    clock.advance(58.5)  # 59.5 s after the change
    assert health.is_healthy()
    clock.advance(1)
    assert not health.is_healthy()


def test_set_sync_period_moves_the_timeout(health: ProxyHealth, clock: FakeClock) -> None:
    succeed(health, clock)
    health.change_queued(clock())
    clock.advance(15)
    assert health.is_healthy()
    health.set_sync_period(5.0)
    assert health.health_timeout == 10.0
    assert not health.is_healthy()


def test_failing_syncs_turn_unhealthy_without_new_changes(health: ProxyHealth,
                                                          clock: FakeClock) -> None:
    succeed(health, clock)
    health.sync_failed(RuntimeError("iptables-restore: exit 1"), full=True)
    clock.advance(30)
    health.sync_failed(RuntimeError("again"), full=True)  # must not restart the clock
    clock.advance(31)
    assert not health.is_healthy()
    succeed(health, clock)
    assert health.is_healthy()


def test_sync_node_reads_deletion_and_autoscaler_taint(health: ProxyHealth) -> None:
    health.sync_node({"metadata": {"name": "n1"}, "spec": {}})
    assert not health.node_draining
    health.sync_node({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}})
    assert health.node_draining
    health.sync_node({"metadata": {}, "spec": {"taints": [
        {"key": "other", "effect": "NoSchedule"},
        {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"},
    ]}})
    assert health.node_draining
    health.sync_node(None)
    assert not health.node_draining
    health.node_draining = True
    assert health.status().healthy  # draining is the node's state, not the proxy's
    assert not health.status().node_eligible


def test_rfc3339() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(None) == "0001-01-01T00:00:00Z"


# -- HealthServer -------------------------------------------------------------------


@pytest.fixture
def health_server(health: ProxyHealth) -> Iterator[HealthServer]:
    metrics = Metrics(runtime_metrics=False)
    server = HealthServer(health, ("127.0.0.1", 0), metrics=metrics)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_healthz_and_livez_ok(health_server: HealthServer, health: ProxyHealth,
                              clock: FakeClock) -> None:
    succeed(health, clock)
    assert health_server.port > 0
    for path in ("/healthz", "/livez"):
        status, headers, body = get(health_server.port, path)
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Content-Type-Options"] == "nosniff"
        doc = json.loads(body)
        assert doc["healthy"] is True
        assert doc["nodeEligible"] is True
        assert doc["currentTime"] == rfc3339(clock.wall())
        assert doc["lastUpdated"] == doc["currentTime"]  # upstream: "recent" when healthy


def test_healthz_503_when_stale_with_last_update(health_server: HealthServer,
                                                 health: ProxyHealth, clock: FakeClock) -> None:
    succeed(health, clock)
    synced_at = clock.wall()
    health.change_queued(clock())
    clock.advance(61)
    for path in ("/healthz", "/livez"):
        status, _, body = get(health_server.port, path)
        assert status == 503
        doc = json.loads(body)
        assert doc["healthy"] is False
        assert doc["lastUpdated"] == rfc3339(synced_at)
        assert doc["currentTime"] == rfc3339(clock.wall())


def test_draining_node_fails_healthz_not_livez(health_server: HealthServer,
                                               health: ProxyHealth, clock: FakeClock) -> None:
    succeed(health, clock)
    health.node_draining = True
    status, _, body = get(health_server.port, "/healthz")
    assert status == 503
    assert json.loads(body)["nodeEligible"] is False
    status, _, body = get(health_server.port, "/livez")
    assert status == 200
    assert json.loads(body)["healthy"] is True


def test_health_server_counts_probes_and_404s(health_server: HealthServer,
                                              health: ProxyHealth, clock: FakeClock) -> None:
    succeed(health, clock)
    assert get(health_server.port, "/healthz")[0] == 200
    assert get(health_server.port, "/healthz?verbose")[0] == 200
    status, _, body = get(health_server.port, "/livez", method="HEAD")
    assert (status, body) == (200, b"")
    assert get(health_server.port, "/nope")[0] == 404
    metrics = health_server.metrics
    assert metrics is not None
    samples = samples_of(metrics)
    assert samples[("kubeproxy_proxy_healthz_total", (("code", "200"),))] == 2
    assert samples[("kubeproxy_proxy_livez_total", (("code", "200"),))] == 1


def test_stop_frees_the_port(health: ProxyHealth) -> None:
    server = HealthServer(health, ("127.0.0.1", 0))
    server.start()
    port = server.port
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        get(port, "/healthz")
    again = HealthServer(health, ("127.0.0.1", port))
    again.start()  # rebinding the same port works right away
    again.stop()


# -- Metrics ------------------------------------------------------------------------


def samples_of(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fake_result(lines: int = 42, nat: int = 7, filt: int = 3, no_local: Any = 2) -> Any:
    rs = Ruleset()
    rs.table(Table.NAT)["PYPROXY-SERVICES"] = tuple(f"-j X{i}" for i in range(nat))
    rs.table(Table.FILTER)["PYPROXY-FORWARD"] = tuple(f"-j Y{i}" for i in range(filt))
    plan = SimpleNamespace(ruleset=rs, no_local_endpoints=no_local)
    return SimpleNamespace(full=True, lines_written=lines, plan=plan)


KUBE_PROXY_NAMES = [
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "kubeproxy_network_programming_duration_seconds",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
    "kubeproxy_sync_proxy_rules_iptables_total",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    "kubeproxy_sync_proxy_rules_service_changes_total",
    "pyproxy_invalid_objects_total",
    "pyproxy_sync_lines_written",
]


def test_metrics_after_a_sync(clock: FakeClock) -> None:
    m = Metrics(clock=clock, wall_clock=clock.wall)
    m.change_queued(clock())
    queued_wall = clock.wall()
    succeed(m, clock, took=0.25, result=fake_result())
    m.sync_failed(RuntimeError("boom"), full=False)
    m.set_endpoint_changes_pending(4)
    m.set_service_changes_pending(1)
    m.inc_endpoint_changes(3)
    m.inc_service_changes()
    m.invalid_object("Service")
    m.invalid_object("Service")

    text = m.exposition().decode()
    for name in KUBE_PROXY_NAMES:
        assert name in text, name
    assert "process_resident_memory_bytes" in text  # runtime collectors on by default

    s = samples_of(m)
    assert s[("kubeproxy_sync_proxy_rules_duration_seconds_count", ())] == 1
    assert s[("kubeproxy_sync_proxy_rules_duration_seconds_sum", ())] == pytest.approx(0.25)
    assert s[("kubeproxy_sync_full_proxy_rules_duration_seconds_count", ())] == 1
    assert s[("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", ())] == 0
    assert s[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ())] == clock.wall()
    assert s[("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", ())] == queued_wall
    assert s[("kubeproxy_sync_proxy_rules_iptables_total", (("table", "nat"),))] == 7
    assert s[("kubeproxy_sync_proxy_rules_iptables_total", (("table", "filter"),))] == 3
    for policy in ("internal", "external"):  # only a total is known: both labels get it
        key = ("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
               (("traffic_policy", policy),))
        assert s[key] == 2
    assert s[("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ())] == 1
    assert s[("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", ())] == 1
    assert s[("kubeproxy_sync_proxy_rules_endpoint_changes_pending", ())] == 4
    assert s[("kubeproxy_sync_proxy_rules_service_changes_pending", ())] == 1
    assert s[("kubeproxy_sync_proxy_rules_endpoint_changes_total", ())] == 3
    assert s[("kubeproxy_sync_proxy_rules_service_changes_total", ())] == 1
    assert s[("pyproxy_invalid_objects_total", (("kind", "Service"),))] == 2
    assert s[("pyproxy_sync_lines_written_count", ())] == 1
    assert s[("pyproxy_sync_lines_written_sum", ())] == 42


def test_full_sync_failure_is_not_a_partial_failure() -> None:
    m = Metrics(runtime_metrics=False)
    m.sync_failed(RuntimeError("boom"), full=True)
    s = samples_of(m)
    assert s[("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ())] == 1
    assert s[("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", ())] == 0


def test_network_programming_latency_per_change(clock: FakeClock) -> None:
    m = Metrics(clock=clock, wall_clock=clock.wall, runtime_metrics=False)
    t0 = clock()
    changes = [t0, t0 + 2.0, t0 + 4.5]
    clock.advance(4.5)
    succeed(m, clock, took=0.5, changes=changes, full=False)  # finished = t0 + 5
    s = samples_of(m)
    name = "kubeproxy_network_programming_duration_seconds"
    assert s[(f"{name}_count", ())] == 3
    assert s[(f"{name}_sum", ())] == pytest.approx(5.0 + 3.0 + 0.5)
    assert s[(f"{name}_bucket", (("le", "0.5"),))] == 1
    assert s[(f"{name}_bucket", (("le", "3.0"),))] == 2
    assert s[(f"{name}_bucket", (("le", "5.0"),))] == 3
    assert s[("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", ())] == 1


def test_metrics_tolerate_other_result_shapes(clock: FakeClock, caplog: Any) -> None:
    m = Metrics(clock=clock, wall_clock=clock.wall, runtime_metrics=False)
    succeed(m, clock, result=None)
    ipvs_like = SimpleNamespace(rule_counts={"filter": 1, "nat": 5},
                                no_local_endpoints={"internal": 1, "external": 4})
    succeed(m, clock, result=ipvs_like)

    class Broken:
        @property
        def lines_written(self) -> int:
            raise RuntimeError("not this one")

    with caplog.at_level(logging.WARNING, logger="pyproxy.serve"):
        succeed(m, clock, result=Broken())
    assert "could not read metrics" in caplog.text
    s = samples_of(m)
    assert s[("kubeproxy_sync_proxy_rules_duration_seconds_count", ())] == 3
    assert s[("kubeproxy_sync_proxy_rules_iptables_total", (("table", "nat"),))] == 5
    key = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    assert s[(key, (("traffic_policy", "internal"),))] == 1
    assert s[(key, (("traffic_policy", "external"),))] == 4


def test_reconciler_drives_health_and_metrics(clock: FakeClock) -> None:
    health = ProxyHealth(clock=clock, wall_clock=clock.wall)
    metrics = Metrics(clock=clock, wall_clock=clock.wall, runtime_metrics=False)

    class Dataplane:
        def sync(self, snapshot: Any, *, full: bool) -> Any:
            clock.advance(0.1)
            return fake_result(lines=10)

    rec = Reconciler(ChangeTracker(node_name="n1"), Dataplane(), clock=clock,
                     observers=[health, metrics])
    rec.changed()
    clock.advance(1)
    rec.sync_once()
    s = samples_of(metrics)
    assert s[("kubeproxy_network_programming_duration_seconds_count", ())] == 1
    assert s[("kubeproxy_network_programming_duration_seconds_sum", ())] == pytest.approx(1.1)
    assert s[("kubeproxy_sync_full_proxy_rules_duration_seconds_count", ())] == 1
    clock.advance(1000)
    assert health.is_healthy()


# -- MetricsServer ------------------------------------------------------------------


def test_metrics_server_serves_text_and_extra_routes() -> None:
    m = Metrics(runtime_metrics=False)
    m.invalid_object("EndpointSlice")
    server = MetricsServer(m, ("127.0.0.1", 0))
    server.start()
    try:
        status, headers, body = get(server.port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        assert b'pyproxy_invalid_objects_total{kind="EndpointSlice"} 1.0' in body
        assert get(server.port, "/healthz")[:3:2] == (200, b"ok")
        server.add_route("/state", lambda: (200, "application/json", b'{"ok": 1}'))
        assert get(server.port, "/state")[::2] == (200, b'{"ok": 1}')

        def broken() -> tuple[int, str, bytes]:
            raise RuntimeError("bug")

        server.add_route("/broken", broken)
        assert get(server.port, "/broken")[0] == 500
        assert get(server.port, "/metrics")[0] == 200  # still serving
    finally:
        server.stop()


# -- service health checks ------------------------------------------------------------


def spn(ns: str, name: str, port: str = "") -> ServicePortName:
    return ServicePortName(ns, name, port, Protocol.TCP)


def svc_port(name: ServicePortName, *, hc: int, local: bool = True,
             type_: ServiceType = ServiceType.LOAD_BALANCER) -> ServicePort:
    return ServicePort(name=name, family=IPFamily.IPv4, type=type_,
                       cluster_ip=ipaddress.ip_address("10.96.0.10"), port=80, node_port=30080,
                       external_policy_local=local, health_check_node_port=hc)


def ep(ip: str, port: int = 8080, *, local: bool = True, ready: bool = True) -> Endpoint:
    return Endpoint(ip=ipaddress.ip_address(ip), port=port, ready=ready, is_local=local)


def test_health_check_targets() -> None:
    web_http, web_https = spn("default", "web", "http"), spn("default", "web", "https")
    services = {
        web_http: svc_port(web_http, hc=32000),
        web_https: svc_port(web_https, hc=32000),
        spn("default", "empty"): svc_port(spn("default", "empty"), hc=32001),
        spn("default", "cluster"): svc_port(spn("default", "cluster"), hc=0, local=False),
        spn("default", "np"): svc_port(spn("default", "np"), hc=32002,
                                       type_=ServiceType.NODE_PORT),
    }
    endpoints = {
        # One pod serving two ports counts once, as upstream's LocalReadyEndpoints.
        web_http: [ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.1.1", local=False),
                   ep("10.0.0.3", ready=False)],
        web_https: [ep("10.0.0.1", 8443)],
        spn("default", "cluster"): [ep("10.0.0.9")],
    }
    ports, counts = health_check_targets(services, endpoints)
    assert ports == {("default", "web"): 32000, ("default", "empty"): 32001}
    assert counts == {("default", "web"): 2, ("default", "empty"): 0}


@pytest.fixture
def hc_servers() -> Iterator[ServiceHealthServers]:
    servers = ServiceHealthServers("127.0.0.1")
    try:
        yield servers
    finally:
        servers.close()


def test_service_health_answers_by_local_endpoints(hc_servers: ServiceHealthServers) -> None:
    web, db = ("default", "web"), ("prod", "db")
    p1, p2 = free_port(), free_port()
    hc_servers.update({web: p1, db: p2})
    assert hc_servers.ports == {web: p1, db: p2}
    hc_servers.update_endpoints({web: 2})

    status, headers, body = get(p1, "/any/path")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert json.loads(body) == {"service": {"namespace": "default", "name": "web"},
                                "localEndpoints": 2, "serviceProxyHealthy": True}
    status, _, body = get(p2, "/")
    assert status == 503
    assert json.loads(body)["localEndpoints"] == 0

    hc_servers.update_endpoints({db: 1})
    assert get(p1, "/")[0] == 503
    assert get(p2, "/")[0] == 200


def test_service_health_follows_proxy_health(clock: FakeClock) -> None:
    health = ProxyHealth(clock=clock, wall_clock=clock.wall)
    servers = ServiceHealthServers("127.0.0.1", proxy_healthy=health.is_healthy)
    try:
        port = free_port()
        servers.update({("ns", "svc"): port})
        servers.update_endpoints({("ns", "svc"): 1})
        succeed(health, clock)
        assert get(port, "/")[0] == 200
        health.change_queued(clock())
        clock.advance(61)
        status, _, body = get(port, "/")
        assert status == 503
        assert json.loads(body)["serviceProxyHealthy"] is False
    finally:
        servers.close()


def test_service_health_opens_and_closes_listeners(hc_servers: ServiceHealthServers) -> None:
    a, b = ("ns", "a"), ("ns", "b")
    pa, pb, pa2 = free_port(), free_port(), free_port()
    hc_servers.update({a: pa, b: pb})
    hc_servers.update({a: pa2})  # b deleted, a's port changed
    assert hc_servers.ports == {a: pa2}
    for gone in (pa, pb):
        with pytest.raises(ConnectionRefusedError):
            get(gone, "/")
    assert get(pa2, "/")[0] == 503
    hc_servers.update({b: pa2})  # a port moving between Services in one update
    assert hc_servers.ports == {b: pa2}
    assert json.loads(get(pa2, "/")[2])["service"]["name"] == "b"
    hc_servers.close()
    assert hc_servers.ports == {}
    with pytest.raises(ConnectionRefusedError):
        get(pa2, "/")


def test_service_health_bind_conflict_is_not_fatal(hc_servers: ServiceHealthServers,
                                                   caplog: Any) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ok_port = free_port()
        with caplog.at_level(logging.ERROR, logger="pyproxy.serve"):
            hc_servers.update({("ns", "blocked"): taken, ("ns", "fine"): ok_port})
        assert hc_servers.ports == {("ns", "fine"): ok_port}
        failures = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(failures) == 1
        assert getattr(failures[0], "service", None) == "ns/blocked"
        assert getattr(failures[0], "port", None) == taken
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="pyproxy.serve"):
            hc_servers.update({("ns", "blocked"): taken, ("ns", "fine"): ok_port})
        assert not caplog.records  # retried quietly, not logged every sync
    hc_servers.update({("ns", "blocked"): taken, ("ns", "fine"): ok_port})
    assert hc_servers.ports == {("ns", "blocked"): taken, ("ns", "fine"): ok_port}
