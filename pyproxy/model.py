"""The typed model every other module works on.

API objects arrive as loosely typed dicts (from the watch or from YAML files).
They are validated once, here, and turned into frozen dataclasses; nothing
downstream ever sees a raw dict, so a malformed object can only fail at this
border, where the error can name the object and the field.

Nothing here is IPv4-only: every address carries its family, and a proxier
asks for the family it serves.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
TOPOLOGY_MODE_ANNOTATION = "service.kubernetes.io/topology-mode"
MAX_AFFINITY_TIMEOUT = 86400
DEFAULT_AFFINITY_TIMEOUT = 10800


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class IPFamily(enum.StrEnum):
    IPv4 = "IPv4"
    IPv6 = "IPv6"

    @staticmethod
    def of(addr: IPAddress | IPNetwork) -> IPFamily:
        return IPFamily.IPv4 if addr.version == 4 else IPFamily.IPv6


class ServiceType(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class InvalidObject(ValueError):
    """An API object that cannot be used; names the object and the field."""

    def __init__(self, kind: str, key: str, field_path: str, message: str) -> None:
        self.kind = kind
        self.key = key
        self.field_path = field_path
        self.message = message
        super().__init__(f"{kind} {key}: {field_path}: {message}")


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """Identity of one port of one Service: what chain names are hashed from."""

    namespace: str
    name: str
    port: str  # the port's name; "" for a single unnamed port
    protocol: Protocol

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        # kube-proxy's ServicePortName.String(): "ns/name:port" (":port" only when named)
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service, for one IP family, with everything a proxier reads."""

    name: ServicePortName
    family: IPFamily
    type: ServiceType
    cluster_ip: IPAddress
    port: int
    node_port: int = 0
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ips: tuple[IPAddress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    affinity_timeout: int = 0  # seconds of ClientIP affinity; 0 means no affinity
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0
    topology_aware: bool = False  # zone hints (topology-mode Auto or PreferClose/SameZone)
    prefer_same_node: bool = False

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

    @property
    def externally_accessible(self) -> bool:
        """NodePort, externalIPs or LoadBalancer ingress: reachable from off the cluster."""
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        # Even with eTP=Local, pod and node traffic to external addresses is
        # short-circuited to all endpoints, so cluster endpoints are needed.
        return (not self.internal_policy_local) or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (
            self.external_policy_local and self.externally_accessible
        )


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One backend address of one service port, with the conditions the proxier needs."""

    ip: IPAddress
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    is_local: bool = False
    zone_hints: tuple[str, ...] | None = None
    node_hints: tuple[str, ...] | None = None

    @property
    def address(self) -> str:
        """ip:port as DNAT and chain hashing spell it (brackets for IPv6)."""
        return _address(self.ip, self.port)

    def __str__(self) -> str:
        return self.address


@functools.lru_cache(maxsize=1 << 13)
def _address(ip: IPAddress, port: int) -> str:
    # Memoized: planners spell every endpoint several times per sync.
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the proxy needs to know about the node it runs on."""

    name: str
    addresses: tuple[IPAddress, ...] = ()
    zone: str = ""
    pod_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """One validated EndpointSlice: a piece of one Service's endpoints."""

    namespace: str
    name: str
    service: str
    family: IPFamily
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]

    @property
    def service_key(self) -> tuple[str, str]:
        return (self.namespace, self.service)


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    ip: IPAddress
    ready: bool
    serving: bool
    terminating: bool
    node_name: str
    zone: str
    zone_hints: tuple[str, ...] | None
    node_hints: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class Service:
    """A validated Service: its ports for every family it has a cluster IP in."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...] = field(default_factory=tuple)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def ports_for(self, family: IPFamily) -> tuple[ServicePort, ...]:
        return tuple(p for p in self.ports if p.family is family)


# --------------------------------------------------------------------------
# Conversion from API dicts. Each raises InvalidObject naming the field.


class _Reader:
    """Walks one API object, turning type surprises into InvalidObject errors."""

    def __init__(self, kind: str, obj: Any) -> None:
        self.kind = kind
        if not isinstance(obj, Mapping):
            raise InvalidObject(kind, "?", "", "object is not a mapping")
        self.obj = obj
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            raise InvalidObject(kind, "?", "metadata", "missing or not a mapping")
        self.meta = meta
        name = meta.get("name")
        namespace = meta.get("namespace") or ""
        self.namespace = _shared(namespace) if isinstance(namespace, str) else namespace
        self.key = f"{self.namespace}/{name}" if self.namespace else str(name)
        if not isinstance(name, str) or not name:
            raise InvalidObject(kind, self.key, "metadata.name", "missing")
        self.name = name

    def fail(self, path: str, message: str) -> InvalidObject:
        return InvalidObject(self.kind, self.key, path, message)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        return value

    def seq(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {type(value).__name__}")
        return value

    def string(self, value: Any, path: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {value!r}")
        return value

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {value!r}")
        return value

    def port(self, value: Any, path: str, *, allow_zero: bool = False) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"expected a port number, got {value!r}")
        low = 0 if allow_zero else 1
        if not low <= value <= 65535:
            raise self.fail(path, f"port {value} out of range {low}-65535")
        return value

    def protocol(self, value: Any, path: str) -> Protocol:
        if value is None:
            return Protocol.TCP
        try:
            return Protocol(value)
        except ValueError:
            raise self.fail(path, f"unknown protocol {value!r} (TCP, UDP or SCTP)") from None

    def ip(self, value: Any, path: str) -> IPAddress:
        if not isinstance(value, str):
            raise self.fail(path, f"expected an IP address, got {value!r}")
        try:
            return ipaddress.ip_address(value.strip())
        except ValueError:
            raise self.fail(path, f"invalid IP address {value!r}") from None

    def cidr(self, value: Any, path: str) -> IPNetwork:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a CIDR, got {value!r}")
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise self.fail(path, f"invalid CIDR {value!r}") from None


def _shared(value: str) -> str:
    """One copy of a string that many objects repeat (a namespace, a node or zone name).

    Each API object arrives with its own copies; at 10,000 Services × 5
    endpoints the node and zone names alone would cost ~5 MB, one copy each.
    """
    return sys.intern(value)


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def service_is_proxied(obj: Mapping[str, Any]) -> bool:
    """False for Services no proxier programs: ExternalName and headless ones."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return True  # let parse_service report the missing spec
    if spec.get("type") == "ExternalName":
        return False
    # As parse_service: clusterIPs[0] when given (the API sets ["None"] for headless).
    cluster_ips = spec.get("clusterIPs")
    if isinstance(cluster_ips, list) and cluster_ips:
        return cluster_ips[0] not in ("", "None", None)
    return spec.get("clusterIP") not in ("", "None", None)


