"""Health checks and Prometheus metrics: what the node's probes and dashboards read.

Three kinds of listener, all answering the way kube-proxy's do so that existing
probes, load balancers and dashboards keep working after a swap:

- ``HealthServer`` (default :10256): ``/healthz`` and ``/livez``, driven by
  ``ProxyHealth``, which learns about syncs as a ``SyncObserver``
  (pkg/proxy/healthcheck/proxier_health.go).
- ``MetricsServer`` (default 127.0.0.1:10249): ``/metrics`` from ``Metrics``,
  which is a ``SyncObserver`` too and uses kube-proxy's metric names
  (pkg/proxy/metrics/metrics.go).
- ``ServiceHealthServers``: one listener per externalTrafficPolicy=Local
  LoadBalancer Service on its healthCheckNodePort, which cloud load balancers
  poll to learn whether this node has a local endpoint
  (pkg/proxy/healthcheck/service_health.go).

Sync results are read duck-typed (``getattr`` with defaults): the iptables and
IPVS dataplanes return different result types, and a metric that cannot be
read from one must never break a sync.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

from pyproxy.model import Endpoint, ServicePort, ServicePortName, ServiceType

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Route = Callable[[], tuple[int, str, bytes]]
"""An HTTP handler: returns (status code, content type, body)."""

NamespacedName = tuple[str, str]

DEFAULT_HEALTHZ_PORT = 10256
DEFAULT_METRICS_PORT = 10249

# The Cluster Autoscaler's taint on a node it is about to delete; upstream's
# ToBeDeletedTaint. Such a node answers /healthz with 503 so load balancers
# drain it before it goes away.
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

# At most this many queued-change times are remembered while syncs lag. Past
# it the newest overwrites the last slot, so the oldest pending change (which
# decides health) and the newest (which outlives the next sync) are both kept.
_MAX_PENDING = 10_000


def rfc3339(ts: float | None) -> str:
    """A wall-clock time as RFC 3339 in UTC; None becomes Go's zero time, as upstream."""
    if ts is None:
        return "0001-01-01T00:00:00Z"
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- proxy health -----------------------------------------------------------------


@dataclass(frozen=True)
class HealthStatus:
    """One reading of ProxyHealth, taken under its lock so the fields agree."""

    healthy: bool  # the proxy's own health, ignoring the node
    node_eligible: bool
    last_updated: float | None  # wall clock of the last successful sync
    current_time: float  # wall clock now

    def body(self, *, with_node: bool) -> dict[str, Any]:
        """The JSON kube-proxy answers with; a healthy reply reports lastUpdated as now.

        Upstream does that for compatibility with old releases, whose
        lastUpdated was the last sync-loop run even if nothing changed.
        """
        healthy = self.healthy and (self.node_eligible or not with_node)
        last = self.current_time if healthy else self.last_updated
        return {
            "lastUpdated": rfc3339(last),
            "currentTime": rfc3339(self.current_time),
            "nodeEligible": self.node_eligible,
            "healthy": healthy,
        }


