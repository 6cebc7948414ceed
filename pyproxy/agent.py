"""The node agent: wires sources, tracker, reconciler, dataplane and servers together.

Everything here is assembly and run-time reconfiguration; the decisions live
in the modules it wires. Configuration changes at run time are applied in
place (kube-proxy exits and lets the kubelet restart it instead): periods,
masqueradeAll and clusterCIDR take effect on the next sync; a change of mode
sets the new dataplane up completely (one full sync) before the old one's
leftovers are removed, so new connections keep working through the switch and
established ones keep their conntrack (or IPVS) entries.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyproxy import serve
from pyproxy.config import (
    ConfigError,
    ProxyConfig,
    ProxyMode,
    diff_reloadable,
    load_config,
)
from pyproxy.iptables.plan import CANARY, PlanContext
from pyproxy.iptables.restore import IPTables
from pyproxy.iptables.sync import IPTablesDataplane
from pyproxy.ipvs.netlink import IPVSKernel
from pyproxy.ipvs.plan import DEFAULT_SCHEDULER, IPVSContext
from pyproxy.ipvs.sync import IPVSDataplane
from pyproxy.model import InvalidObject, IPFamily, IPNetwork, NodeInfo, parse_node
from pyproxy.reconciler import QuietObserver, Reconciler
from pyproxy.state import FailureInfo, SyncInfo, build_state, virtual_servers_by_service
from pyproxy.tracker import ChangeTracker, report_invalid

if TYPE_CHECKING:
    # The kubernetes client takes seconds to import on a slow machine; a run from
    # manifests never needs it, so it is imported where the API is used.
    from kubernetes import client

    from pyproxy.sources import kube

log = logging.getLogger(__name__)

CONFIG_KEY = "config.conf"
CANARY_INTERVAL = 5.0  # seconds; each check reads one empty chain per table


Dataplane = IPTablesDataplane | IPVSDataplane


def node_port_cidrs(config: ProxyConfig, node: NodeInfo) -> tuple[IPNetwork, ...]:
    """nodePortAddresses as networks; "primary" means the node's own addresses."""
    out: list[IPNetwork] = []
    for item in config.node_port_addresses:
        if item == "primary":
            out.extend(ipaddress.ip_network(a) for a in node.addresses)
        else:
            out.append(ipaddress.ip_network(item, strict=False))
    return tuple(out)


def plan_context(config: ProxyConfig, node: NodeInfo,
                 family: IPFamily = IPFamily.IPv4) -> PlanContext:
    version = 4 if family is IPFamily.IPv4 else 6
    return PlanContext(
        node=node,
        family=family,
        cluster_cidrs=tuple(c for c in config.cluster_cidrs if c.version == version),
        masquerade_all=config.iptables.masquerade_all,
        masquerade_bit=config.iptables.masquerade_bit,
        localhost_node_ports=config.iptables.localhost_node_ports,
        node_port_cidrs=node_port_cidrs(config, node),
    )


def ipvs_context(config: ProxyConfig, node: NodeInfo, family: IPFamily = IPFamily.IPv4,
                 previous: IPVSContext | None = None) -> IPVSContext:
    version = 4 if family is IPFamily.IPv4 else 6
    return IPVSContext(
        node=node,
        family=family,
        cluster_cidrs=tuple(c for c in config.cluster_cidrs if c.version == version),
        masquerade_all=config.iptables.masquerade_all,
        masquerade_bit=config.iptables.masquerade_bit,
        scheduler=config.ipvs.scheduler or DEFAULT_SCHEDULER,
        # where NodePorts listen is read from the kernel at each full sync
        node_port_addresses=previous.node_port_addresses if previous else (),
    )


def build_dataplane(config: ProxyConfig, node: NodeInfo, iptables: IPTables) -> Dataplane:
    """The dataplane for ``config.mode``; the kernel is not touched until its first sync."""
    if config.mode is ProxyMode.IPVS:
        ipvs = config.ipvs
        return IPVSDataplane(
            iptables,
            IPVSKernel(exclude_cidrs=ipvs.exclude_cidrs),
            ipvs_context(config, node),
            strict_arp=ipvs.strict_arp,
            timeouts=(int(ipvs.tcp_timeout), int(ipvs.tcp_fin_timeout), int(ipvs.udp_timeout)),
        )
    return IPTablesDataplane(iptables, plan_context(config, node))


def ipvs_available() -> bool:
    """IPVS is in the kernel (loading ip_vs if it is a module, as kube-proxy does)."""
    if not os.path.exists("/proc/net/ip_vs"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["modprobe", "ip_vs"], capture_output=True, timeout=10, check=False)
    return os.path.exists("/proc/net/ip_vs")