def parse_service(obj: Any) -> Service | None:
    """Validate a core/v1 Service dict. None for ones no proxier programs."""
    r = _Reader("Service", obj)
    if not r.namespace:
        raise r.fail("metadata.namespace", "missing")
    spec = r.mapping(obj.get("spec"), "spec")
    if not spec:
        raise r.fail("spec", "missing")
    svc_type_raw = r.string(spec.get("type"), "spec.type", "ClusterIP")
    if svc_type_raw == "ExternalName":
        return None
    try:
        svc_type = ServiceType(svc_type_raw)
    except ValueError:
        raise r.fail("spec.type", f"unknown type {svc_type_raw!r}") from None

    cluster_ips_raw = r.seq(spec.get("clusterIPs"), "spec.clusterIPs")
    primary = r.string(spec.get("clusterIP"), "spec.clusterIP")
    from_primary = not cluster_ips_raw and bool(primary)
    if from_primary:
        cluster_ips_raw = [primary]
    if not cluster_ips_raw or cluster_ips_raw[0] in ("", "None"):
        return None  # headless
    cluster_ips = [
        r.ip(v, "spec.clusterIP" if from_primary else f"spec.clusterIPs[{i}]")
        for i, v in enumerate(cluster_ips_raw)
    ]
    if primary and primary not in ("None",) and r.ip(primary, "spec.clusterIP") != cluster_ips[0]:
        raise r.fail("spec.clusterIP", "does not match spec.clusterIPs[0]")
    if len({ip.version for ip in cluster_ips}) != len(cluster_ips):
        raise r.fail("spec.clusterIPs", "more than one address of one family")

    external_ips = tuple(
        r.ip(v, f"spec.externalIPs[{i}]")
        for i, v in enumerate(r.seq(spec.get("externalIPs"), "spec.externalIPs"))
    )
    source_ranges = tuple(
        r.cidr(v, f"spec.loadBalancerSourceRanges[{i}]")
        for i, v in enumerate(
            r.seq(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
        )
    )
    lb_ips: list[IPAddress] = []
    if svc_type is ServiceType.LOAD_BALANCER:
        status = r.mapping(obj.get("status"), "status")
        lb = r.mapping(status.get("loadBalancer"), "status.loadBalancer")
        for i, ing in enumerate(r.seq(lb.get("ingress"), "status.loadBalancer.ingress")):
            path = f"status.loadBalancer.ingress[{i}]"
            ing = r.mapping(ing, path)
            if ing.get("ip") in (None, ""):
                continue  # hostname-only ingress: nothing to program
            mode = r.string(ing.get("ipMode"), f"{path}.ipMode", "VIP")
            if mode not in ("VIP", "Proxy"):
                raise r.fail(f"{path}.ipMode", f"unknown ipMode {mode!r}")
            if mode == "VIP":
                lb_ips.append(r.ip(ing.get("ip"), f"{path}.ip"))

    affinity = r.string(spec.get("sessionAffinity"), "spec.sessionAffinity", "None")
    affinity_timeout = 0
    if affinity == "ClientIP":
        cfg = r.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
        client = r.mapping(cfg.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
        t = client.get("timeoutSeconds")
        if t is None:  # null is absent; the apiserver defaults it
            t = DEFAULT_AFFINITY_TIMEOUT
        path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        if isinstance(t, bool) or not isinstance(t, int) or not 0 < t <= MAX_AFFINITY_TIMEOUT:
            raise r.fail(path, f"must be 1-{MAX_AFFINITY_TIMEOUT}, got {t!r}")
        affinity_timeout = t
    elif affinity != "None":
        raise r.fail("spec.sessionAffinity", f"unknown value {affinity!r} (None or ClientIP)")

    etp = r.string(spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy", "Cluster")
    itp = r.string(spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy", "Cluster")
    for path, value in (
        ("spec.externalTrafficPolicy", etp),
        ("spec.internalTrafficPolicy", itp),
    ):
        if value not in ("Cluster", "Local"):
            raise r.fail(path, f"unknown value {value!r} (Cluster or Local)")
    hc_port = spec.get("healthCheckNodePort")
    health_check_node_port = (
        r.port(hc_port, "spec.healthCheckNodePort", allow_zero=True) if hc_port else 0
    )

    annotations = r.mapping(r.meta.get("annotations"), "metadata.annotations")
    distribution = spec.get("trafficDistribution")
    topology_aware = annotations.get(TOPOLOGY_MODE_ANNOTATION) in ("Auto", "auto") or (
        distribution in ("PreferClose", "PreferSameZone")
    )
    prefer_same_node = distribution == "PreferSameNode"

    raw_ports = r.seq(spec.get("ports"), "spec.ports")
    if not raw_ports:
        raise r.fail("spec.ports", "a Service needs at least one port")
    seen: set[str] = set()
    ports: list[ServicePort] = []
    for i, raw in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        raw = r.mapping(raw, path)
        pname = r.string(raw.get("name"), f"{path}.name")
        if not pname and len(raw_ports) > 1:
            raise r.fail(f"{path}.name", "required when a Service has more than one port")
        if pname in seen:
            raise r.fail(f"{path}.name", f"duplicate port name {pname!r}")
        seen.add(pname)
        if "port" not in raw:
            raise r.fail(f"{path}.port", "missing")
        number = r.port(raw.get("port"), f"{path}.port")
        protocol = r.protocol(raw.get("protocol"), f"{path}.protocol")
        node_port = 0
        if raw.get("nodePort") and svc_type is not ServiceType.CLUSTER_IP:
            node_port = r.port(raw.get("nodePort"), f"{path}.nodePort")
        spn = ServicePortName(r.namespace, r.name, pname, protocol)
        for cip in cluster_ips:
            fam = IPFamily.of(cip)
            ports.append(
                ServicePort(
                    name=spn,
                    family=fam,
                    type=svc_type,
                    cluster_ip=cip,
                    port=number,
                    node_port=node_port,
                    external_ips=tuple(ip for ip in external_ips if ip.version == cip.version),
                    load_balancer_ips=tuple(ip for ip in lb_ips if ip.version == cip.version),
                    load_balancer_source_ranges=tuple(
                        n for n in source_ranges if n.version == cip.version
                    ),
                    affinity_timeout=affinity_timeout,
                    # upstream ExternalPolicyLocal: NodePort, LB, or ClusterIP with externalIPs
                    external_policy_local=(etp == "Local" and (
                        svc_type is not ServiceType.CLUSTER_IP or bool(external_ips))),
                    internal_policy_local=itp == "Local",
                    health_check_node_port=health_check_node_port,
                    topology_aware=topology_aware,
                    prefer_same_node=prefer_same_node,
                )
            )
    return Service(r.namespace, r.name, tuple(ports))


def parse_endpoint_slice(obj: Any) -> EndpointSlice | None:
    """Validate a discovery.k8s.io/v1 EndpointSlice. None for slices no proxier uses."""
    r = _Reader("EndpointSlice", obj)
    if not r.namespace:
        raise r.fail("metadata.namespace", "missing")
    labels = r.mapping(r.meta.get("labels"), "metadata.labels")
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        return None  # not owned by a Service: kube-proxy ignores it
    address_type = obj.get("addressType")
    if address_type == "FQDN":
        return None
    try:
        family = IPFamily(address_type)
    except ValueError:
        raise r.fail("addressType", f"unknown addressType {address_type!r}") from None

    ports: list[SlicePort] = []
    for i, raw in enumerate(r.seq(obj.get("ports"), "ports")):
        path = f"ports[{i}]"
        raw = r.mapping(raw, path)
        if raw.get("name") is None or not raw.get("port"):
            continue  # upstream ignores ports without a name or a number
        ports.append(
            SlicePort(
                name=r.string(raw.get("name"), f"{path}.name"),
                port=r.port(raw.get("port"), f"{path}.port"),
                protocol=r.protocol(raw.get("protocol"), f"{path}.protocol"),
            )
        )
    endpoints: list[SliceEndpoint] = []
    for i, raw in enumerate(r.seq(obj.get("endpoints"), "endpoints")):
        path = f"endpoints[{i}]"
        raw = r.mapping(raw, path)
        addresses = r.seq(raw.get("addresses"), f"{path}.addresses")
        if not addresses:
            raise r.fail(f"{path}.addresses", "missing")
        ip = r.ip(addresses[0], f"{path}.addresses[0]")
        if IPFamily.of(ip) is not family:
            raise r.fail(f"{path}.addresses[0]", f"{ip} is not an {family} address")
        cond = r.mapping(raw.get("conditions"), f"{path}.conditions")
        ready = r.boolean(cond.get("ready"), f"{path}.conditions.ready", True)
        terminating = r.boolean(cond.get("terminating"), f"{path}.conditions.terminating", False)
        # As upstream's EndpointSliceCache: serving nil means true, whatever ready says.
        serving = r.boolean(cond.get("serving"), f"{path}.conditions.serving", True)
        hints = r.mapping(raw.get("hints"), f"{path}.hints")
        zone_hints = _hint_names(r, hints.get("forZones"), f"{path}.hints.forZones")
        node_hints = _hint_names(r, hints.get("forNodes"), f"{path}.hints.forNodes")
        endpoints.append(
            SliceEndpoint(
                ip=ip,
                ready=ready,
                serving=serving,
                terminating=terminating,
                node_name=_shared(r.string(raw.get("nodeName"), f"{path}.nodeName")),
                zone=_shared(r.string(raw.get("zone"), f"{path}.zone")),
                zone_hints=zone_hints,
                node_hints=node_hints,
            )
        )
    return EndpointSlice(r.namespace, r.name, str(service), family, tuple(ports), tuple(endpoints))


def _hint_names(r: _Reader, value: Any, path: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = []
    for i, item in enumerate(r.seq(value, path)):
        item = r.mapping(item, f"{path}[{i}]")
        names.append(_shared(r.string(item.get("name"), f"{path}[{i}].name")))
    return tuple(names)


def parse_node(obj: Any) -> NodeInfo:
    """Validate a core/v1 Node: its addresses (InternalIP first), zone and pod CIDRs."""
    r = _Reader("Node", obj)
    status = r.mapping(obj.get("status"), "status")
    spec = r.mapping(obj.get("spec"), "spec")
    internal: list[IPAddress] = []
    external: list[IPAddress] = []
    for i, raw in enumerate(r.seq(status.get("addresses"), "status.addresses")):
        raw = r.mapping(raw, f"status.addresses[{i}]")
        kind = raw.get("type")
        if kind in ("InternalIP", "ExternalIP"):
            ip = r.ip(raw.get("address"), f"status.addresses[{i}].address")
            (internal if kind == "InternalIP" else external).append(ip)
    cidrs_raw = r.seq(spec.get("podCIDRs"), "spec.podCIDRs") or (
        [spec["podCIDR"]] if spec.get("podCIDR") else []
    )
    labels = r.mapping(r.meta.get("labels"), "metadata.labels")
    return NodeInfo(
        name=r.name,
        addresses=tuple(internal + external),
        zone=str(labels.get(ZONE_LABEL, "")),
        pod_cidrs=tuple(r.cidr(c, f"spec.podCIDRs[{i}]") for i, c in enumerate(cidrs_raw)),
    )


# --------------------------------------------------------------------------
# Merging slices into per-port endpoint lists (kube-proxy's EndpointSliceCache).


def merge_endpoints(
    slices: Iterable[EndpointSlice], node_name: str
) -> dict[tuple[str, Protocol], tuple[Endpoint, ...]]:
    """All endpoints of one Service, keyed by (port name, protocol), sorted.

    Several slices of one Service merge; an address listed twice collapses to
    one entry, preferring the one that says it is on this node (as upstream).
    """
    merged: dict[tuple[str, Protocol], dict[str, Endpoint]] = {}
    for sl in sorted(slices, key=lambda s: s.name):
        for sp in sl.ports:
            bucket = merged.setdefault((sp.name, sp.protocol), {})
            for se in sl.endpoints:
                ep = Endpoint(
                    ip=se.ip,
                    port=sp.port,
                    ready=se.ready,
                    serving=se.serving,
                    terminating=se.terminating,
                    node_name=se.node_name,
                    zone=se.zone,
                    is_local=bool(node_name) and se.node_name == node_name,
                    zone_hints=se.zone_hints,
                    node_hints=se.node_hints,
                )
                old = bucket.get(ep.address)
                if old is None or (ep.is_local and not old.is_local):
                    bucket[ep.address] = ep
    return {
        key: tuple(sorted(eps.values(), key=_endpoint_sort_key))
        for key, eps in merged.items()
    }


def _endpoint_sort_key(ep: Endpoint) -> tuple[int, int, int]:
    return (ep.ip.version, int(ep.ip), ep.port)