class ProxyHealth:
    """Whether the programmed rules keep up with the changes seen: kube-proxy's rule.

    Healthy unless a change has waited longer than ``health_timeout``
    (2 x syncPeriod, as kube-proxy sets it) without a successful sync that
    started after it, or no sync at all has succeeded within
    ``health_timeout`` of start. Quiet clusters stay healthy: no changes, no
    staleness.

    One step beyond upstream, following DESIGN ("healthz turns unhealthy only
    when syncs are stale"): a failed sync counts as a pending change, so a
    node whose kernel writes keep failing turns unhealthy after
    ``health_timeout`` even when no new change arrives.

    ``clock`` must be the reconciler's monotonic clock: ``change_queued(at)``
    and ``started`` are compared with it. ``wall_clock`` only formats the
    JSON timestamps.
    """

    def __init__(self, sync_period: float = 30.0, *, clock: Clock = time.monotonic,
                 wall_clock: Clock = time.time) -> None:
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._health_timeout = 2.0 * sync_period
        self._started_at = clock()
        self._pending: list[float] = []  # monotonic times of changes not yet synced
        self._last_updated_wall: float | None = None
        self._synced = False
        self._node_eligible = True

    # -- configuration --------------------------------------------------------

    @property
    def health_timeout(self) -> float:
        return self._health_timeout

    def set_sync_period(self, sync_period: float) -> None:
        """The config changed at run time; the timeout follows, as at start."""
        with self._lock:
            self._health_timeout = 2.0 * sync_period

    @property
    def node_draining(self) -> bool:
        """True when the node is being deleted: /healthz fails so LBs drain it first."""
        return not self._node_eligible

    @node_draining.setter
    def node_draining(self, draining: bool) -> None:
        self._node_eligible = not draining

    def sync_node(self, node: Mapping[str, Any] | None) -> None:
        """Upstream's SyncNode: draining when deleted or tainted ToBeDeletedByClusterAutoscaler.

        Takes the Node as the API returns it (a dict), since no other part of
        pyproxy needs these two fields. None (node unknown) means eligible,
        as upstream starts out.
        """
        draining = False
        if node:
            meta = node.get("metadata") or {}
            spec = node.get("spec") or {}
            taints = spec.get("taints") or ()
            draining = bool(meta.get("deletionTimestamp")) or any(
                isinstance(t, Mapping) and t.get("key") == TO_BE_DELETED_TAINT for t in taints
            )
        if draining != self.node_draining:
            log.info("node eligibility for load-balancer traffic changed",
                     extra={"node_eligible": not draining})
        self.node_draining = draining

    # -- SyncObserver ---------------------------------------------------------

    def change_queued(self, at: float) -> None:
        with self._lock:
            if len(self._pending) < _MAX_PENDING:
                self._pending.append(at)
            else:
                self._pending[-1] = max(self._pending[-1], at)

    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None:
        """Changes queued before the sync started are programmed; later ones still wait."""
        with self._lock:
            self._pending = [t for t in self._pending if t > started]
            self._synced = True
            self._last_updated_wall = self._wall() - max(0.0, self._clock() - finished)

    def sync_failed(self, error: BaseException, *, full: bool) -> None:
        """The kernel may now lag the model: start the staleness clock if it isn't running."""
        with self._lock:
            if not self._pending:
                self._pending.append(self._clock())

    # -- reading ----------------------------------------------------------------

    def status(self) -> HealthStatus:
        with self._lock:
            now = self._clock()
            healthy = True
            if self._pending and now - min(self._pending) >= self._health_timeout:
                healthy = False  # a change has waited too long
            if not self._synced and now - self._started_at >= self._health_timeout:
                healthy = False  # never synced since start
            return HealthStatus(healthy, self._node_eligible, self._last_updated_wall,
                                self._wall())

    def is_healthy(self) -> bool:
        """The proxy's health ignoring the node, as service health checks use it."""
        return self.status().healthy


# -- HTTP plumbing ------------------------------------------------------------------


