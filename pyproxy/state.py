"""The `/state` page: per service port, what pyproxy programmed and why.

kube-proxy never offered this (kubernetes/kubernetes#74677). For each service
port: the addresses it is reachable at, the endpoints in use (and for which
traffic), the endpoints not in use with the reason (not ready, not serving,
terminating and only a fallback, not local under a Local traffic policy,
filtered by topology hints), the iptables chains or IPVS virtual servers that
carry it, and when the last successful sync finished.

`build_state` is pure: the agent hands it copies of the tracker's snapshot
(as of the last sync), the dataplane's node, and what the last successful
sync planned; it returns plain JSON-ready data.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyproxy.iptables.plan import categorize
from pyproxy.ipvs.plan import VirtualServer
from pyproxy.model import Endpoint, NodeInfo, ServicePort, ServicePortName


@dataclass(frozen=True)
class SyncInfo:
    """What the last successful sync programmed (from its result) and when."""

    finished: float  # wall clock (time.time()) when it finished
    full: bool
    last_full: float | None = None
    chains: Mapping[ServicePortName, tuple[str, ...]] = field(default_factory=dict)
    virtual_servers: Mapping[ServicePortName, tuple[VirtualServer, ...]] = field(
        default_factory=dict)


@dataclass(frozen=True)
class FailureInfo:
    at: float
    error: str


def _when(t: float | None) -> dict[str, Any] | None:
    if t is None:
        return None
    stamp = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return {"time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "unix": round(t, 3)}


def service_label(name: ServicePortName) -> str:
    """ns/name:port/PROTO (the port part only for named ports, as upstream prints it)."""
    return f"{name}/{name.protocol}"


def _hostport(address: Any, port: int) -> str:
    text = str(address)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _topology(endpoints: Sequence[Endpoint], node: NodeInfo) -> Callable[[Endpoint], str | None]:
    """Why the topology filter (upstream's hints rules) leaves an endpoint out, or None."""
    ready = [e for e in endpoints if e.ready]
    if ready and all(e.node_hints for e in ready) and any(
            node.name in (e.node_hints or ()) for e in ready):
        return lambda e: (None if node.name in (e.node_hints or ())
                          else f"filtered by topology hints (not for node {node.name})")
    if node.zone and ready and all(e.zone_hints for e in ready) and any(
            node.zone in (e.zone_hints or ()) for e in ready):
        return lambda e: (None if node.zone in (e.zone_hints or ())
                          else f"filtered by topology hints (not for zone {node.zone})")
    return lambda e: None


def _not_used(ep: Endpoint, svc: ServicePort, endpoints: Sequence[Endpoint],
              node: NodeInfo, policy: str) -> str:
    """Why ``ep`` carries none of the traffic of ``policy`` ("internal"/"external")."""
    if ep.terminating and not ep.serving:
        return "terminating, not serving"
    if not ep.ready and not ep.serving:
        return "not ready"
    local_policy = (svc.internal_policy_local if policy == "internal"
                    else svc.external_policy_local)
    if local_policy and not ep.is_local:
        field_name = "internalTrafficPolicy" if policy == "internal" else "externalTrafficPolicy"
        return f"not local ({field_name}: Local)"
    if not ep.ready:
        return "terminating (used only as fallback, while no endpoint is ready)"
    return _topology(endpoints, node)(ep) or "not used"


def _endpoint_view(ep: Endpoint) -> dict[str, Any]:
    return {"address": ep.address, "node": ep.node_name or None, "zone": ep.zone or None,
            "local": ep.is_local, "ready": ep.ready, "serving": ep.serving,
            "terminating": ep.terminating}


def service_state(svc: ServicePort, endpoints: Sequence[Endpoint], node: NodeInfo, *,
                  chains: Sequence[str] = (),
                  virtual_servers: Sequence[VirtualServer] = (),
                  mode: str = "iptables") -> dict[str, Any]:
    """One service port's entry."""
    sets = categorize(endpoints, svc, node)
    internal = sets.local if svc.internal_policy_local else sets.cluster
    external = (sets.local if svc.external_policy_local else sets.cluster) \
        if svc.externally_accessible else ()
    internal_set = {e.address for e in internal}
    external_set = {e.address for e in external}
    addresses: dict[str, Any] = {"clusterIP": _hostport(svc.cluster_ip, svc.port)}
    if svc.external_ips:
        addresses["externalIPs"] = [_hostport(ip, svc.port) for ip in svc.external_ips]
    if svc.load_balancer_ips:
        addresses["loadBalancerIPs"] = [_hostport(ip, svc.port) for ip in svc.load_balancer_ips]
    if svc.load_balancer_source_ranges:
        addresses["loadBalancerSourceRanges"] = [str(c) for c in svc.load_balancer_source_ranges]
    if svc.node_port:
        addresses["nodePort"] = svc.node_port
    if svc.health_check_node_port:
        addresses["healthCheckNodePort"] = svc.health_check_node_port

    used: list[dict[str, Any]] = []
    unused: list[dict[str, Any]] = []
    for ep in sorted(endpoints, key=lambda e: (e.ip.version, e.ip, e.port)):
        view = _endpoint_view(ep)
        traffic = [name for name, chosen in (("internal", internal_set),
                                             ("external", external_set))
                   if ep.address in chosen]
        if traffic:
            view["traffic"] = traffic
            if not ep.ready:
                view["note"] = "terminating: used as fallback, no endpoint is ready"
            if svc.externally_accessible and "external" not in traffic:
                view["notForExternal"] = _not_used(ep, svc, endpoints, node, "external")
            if "internal" not in traffic:
                view["notForInternal"] = _not_used(ep, svc, endpoints, node, "internal")
            used.append(view)
        else:
            view["reason"] = _not_used(ep, svc, endpoints, node, "internal")
            unused.append(view)

    if not sets.has_any:
        status = "no endpoints: connections are rejected"
    elif not internal:
        status = "no local endpoints: internal traffic is dropped"
    elif svc.externally_accessible and not external:
        status = "no local endpoints: external traffic is dropped"
    else:
        status = "ok"
    entry: dict[str, Any] = {
        "service": service_label(svc.name),
        "type": str(svc.type),
        "status": status,
        "addresses": addresses,
        "trafficPolicy": {"internal": "Local" if svc.internal_policy_local else "Cluster",
                          "external": "Local" if svc.external_policy_local else "Cluster"},
        "sessionAffinityTimeout": svc.affinity_timeout or None,
        "endpoints": {"inUse": used, "notInUse": unused},
    }
    if mode == "ipvs":
        entry["virtualServers"] = [
            {"virtualServer": str(vs.key), "scheduler": vs.scheduler,
             "persistence": vs.persistence_timeout or None,
             "realServers": [_hostport(r.address, r.port) for r in vs.real_servers]}
            for vs in virtual_servers]
    else:
        entry["chains"] = list(chains)
    return entry


def build_state(services: Mapping[ServicePortName, ServicePort],
                endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
                node: NodeInfo, *, mode: str, synced: SyncInfo | None,
                failure: FailureInfo | None = None) -> dict[str, Any]:
    """The whole page. ``services``/``endpoints`` are what the last sync worked from."""
    ports = [service_state(services[spn], endpoints.get(spn, ()), node,
                           chains=synced.chains.get(spn, ()) if synced else (),
                           virtual_servers=synced.virtual_servers.get(spn, ()) if synced else (),
                           mode=mode)
             for spn in sorted(services)]
    return {
        "node": node.name,
        "mode": mode,
        "lastSync": (dict(_when(synced.finished) or {}, full=synced.full)
                     if synced is not None else None),
        "lastFullSync": _when(synced.last_full) if synced is not None else None,
        "lastFailedSync": (dict(_when(failure.at) or {}, error=failure.error)
                           if failure is not None else None),
        "servicePorts": ports,
    }


def virtual_servers_by_service(vss: Mapping[Any, VirtualServer]
                               ) -> dict[ServicePortName, tuple[VirtualServer, ...]]:
    out: dict[ServicePortName, list[VirtualServer]] = {}
    for key in sorted(vss):
        vs = vss[key]
        if vs.service is not None:
            out.setdefault(vs.service, []).append(vs)
    return {k: tuple(v) for k, v in out.items()}