def refresh_context(dataplane: Dataplane, config: ProxyConfig, node: NodeInfo) -> None:
    if isinstance(dataplane, IPVSDataplane):
        dataplane.set_context(ipvs_context(config, node, previous=dataplane.ctx))
    else:
        dataplane.set_context(plan_context(config, node))


@dataclass
class Agent:
    config: ProxyConfig
    node_name: str
    dataplane: Dataplane
    overrides: Mapping[str, object] = field(default_factory=dict)
    metrics: serve.Metrics = field(default_factory=serve.Metrics)
    node: NodeInfo = field(init=False)
    tracker: ChangeTracker = field(init=False)
    reconciler: Reconciler = field(init=False)
    health: serve.ProxyHealth = field(init=False)
    service_health: serve.ServiceHealthServers = field(init=False)
    stop: threading.Event = field(default_factory=threading.Event)
    _servers: list[Any] = field(default_factory=list)
    # Changes seen but not yet synced, per kind ("service", "endpoints"): key -> when.
    _unsynced: dict[str, dict[tuple[str, str], float]] = field(
        default_factory=lambda: {"service": {}, "endpoints": {}})
    # For /state: what the last successful sync programmed, and the last failure since.
    _last_sync: _SyncRecord | None = None
    _last_failure: FailureInfo | None = None

    def __post_init__(self) -> None:
        self.node = self.dataplane.ctx.node
        self.tracker = ChangeTracker(self.node_name, IPFamily.IPv4,
                                     on_invalid=self._invalid)
        self.health = serve.ProxyHealth(sync_period=self.config.sync_period)
        self.service_health = serve.ServiceHealthServers(proxy_healthy=self.health.is_healthy)
        self.reconciler = Reconciler(
            self.tracker, self.dataplane,
            min_sync_period=self.config.min_sync_period,
            sync_period=self.config.sync_period,
            observers=[self.health, self.metrics, _ServiceHealthUpdater(self),
                       _ChangeCounter(self), _StateRecorder(self)],
        )

    def _invalid(self, err: InvalidObject) -> None:
        report_invalid(err)
        self.metrics.invalid_object(err.kind)

    # -- servers -----------------------------------------------------------------

    def start_servers(self) -> None:
        cfg = self.config
        healthz, metrics = cfg.healthz_bind_address, cfg.metrics_bind_address
        health_server = serve.HealthServer(self.health, (healthz.host, healthz.port),
                                           metrics=self.metrics)
        metrics_server = serve.MetricsServer(self.metrics, (metrics.host, metrics.port))
        metrics_server.add_route("/state", self.state_page)
        for server in (health_server, metrics_server):
            server.start()
            self._servers.append(server)

    def state(self) -> dict[str, Any]:
        """The /state document (see pyproxy.state), as of the last successful sync."""
        with self.reconciler.lock:
            node, mode = self.node, str(self.config.mode)
            last, failure = self._last_sync, self._last_failure
        if last is None:
            return build_state({}, {}, node, mode=mode, synced=None, failure=failure)
        plan = getattr(last.result, "plan", None)
        chains = getattr(plan, "chains_by_service", None) or {}
        vss = getattr(plan, "virtual_servers", None)
        synced = SyncInfo(last.finished, last.full, last.last_full, chains,
                          virtual_servers_by_service(vss) if vss is not None else {})
        return build_state(last.services, last.endpoints, node, mode=mode, synced=synced,
                           failure=failure)

    def state_page(self) -> tuple[int, str, bytes]:
        body = json.dumps(self.state(), indent=2).encode() + b"\n"
        return 200, "application/json", body

    def close(self) -> None:
        self.stop.set()
        for server in self._servers:
            server.stop()
        self.service_health.close()

    # -- feeding the tracker ---------------------------------------------------------

    def _changed(self) -> None:
        self.reconciler.changed()

    def _seen(self, kind: str, obj: Mapping[str, Any]) -> None:
        """Count one Service or EndpointSlice event for the changes metrics (kube-proxy's)."""
        key = _key(obj)
        if kind == "endpoints":  # pending endpoint changes are counted per Service
            labels = (obj.get("metadata") or {}).get("labels") or {}
            key = (key[0], str(labels.get("kubernetes.io/service-name", key[1])))
            self.metrics.inc_endpoint_changes()
        else:
            self.metrics.inc_service_changes()
        with self.reconciler.lock:
            self._unsynced[kind][key] = self.reconciler.clock()
        self._publish_unsynced()

    def _publish_unsynced(self) -> None:
        with self.reconciler.lock:
            services, endpoints = (len(self._unsynced[k]) for k in ("service", "endpoints"))
        self.metrics.set_service_changes_pending(services)
        self.metrics.set_endpoint_changes_pending(endpoints)

    def set_node(self, obj: Mapping[str, Any] | None) -> None:
        self.health.sync_node(obj)  # deleted or marked for deletion: /healthz drains the node
        try:
            node = parse_node(obj) if obj is not None else NodeInfo(self.node_name)
        except InvalidObject as err:
            self._invalid(err)
            return
        with self.reconciler.lock:
            if node == self.node:
                return
            self.node = node
            refresh_context(self.dataplane, self.config, node)
        log.info("node changed", extra={"node": node.name, "zone": node.zone,
                                        "addresses": ",".join(map(str, node.addresses))})
        self.reconciler.request_full_sync()

    # -- configuration -----------------------------------------------------------------

    def apply_config_text(self, text: str | None, source: str) -> None:
        """A new KubeProxyConfiguration document arrived (ConfigMap edit or file change)."""
        try:
            new, warnings = load_config(text, self.overrides, source=source)
        except ConfigError as err:
            log.error("configuration change rejected; keeping the running one",
                      extra={"source": source, "error": str(err)})
            self.metrics.config_rejected()
            return
        for warning in warnings:
            log.warning("configuration warning", extra={"detail": warning})
        self.apply_config(new)

    def apply_config(self, new: ProxyConfig) -> None:
        changed = diff_reloadable(self.config, new)
        if not changed:
            return
        if "mode" in changed and not self.switch_mode(new):
            self.metrics.config_rejected()
            return
        self.config = new
        with self.reconciler.lock:
            refresh_context(self.dataplane, new, self.node)
        self.reconciler.set_periods(new.min_sync_period, new.sync_period)
        self.health.set_sync_period(new.sync_period)
        log.info("configuration applied", extra={"changed": ",".join(sorted(changed))})
        self.reconciler.request_full_sync()

    def switch_mode(self, new: ProxyConfig) -> bool:
        """Move to ``new.mode``: program it fully, then remove the old mode's leftovers.

        Both modes keep their iptables rules in the same PYPROXY- chains, so the new
        dataplane's full sync (a diff against the kernel) already replaces the old
        mode's rules in one transaction; what is left is IPVS's own state when
        leaving IPVS mode. If the new mode cannot be programmed, the old one stays.
        """
        old = self.dataplane
        if new.mode is ProxyMode.IPVS and not ipvs_available():
            log.error(f"mode change refused: IPVS is not available in this kernel; "
                      f"{self.config.mode} keeps running", extra={"requested_mode": "ipvs"})
            return False
        new_dp = build_dataplane(new, self.node, old.iptables)
        with self.reconciler.lock:
            try:
                new_dp.sync(self.tracker.checkout_all(), full=True)
            except Exception as err:  # noqa: BLE001 - any failure keeps the old mode
                log.error(f"mode change failed; {self.config.mode} keeps running",
                          extra={"requested_mode": str(new.mode), "error": str(err)})
                if isinstance(new_dp, IPVSDataplane):
                    with contextlib.suppress(Exception):
                        new_dp.cleanup()
                self.reconciler.request_full_sync()  # puts the running mode's rules back
                return False
            if isinstance(old, IPVSDataplane):
                try:
                    old.cleanup()
                except Exception as err:  # noqa: BLE001 - leftovers are logged, not fatal
                    log.error("could not remove IPVS leftovers", extra={"error": str(err)})
            self.dataplane = new_dp
            self.reconciler.dataplane = new_dp
        log.info("mode switched", extra={"mode": str(new.mode)})
        return True

    def watch_config_file(self, path: str, interval: float = 2.0) -> threading.Thread:
        """Poll the mounted file: ConfigMap volumes change by atomic symlink swaps."""

        def loop() -> None:
            last = _read(path)
            while not self.stop.wait(interval):
                text = _read(path)
                if text is not None and text != last:
                    last = text
                    self.apply_config_text(text, f"config file {path}")

        t = threading.Thread(target=loop, name="config-file", daemon=True)
        t.start()
        return t

    # -- the API sources -------------------------------------------------------------------

    def informers(self, api: client.ApiClient,
                  config_map: tuple[str, str] | None = None) -> list[kube.Informer]:
        from kubernetes import client

        from pyproxy.sources import kube

        core = client.CoreV1Api(api)
        discovery = client.DiscoveryV1Api(api)
        selector = kube.proxy_label_selector(self.config.service_proxy_name)
        lock = self.reconciler.lock
        t = self.tracker

        def counted(kind: str, fn: Callable[[dict[str, Any]], None]
                    ) -> Callable[[dict[str, Any]], None]:
            def call(obj: dict[str, Any]) -> None:
                fn(obj)
                self._seen(kind, obj)
            return call

        services = kube.Informer(
            "services", core.list_service_for_all_namespaces,
            kube.CallbackHandler(counted("service", t.set_service),
                                 counted("service", lambda o: t.delete_service(*_key(o))),
                                 t.replace_services, lock),
            label_selector=selector, on_event=self._changed, stream_list=True)
        slices = kube.Informer(
            "endpointslices", discovery.list_endpoint_slice_for_all_namespaces,
            kube.CallbackHandler(counted("endpoints", t.set_slice),
                                 counted("endpoints", lambda o: t.delete_slice(*_key(o))),
                                 t.replace_slices, lock),
            label_selector=selector, on_event=self._changed, stream_list=True)
        node = kube.Informer(
            "node", core.list_node,
            kube.CallbackHandler(self.set_node, lambda _o: self.set_node(None),
                                 lambda objs: self.set_node(next(iter(objs), None))),
            field_selector=f"metadata.name={self.node_name}")
        out = [services, slices, node]
        if config_map is not None:
            ns, name = config_map

            def on_cm(obj: Mapping[str, Any] | None) -> None:
                data = (obj or {}).get("data") or {}
                self.apply_config_text(data.get(CONFIG_KEY), f"configmap {ns}/{name}")

            def on_cm_list(objs: Iterable[Mapping[str, Any]]) -> None:
                for obj in objs:  # at most one (a field selector on the name)
                    on_cm(obj)

            out.append(kube.Informer(
                "configmap", _namespaced(core.list_namespaced_config_map, ns),
                kube.CallbackHandler(on_cm, lambda _o: None,
                                     on_cm_list),
                field_selector=f"metadata.name={name}"))
        return out

    def run(self, informers: list[kube.Informer]) -> None:
        if informers:
            from pyproxy.sources import kube

            self.reconciler.ready = kube.all_synced(informers[:2])
        for informer in informers:
            informer.start(self.stop)
        self.watch_canary()
        self.reconciler.run(self.stop)

    def watch_canary(self, interval: float = CANARY_INTERVAL) -> threading.Thread:
        """Between full syncs, notice when someone flushed the tables, and resync at once."""

        def loop() -> None:
            while not self.stop.wait(interval):
                if self.reconciler.applied_once and not self.canary_alive():
                    log.warning("pyproxy's canary chain is gone (tables flushed by someone "
                                "else?): full resync")
                    self.reconciler.request_full_sync()

        t = threading.Thread(target=loop, name="canary", daemon=True)
        t.start()
        return t

    def canary_alive(self) -> bool:
        ipt = self.dataplane.iptables
        try:
            return all(ipt.chain_exists(table, CANARY) for table in ("nat", "filter"))
        except (OSError, subprocess.SubprocessError):
            return True  # cannot tell: the periodic full sync still repairs drift