def _split_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a route table, quiet errors and no DNS lookups at bind."""

    daemon_threads = True
    allow_reuse_address = True  # SO_REUSEADDR: restart without waiting out TIME_WAIT

    def __init__(self, bind: tuple[str, int], family: socket.AddressFamily, dual_stack: bool,
                 routes: dict[str, Route], fallback: Route | None) -> None:
        self.address_family = family
        self.dual_stack = dual_stack
        self.routes = routes
        self.fallback = fallback
        super().__init__(bind, _Handler)

    def server_bind(self) -> None:
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would call socket.getfqdn(), a DNS lookup that
        # can hang at start on a node with broken resolv.conf.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-reply is routine for probes; not a traceback on stderr.
        log.debug("http request failed", exc_info=True, extra={"client": str(client_address)})


def _make_http_server(bind: tuple[str, int], routes: dict[str, Route],
                      fallback: Route | None) -> _HTTPServer:
    """Bind ``bind``; host "" or "::" listens on every address of both families, as Go does."""
    host, port = _split_host(bind[0]), bind[1]
    if host in ("", "::"):
        try:
            return _HTTPServer(("::", port), socket.AF_INET6, True, routes, fallback)
        except OSError as err:
            if host == "::" or err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
        return _HTTPServer(("0.0.0.0", port), socket.AF_INET, False, routes, fallback)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _HTTPServer((host, port), family, False, routes, fallback)


class _Handler(BaseHTTPRequestHandler):
    server_version = "pyproxy"
    sys_version = ""
    timeout = 10  # seconds an idle client may hold a handler thread

    def do_GET(self) -> None:
        self._reply(send_body=True)

    def do_HEAD(self) -> None:
        self._reply(send_body=False)

    def _reply(self, *, send_body: bool) -> None:
        srv = cast(_HTTPServer, self.server)
        path = urlsplit(self.path).path
        route = srv.routes.get(path, srv.fallback)
        if route is None:
            status, ctype, body = 404, TEXT, b"404 page not found\n"
        else:
            try:
                status, ctype, body = route()
            except Exception:
                log.exception("http handler failed", extra={"path": path})
                status, ctype, body = 500, TEXT, b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format % args, extra={"client": self.client_address[0]})


class Listener:
    """One HTTP listener on its own accept thread, stopped at once rather than by polling.

    socketserver's ``serve_forever`` notices ``shutdown()`` only on its next
    poll (0.5 s); with one listener per health-checked Service that would make
    an update closing many of them slow. Here a socketpair wakes the accept
    loop instead, and the port is free again when ``stop()`` returns.
    """

    def __init__(self, bind: tuple[str, int], routes: Mapping[str, Route] | None = None, *,
                 fallback: Route | None = None, name: str = "http") -> None:
        self.bind = bind
        self.routes: dict[str, Route] = dict(routes or {})
        self.fallback = fallback
        self.name = name
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    def add_route(self, path: str, handler: Route) -> None:
        """Serve ``path`` with ``handler``; takes effect at once, also while running."""
        self.routes[path] = handler

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); with port 0 asked, the port the kernel chose."""
        if self._httpd is None:
            raise RuntimeError(f"{self.name} listener is not running")
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Bind and serve; raises OSError (port taken, address not local) before serving."""
        if self._thread is not None:
            return
        httpd = _make_http_server(self.bind, self.routes, self.fallback)
        httpd.socket.setblocking(False)  # a connection reset before accept must not block
        self._httpd = httpd
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, args=(httpd, self._wake[0]),
                                        name=f"pyproxy-{self.name}", daemon=True)
        self._thread.start()
        log.debug("listening", extra={"listener": self.name, "address": self.address})

    def stop(self) -> None:
        if self._thread is None or self._wake is None or self._httpd is None:
            return
        with contextlib.suppress(OSError):
            self._wake[1].send(b"x")
        self._thread.join()
        self._httpd.server_close()
        for s in self._wake:
            s.close()
        self._thread = self._wake = self._httpd = None

    @staticmethod
    def _serve(httpd: _HTTPServer, wake: socket.socket) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(httpd.socket, selectors.EVENT_READ, "accept")
            sel.register(wake, selectors.EVENT_READ, "stop")
            while True:
                events = sel.select()
                if any(key.data == "stop" for key, _ in events):
                    return
                try:
                    request, client = httpd.get_request()
                except OSError:  # the client gave up before we accepted (or EAGAIN)
                    continue
                try:
                    httpd.process_request(request, client)  # a handler thread takes it
                except Exception:
                    httpd.handle_error(request, client)
                    httpd.shutdown_request(request)


def _json(status: int, body: Mapping[str, Any]) -> tuple[int, str, bytes]:
    return status, JSON, json.dumps(body).encode() + b"\n"


# -- /healthz and /livez -------------------------------------------------------------


class _Server:
    """A Listener with the lifecycle every pyproxy HTTP port shares."""

    listener: Listener
    what = "HTTP"

    @property
    def port(self) -> int:
        return self.listener.port

    def add_route(self, path: str, handler: Route) -> None:
        self.listener.add_route(path, handler)

    def start(self) -> None:
        self.listener.start()
        log.info(f"serving {self.what}", extra={"address": self.listener.address})

    def stop(self) -> None:
        self.listener.stop()


class HealthServer(_Server):
    """kube-proxy's healthz port: ``/healthz`` for LBs and probes, ``/livez`` for liveness.

    ``/livez`` ignores node draining (as upstream), so a draining node's proxy
    is not restarted, while ``/healthz`` fails to steer LB traffic away.
    """

    def __init__(self, health: ProxyHealth,
                 bind: tuple[str, int] = ("", DEFAULT_HEALTHZ_PORT),
                 metrics: Metrics | None = None) -> None:
        self.health = health
        self.metrics = metrics
        self.listener = Listener(bind, {"/healthz": self._healthz, "/livez": self._livez},
                                 name="healthz")
        self.what = "health checks"

    def _healthz(self) -> tuple[int, str, bytes]:
        return self._probe("healthz", with_node=True)

    def _livez(self) -> tuple[int, str, bytes]:
        return self._probe("livez", with_node=False)

    def _probe(self, kind: str, *, with_node: bool) -> tuple[int, str, bytes]:
        body = self.health.status().body(with_node=with_node)
        status = 200 if body["healthy"] else 503
        if self.metrics is not None:
            self.metrics.probe_served(kind, status)
        return _json(status, body)


# -- metrics ------------------------------------------------------------------------


def _exponential(start: float, factor: float, count: int) -> list[float]:
    return [start * factor**i for i in range(count)]


# prometheus.ExponentialBuckets(0.001, 2, 15): 1 ms .. 16.4 s, as upstream.
SYNC_BUCKETS = _exponential(0.001, 2, 15)
# Upstream's NetworkProgrammingLatency buckets: 0.25 s, 0.5 s, every second to
# 59 s, every 5 s to 115 s, every 30 s to 5 min.
NETWORK_PROGRAMMING_BUCKETS = [
    0.25, 0.5,
    *range(1, 60),
    *range(60, 120, 5),
    *range(120, 301, 30),
]
LINES_BUCKETS = _exponential(1, 4, 11)  # 1 .. ~1M lines


class Metrics:
    """kube-proxy's sync metrics under their upstream names, plus pyproxy's own.

    Each instance owns its ``CollectorRegistry`` (so tests can make many);
    ``runtime_metrics`` adds the process_* and python_* collectors that the
    default registry would carry, as kube-proxy exposes process_* from Go.

    Differences from upstream, by necessity:
    - ``network_programming_duration_seconds`` is measured from when the
      change reached pyproxy (the reconciler's change times), not from the
      EndpointSlice's lastChangeTriggerTime annotation, so it excludes the
      API-server and watch delay.
    - ``no_local_endpoints_total`` has labels internal and external; when a
      result only carries one total (the iptables Plan counts service ports
      with either policy Local and no local endpoint), both labels get it.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 clock: Clock = time.monotonic, wall_clock: Clock = time.time,
                 runtime_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._wall = wall_clock
        r = self.registry
        if runtime_metrics:
            process_collector.ProcessCollector(registry=r)
            platform_collector.PlatformCollector(registry=r)
            gc_collector.GCCollector(registry=r)

        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds", buckets=SYNC_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            buckets=SYNC_BUCKETS, registry=r)
        self.sync_partial_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            buckets=SYNC_BUCKETS, registry=r)
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            buckets=NETWORK_PROGRAMMING_BUCKETS, registry=r)
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced", registry=r)
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", registry=r)
        self.restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures", registry=r)
        self.partial_restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures", registry=r)
        self.iptables_rules = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy", ["table"], registry=r)
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"], registry=r)
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes", registry=r)
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes", registry=r)
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes", registry=r)
        self.healthz = Counter(
            "kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status",
            ["code"], registry=r)
        self.livez = Counter(
            "kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status",
            ["code"], registry=r)
        self.invalid_objects = Counter(
            "pyproxy_invalid_objects_total",
            "API objects skipped because they failed validation", ["kind"], registry=r)
        self.config_rejections = Counter(
            "pyproxy_config_rejected_total",
            "KubeProxyConfiguration changes refused at run time (invalid, or an unavailable"
            " mode); the running configuration stays", registry=r)
        self.lines_written = Histogram(
            "pyproxy_sync_lines_written",
            "Lines (or dataplane operations) written to the kernel per sync",
            buckets=LINES_BUCKETS, registry=r)
        # Labelled series appear at 0 from the start, so dashboards see them
        # before the first event rather than "no data".
        for table in ("filter", "nat"):
            self.iptables_rules.labels(table=table)
        for policy in ("internal", "external"):
            self.no_local_endpoints.labels(traffic_policy=policy)

    def _to_wall(self, at: float) -> float:
        """A monotonic reading as wall-clock seconds (gauges are Unix timestamps)."""
        return self._wall() - (self._clock() - at)

    # -- SyncObserver ---------------------------------------------------------

    def change_queued(self, at: float) -> None:
        self.last_queued.set(self._to_wall(at))

    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None:
        took = max(0.0, finished - started)
        self.sync_duration.observe(took)
        (self.sync_full_duration if full else self.sync_partial_duration).observe(took)
        for at in change_times:
            self.network_programming.observe(max(0.0, finished - at))
        self.last_sync.set(self._to_wall(finished))
        try:
            self._observe_result(result)
        except Exception:
            # A result shape this code does not know must cost a metric, not the sync.
            log.warning("could not read metrics from sync result", exc_info=True,
                        extra={"result_type": type(result).__name__})

    def sync_failed(self, error: BaseException, *, full: bool) -> None:
        """Upstream counts every failed restore, and partial ones again separately."""
        self.restore_failures.inc()
        if not full:
            self.partial_restore_failures.inc()

    def _observe_result(self, result: Any) -> None:
        lines = getattr(result, "lines_written", None)
        if isinstance(lines, int | float):
            self.lines_written.observe(lines)
        plan = getattr(result, "plan", None)

        counts = getattr(result, "rule_counts", None)
        if callable(counts):
            counts = counts()
        if counts is None:
            rule_count = getattr(getattr(plan, "ruleset", None), "rule_count", None)
            if callable(rule_count):
                # Table is a StrEnum, so its plain names index the ruleset too;
                # that keeps serve.py free of any dataplane import.
                counts = {table: rule_count(table) for table in ("filter", "nat")}
        if isinstance(counts, Mapping):
            for table, n in counts.items():
                self.iptables_rules.labels(table=str(table)).set(n)

        no_local = getattr(plan, "no_local_endpoints", None)
        if no_local is None:
            no_local = getattr(result, "no_local_endpoints", None)
        if isinstance(no_local, Mapping):
            for policy in ("internal", "external"):
                self.no_local_endpoints.labels(traffic_policy=policy).set(
                    no_local.get(policy, 0))
        elif isinstance(no_local, int | float):
            for policy in ("internal", "external"):
                self.no_local_endpoints.labels(traffic_policy=policy).set(no_local)

    # -- called by the tracker, sources and health server ----------------------

    def set_endpoint_changes_pending(self, n: int) -> None:
        self.endpoint_changes_pending.set(n)

    def set_service_changes_pending(self, n: int) -> None:
        self.service_changes_pending.set(n)

    def inc_endpoint_changes(self, n: int = 1) -> None:
        self.endpoint_changes.inc(n)

    def inc_service_changes(self, n: int = 1) -> None:
        self.service_changes.inc(n)

    def invalid_object(self, kind: str) -> None:
        """A Service or EndpointSlice was skipped as malformed (DESIGN: log line + metric)."""
        self.invalid_objects.labels(kind=kind).inc()

    def config_rejected(self) -> None:
        self.config_rejections.inc()

    def probe_served(self, kind: str, code: int) -> None:
        """Count a /healthz or /livez answer by status code, as upstream does."""
        counter = self.healthz if kind == "healthz" else self.livez
        counter.labels(code=str(code)).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class MetricsServer(_Server):
    """kube-proxy's metrics port: ``/metrics``, plus ``/healthz`` (plain "ok") as upstream.

    ``add_route`` lets other parts hang debugging pages here (``/state``,
    ``/proxyMode``) without this module knowing them.
    """

    def __init__(self, metrics: Metrics,
                 bind: tuple[str, int] = ("127.0.0.1", DEFAULT_METRICS_PORT)) -> None:
        self.metrics = metrics
        self.listener = Listener(bind, {"/metrics": self._metrics, "/healthz": _ok},
                                 name="metrics")
        self.what = "metrics"

    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()


def _ok() -> tuple[int, str, bytes]:
    return 200, TEXT, b"ok"


# -- per-service health checks (healthCheckNodePort) -----------------------------------


def health_check_targets(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
) -> tuple[dict[NamespacedName, int], dict[NamespacedName, int]]:
    """Which Services need a health-check listener, and their local ready endpoint counts.

    Upstream's NeedsHealthCheck: type LoadBalancer with externalTrafficPolicy
    Local and a healthCheckNodePort. Counts are upstream's LocalReadyEndpoints:
    distinct IPs of ready endpoints on this node, over all the Service's ports
    and families, so 10.0.0.1:80 and 10.0.0.1:443 are one endpoint. Only ready
    endpoints count: a node with only terminating ones should lose LB traffic.
    """
    ports: dict[NamespacedName, int] = {}
    for spn, svc in services.items():
        if (svc.type is ServiceType.LOAD_BALANCER and svc.external_policy_local
                and svc.health_check_node_port):
            ports[(spn.namespace, spn.name)] = svc.health_check_node_port
    local_ips: dict[NamespacedName, set[str]] = {nsn: set() for nsn in ports}
    for spn, eps in endpoints.items():
        ips = local_ips.get((spn.namespace, spn.name))
        if ips is None:
            continue
        ips.update(str(ep.ip) for ep in eps if ep.is_local and ep.ready)
    return ports, {nsn: len(ips) for nsn, ips in local_ips.items()}