class _ServiceHealthUpdater(QuietObserver):
    """After each successful sync, open/close health-check node port servers to match."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None:
        snap = self.agent.tracker.snapshot
        ports, counts = serve.health_check_targets(snap.services, snap.endpoints)
        self.agent.service_health.update(ports)
        self.agent.service_health.update_endpoints(counts)


class _ChangeCounter(QuietObserver):
    """kube-proxy's pending-changes gauges: changes seen before a successful sync started
    are programmed by it; the rest still wait."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None:
        with self.agent.reconciler.lock:
            for pending in self.agent._unsynced.values():
                for key in [k for k, at in pending.items() if at <= started]:
                    del pending[key]
        self.agent._publish_unsynced()


@dataclass(frozen=True)
class _SyncRecord:
    result: Any
    services: Mapping[Any, Any]  # copies of the snapshot the sync worked from
    endpoints: Mapping[Any, Any]
    full: bool
    finished: float  # wall clock
    last_full: float | None


class _StateRecorder(QuietObserver):
    """Keeps what /state reports: the last successful sync's result and the snapshot it
    programmed (copied: the tracker's maps change in place at the next checkout; about
    40 us per 10,000 service ports), and when it finished."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def sync_failed(self, error: BaseException, *, full: bool) -> None:
        self.agent._last_failure = FailureInfo(time.time(), str(error))

    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None:
        now = time.time()
        agent = self.agent
        with agent.reconciler.lock:
            snap = agent.tracker.snapshot
            previous = agent._last_sync
            last_full = now if full else (previous.last_full if previous is not None else None)
            agent._last_sync = _SyncRecord(result, dict(snap.services), dict(snap.endpoints),
                                           full, now, last_full)
            agent._last_failure = None


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _namespaced(fn: Callable[..., Any], namespace: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(namespace, *args, **kwargs)

    call.__doc__ = fn.__doc__  # the watch helper reads the return type from the docstring
    return call


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