class ServiceHealthServers:
    """One listener per health-checked Service, answering 200 while it has a local endpoint.

    Cloud load balancers send eTP=Local traffic only to nodes whose
    healthCheckNodePort says 200, so the answer must follow local endpoints
    closely. Like upstream, a Service is also reported unhealthy while the
    proxy itself is (its rules may be stale). A port that cannot be bound is
    logged with the Service's name and retried on the next ``update``; it
    never stops the others.
    """

    def __init__(self, bind_address: str = "", *,
                 proxy_healthy: Callable[[], bool] = lambda: True) -> None:
        self.bind_address = bind_address
        self.proxy_healthy = proxy_healthy
        self._lock = threading.Lock()  # guards what handler threads read
        self._update_lock = threading.Lock()  # one update() at a time
        self._listeners: dict[NamespacedName, tuple[int, Listener]] = {}
        self._counts: dict[NamespacedName, int] = {}
        self._failed: dict[NamespacedName, int] = {}  # last port that failed, to log once

    @property
    def ports(self) -> dict[NamespacedName, int]:
        """The Services with an open listener and its (bound) port."""
        with self._lock:
            return {nsn: lst.port for nsn, (_, lst) in self._listeners.items()}

    def update(self, services: Mapping[NamespacedName, int]) -> None:
        """Make the listeners match ``services`` ((namespace, name) -> healthCheckNodePort)."""
        with self._update_lock:
            self._update(services)

    def _update(self, services: Mapping[NamespacedName, int]) -> None:
        with self._lock:
            stale = [nsn for nsn, (port, _) in self._listeners.items()
                     if services.get(nsn) != port]
            closing = [self._listeners.pop(nsn) for nsn in stale]
        # Close before opening: a port may move from a deleted Service to a new one.
        for nsn, (port, listener) in zip(stale, closing, strict=True):
            listener.stop()
            log.info("closed service health check",
                     extra={"service": f"{nsn[0]}/{nsn[1]}", "port": port})
        self._failed = {nsn: p for nsn, p in self._failed.items() if services.get(nsn) == p}

        for nsn, port in sorted(services.items()):
            with self._lock:
                if nsn in self._listeners:
                    continue
            listener = Listener((self.bind_address, port), fallback=self._route(nsn),
                                name=f"hc-{nsn[0]}/{nsn[1]}")
            try:
                listener.start()
            except OSError as err:
                level = logging.DEBUG if self._failed.get(nsn) == port else logging.ERROR
                self._failed[nsn] = port
                log.log(level, "failed to start service health check",
                        extra={"service": f"{nsn[0]}/{nsn[1]}", "port": port,
                               "error": str(err)})
                continue
            self._failed.pop(nsn, None)
            with self._lock:
                self._listeners[nsn] = (port, listener)
            log.info("opened service health check",
                     extra={"service": f"{nsn[0]}/{nsn[1]}", "port": listener.port})

    def update_endpoints(self, counts: Mapping[NamespacedName, int]) -> None:
        """Local ready endpoint counts; a Service missing from ``counts`` has none."""
        with self._lock:
            self._counts = dict(counts)

    def _route(self, nsn: NamespacedName) -> Route:
        def answer() -> tuple[int, str, bytes]:
            with self._lock:
                count = self._counts.get(nsn, 0)
            proxy_healthy = self.proxy_healthy()
            status = 200 if count > 0 and proxy_healthy else 503
            return _json(status, {
                "service": {"namespace": nsn[0], "name": nsn[1]},
                "localEndpoints": count,
                "serviceProxyHealthy": proxy_healthy,
            })
        return answer

    def close(self) -> None:
        with self._update_lock:
            with self._lock:
                listeners, self._listeners = list(self._listeners.values()), {}
            for _, listener in listeners:
                listener.stop()
