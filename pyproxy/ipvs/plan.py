"""Services and endpoints in, the IPVS state kube-proxy's IPVS mode would hold out.

Pure: plain dataclasses, no netlink. What it plans:

- a virtual server per service address and port (ClusterIP, externalIPs,
  LoadBalancer ingress IPs, and every node address for NodePorts), with the
  configured scheduler, and persistence for sessionAffinity ClientIP;
- its real servers: the usable endpoints under the same ready / serving /
  terminating and traffic-policy rules as iptables mode (`categorize`);
- the service addresses to bind on pyproxy's dummy interface;
- ipset members, and a small fixed iptables ruleset (PYPROXY- chains) that
  matches on those sets for what IPVS cannot do alone: masquerade (off-cluster,
  masqueradeAll, hairpin), NodePort and LoadBalancer handling, source ranges,
  eTP Local, and refusing services with no endpoint.

The fixed ruleset changes only when a set goes from empty to non-empty (as
upstream); per-service change is carried by ipset members, which is why IPVS
mode scales without rewriting iptables.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pyproxy.iptables.plan import (
    CANARY,
    FORWARD,
    MARK_MASQ,
    POSTROUTING,
    SERVICES,
    categorize,
)
from pyproxy.iptables.ruleset import Jump, Ruleset, Table, quote
from pyproxy.model import (
    Endpoint,
    IPAddress,
    IPFamily,
    IPNetwork,
    NodeInfo,
    Protocol,
    ServicePort,
    ServicePortName,
)

DUMMY_INTERFACE = "pyproxy-ipvs0"
DEFAULT_SCHEDULER = "rr"

NODE_PORT = "PYPROXY-NODE-PORT"
LOAD_BALANCER = "PYPROXY-LOAD-BALANCER"
IPVS_FILTER = "PYPROXY-IPVS-FILTER"
LB_FIREWALL = "PYPROXY-FIREWALL"


class SetType(enum.StrEnum):
    HASH_IP = "hash:ip"
    HASH_IP_PORT = "hash:ip,port"
    HASH_IP_PORT_IP = "hash:ip,port,ip"
    HASH_IP_PORT_NET = "hash:ip,port,net"
    BITMAP_PORT = "bitmap:port"


class IPSet(enum.StrEnum):
    """pyproxy's ipsets (upstream's KUBE-* sets, under pyproxy's prefix)."""

    CLUSTER_IP = "PYPROXY-CLUSTER-IP"
    LOOP_BACK = "PYPROXY-LOOP-BACK"
    EXTERNAL_IP = "PYPROXY-EXTERNAL-IP"
    EXTERNAL_IP_LOCAL = "PYPROXY-EXTERNAL-IP-LOCAL"
    LOAD_BALANCER = "PYPROXY-LOAD-BALANCER"
    LOAD_BALANCER_LOCAL = "PYPROXY-LOAD-BALANCER-LOCAL"
    LOAD_BALANCER_FW = "PYPROXY-LOAD-BALANCER-FW"
    LOAD_BALANCER_SOURCE_IP = "PYPROXY-LB-SOURCE-IP"
    LOAD_BALANCER_SOURCE_CIDR = "PYPROXY-LB-SOURCE-CIDR"
    NODE_PORT_TCP = "PYPROXY-NODE-PORT-TCP"
    NODE_PORT_LOCAL_TCP = "PYPROXY-NODE-PORT-LOCAL-TCP"
    NODE_PORT_UDP = "PYPROXY-NODE-PORT-UDP"
    NODE_PORT_LOCAL_UDP = "PYPROXY-NODE-PORT-LOCAL-UDP"
    NODE_PORT_SCTP = "PYPROXY-NODE-PORT-SCTP"
    NODE_PORT_LOCAL_SCTP = "PYPROXY-NODE-PORT-LOCAL-SCTP"
    HEALTH_CHECK_NODE_PORT = "PYPROXY-HEALTH-CHECK-NODE-PORT"
    NO_ENDPOINTS = "PYPROXY-NO-ENDPOINTS"
    IPVS_IPS = "PYPROXY-IPVS-IPS"


SET_TYPES: Mapping[IPSet, SetType] = {
    IPSet.CLUSTER_IP: SetType.HASH_IP_PORT,
    IPSet.LOOP_BACK: SetType.HASH_IP_PORT_IP,
    IPSet.EXTERNAL_IP: SetType.HASH_IP_PORT,
    IPSet.EXTERNAL_IP_LOCAL: SetType.HASH_IP_PORT,
    IPSet.LOAD_BALANCER: SetType.HASH_IP_PORT,
    IPSet.LOAD_BALANCER_LOCAL: SetType.HASH_IP_PORT,
    IPSet.LOAD_BALANCER_FW: SetType.HASH_IP_PORT,
    IPSet.LOAD_BALANCER_SOURCE_IP: SetType.HASH_IP_PORT_IP,
    IPSet.LOAD_BALANCER_SOURCE_CIDR: SetType.HASH_IP_PORT_NET,
    IPSet.NODE_PORT_TCP: SetType.BITMAP_PORT,
    IPSet.NODE_PORT_LOCAL_TCP: SetType.BITMAP_PORT,
    IPSet.NODE_PORT_UDP: SetType.BITMAP_PORT,
    IPSet.NODE_PORT_LOCAL_UDP: SetType.BITMAP_PORT,
    IPSet.NODE_PORT_SCTP: SetType.HASH_IP_PORT,
    IPSet.NODE_PORT_LOCAL_SCTP: SetType.HASH_IP_PORT,
    IPSet.HEALTH_CHECK_NODE_PORT: SetType.BITMAP_PORT,
    IPSet.NO_ENDPOINTS: SetType.HASH_IP_PORT,
    IPSet.IPVS_IPS: SetType.HASH_IP,
}


@dataclass(frozen=True, slots=True, order=True)
class SetEntry:
    """One ipset member, in ipset's own fields (``ip``, ``proto:port``, ``ip`` or ``net``)."""

    ip: str = ""
    protocol: str = ""  # "tcp" | "udp" | "sctp" with a port; "" for bitmap:port and hash:ip
    port: int = 0
    ip2: str = ""  # the third field of hash:ip,port,ip and hash:ip,port,net

    def __str__(self) -> str:
        """As `ipset list` prints it."""
        parts = []
        if self.ip:
            parts.append(self.ip)
        if self.protocol:
            parts.append(f"{self.protocol}:{self.port}")
        elif self.port:
            parts.append(str(self.port))
        if self.ip2:
            parts.append(self.ip2)
        return ",".join(parts)


@dataclass(frozen=True, slots=True, order=True)
class VirtualServerKey:
    """The identity IPVS itself uses for a virtual service."""

    protocol: Protocol
    address: str  # an IP address, as text, for stable ordering
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol.lower()}/{host}:{self.port}"


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    address: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class VirtualServer:
    key: VirtualServerKey
    scheduler: str
    persistence_timeout: int = 0  # seconds; 0 means no persistence
    real_servers: tuple[RealServer, ...] = ()
    service: ServicePortName | None = None  # for logs and /state; not part of the kernel state

    def kernel_view(self) -> tuple[VirtualServerKey, str, int]:
        """The attributes the kernel holds for the virtual server itself."""
        return (self.key, self.scheduler, self.persistence_timeout)


@dataclass(frozen=True)
class IPVSContext:
    node: NodeInfo
    family: IPFamily = IPFamily.IPv4
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    scheduler: str = DEFAULT_SCHEDULER
    # Where NodePorts listen: the node's own addresses (not those on the dummy interface).
    node_port_addresses: tuple[IPAddress, ...] = ()

    @property
    def mark(self) -> str:
        return hex(1 << self.masquerade_bit)

    @property
    def version(self) -> int:
        return 4 if self.family is IPFamily.IPv4 else 6


@dataclass
class IPVSPlan:
    virtual_servers: dict[VirtualServerKey, VirtualServer] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)  # bound on DUMMY_INTERFACE
    ipsets: dict[IPSet, set[SetEntry]] = field(
        default_factory=lambda: {name: set() for name in IPSet})
    ruleset: Ruleset = field(default_factory=Ruleset)


def _entry(ip: IPAddress | str, svc: ServicePort, port: int, ip2: str = "") -> SetEntry:
    return SetEntry(str(ip), svc.protocol.lower(), port, ip2)


def plan(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    ctx: IPVSContext,
) -> IPVSPlan:
    out = IPVSPlan()
    sets = out.ipsets
    for spn in sorted(services):
        svc = services[spn]
        eps = categorize(endpoints.get(spn, ()), svc, ctx.node)
        internal = eps.local if svc.internal_policy_local else eps.cluster
        external = eps.local if svc.external_policy_local else eps.cluster

        def add(ip: IPAddress | str, port: int, chosen: Sequence[Endpoint],
                svc: ServicePort = svc, has_any: bool = eps.has_any) -> None:
            key = VirtualServerKey(svc.protocol, str(ip), port)
            out.virtual_servers[key] = VirtualServer(
                key=key,
                scheduler=ctx.scheduler,
                persistence_timeout=svc.affinity_timeout,
                real_servers=tuple(sorted(RealServer(str(e.ip), e.port) for e in chosen)),
                service=svc.name,
            )
            if not has_any:
                sets[IPSet.NO_ENDPOINTS].add(_entry(ip, svc, port))

        # ClusterIP
        add(svc.cluster_ip, svc.port, internal)
        out.addresses.add(str(svc.cluster_ip))
        sets[IPSet.CLUSTER_IP].add(_entry(svc.cluster_ip, svc, svc.port))
        sets[IPSet.IPVS_IPS].add(SetEntry(str(svc.cluster_ip)))
        for ep in eps.reachable:  # hairpin: an endpoint reaching itself through the service
            sets[IPSet.LOOP_BACK].add(_entry(ep.ip, svc, ep.port, str(ep.ip)))
        # externalIPs
        for ip in svc.external_ips:
            add(ip, svc.port, external)
            out.addresses.add(str(ip))
            sets[IPSet.IPVS_IPS].add(SetEntry(str(ip)))
            local = IPSet.EXTERNAL_IP_LOCAL if svc.external_policy_local else IPSet.EXTERNAL_IP
            sets[local].add(_entry(ip, svc, svc.port))
        # LoadBalancer ingress IPs
        for ip in svc.load_balancer_ips:
            add(ip, svc.port, external)
            out.addresses.add(str(ip))
            sets[IPSet.IPVS_IPS].add(SetEntry(str(ip)))
            sets[IPSet.LOAD_BALANCER].add(_entry(ip, svc, svc.port))
            if svc.external_policy_local:
                sets[IPSet.LOAD_BALANCER_LOCAL].add(_entry(ip, svc, svc.port))
            if svc.load_balancer_source_ranges:
                sets[IPSet.LOAD_BALANCER_FW].add(_entry(ip, svc, svc.port))
                for cidr in svc.load_balancer_source_ranges:
                    sets[IPSet.LOAD_BALANCER_SOURCE_CIDR].add(
                        _entry(ip, svc, svc.port, str(cidr)))
                # As upstream: a node inside the ranges reaching the LB IP, which is local,
                # arrives with the LB IP as its source.
                if any(n in cidr for n in ctx.node.addresses
                       for cidr in svc.load_balancer_source_ranges
                       if n.version == cidr.version):
                    sets[IPSet.LOAD_BALANCER_SOURCE_IP].add(_entry(ip, svc, svc.port, str(ip)))
        # NodePorts
        if svc.node_port:
            for addr in ctx.node_port_addresses:
                if addr.version == ctx.version:
                    add(addr, svc.node_port, external)
            _node_port_sets(sets, svc, ctx)
        if svc.health_check_node_port:
            sets[IPSet.HEALTH_CHECK_NODE_PORT].add(SetEntry(port=svc.health_check_node_port))
    out.ruleset = ruleset(ctx, {name for name, members in sets.items() if members})
    return out


def _node_port_sets(sets: dict[IPSet, set[SetEntry]], svc: ServicePort,
                    ctx: IPVSContext) -> None:
    proto = svc.protocol
    if proto is Protocol.SCTP:
        # bitmap:port cannot tell protocols apart; SCTP node ports use hash:ip,port
        # keyed on the node addresses they are reachable at (upstream does the same).
        for addr in ctx.node_port_addresses:
            if addr.version == ctx.version:
                sets[IPSet.NODE_PORT_SCTP].add(SetEntry(str(addr), "sctp", svc.node_port))
                if svc.external_policy_local:
                    sets[IPSet.NODE_PORT_LOCAL_SCTP].add(
                        SetEntry(str(addr), "sctp", svc.node_port))
        return
    table = {
        Protocol.TCP: (IPSet.NODE_PORT_TCP, IPSet.NODE_PORT_LOCAL_TCP),
        Protocol.UDP: (IPSet.NODE_PORT_UDP, IPSet.NODE_PORT_LOCAL_UDP),
    }[proto]
    sets[table[0]].add(SetEntry(port=svc.node_port))
    if svc.external_policy_local:
        sets[table[1]].add(SetEntry(port=svc.node_port))


def _set(name: IPSet, flags: str) -> str:
    return f"-m set --match-set {name} {flags}"


def _comment(text: str) -> str:
    return f"-m comment --comment {quote(text)}"


def ruleset(ctx: IPVSContext, nonempty: set[IPSet]) -> Ruleset:
    """The fixed iptables rules IPVS mode needs, given which sets have members.

    Written as iptables-save prints them, so syncs can diff against the kernel.
    """
    mark = ctx.mark
    rs = Ruleset()
    nat = rs.table(Table.NAT)
    flt = rs.table(Table.FILTER)
    services: list[str] = []
    cidrs = [c for c in ctx.cluster_cidrs if c.version == ctx.version]
    if IPSet.CLUSTER_IP in nonempty:
        match = _set(IPSet.CLUSTER_IP, "dst,dst")
        if ctx.masquerade_all:
            services.append(f'{_comment("masquerade all service traffic")} {match} '
                            f"-j {MARK_MASQ}")
        else:
            for cidr in cidrs:
                services.append(f"! -s {cidr} {_comment('masquerade off-cluster traffic')} "
                                f"{match} -j {MARK_MASQ}")
    if IPSet.EXTERNAL_IP in nonempty:
        services.append(f"{_comment('masquerade external IP traffic')} "
                        f"{_set(IPSet.EXTERNAL_IP, 'dst,dst')} -j {MARK_MASQ}")
    if IPSet.LOAD_BALANCER in nonempty:
        services.append(f"{_set(IPSet.LOAD_BALANCER, 'dst,dst')} -j {LOAD_BALANCER}")
    services.append(f"{_comment('pyproxy service nodeports')} -m addrtype --dst-type LOCAL "
                    f"-j {NODE_PORT}")
    nat[SERVICES] = tuple(services)

    lb: list[str] = []
    if IPSet.LOAD_BALANCER_LOCAL in nonempty:
        lb.append(f"{_set(IPSet.LOAD_BALANCER_LOCAL, 'dst,dst')} -j RETURN")
    lb.append(f"-j {MARK_MASQ}")
    nat[LOAD_BALANCER] = tuple(lb)

    node_port: list[str] = []
    for proto, all_set, local_set, flags in (
        ("tcp", IPSet.NODE_PORT_TCP, IPSet.NODE_PORT_LOCAL_TCP, "dst"),
        ("udp", IPSet.NODE_PORT_UDP, IPSet.NODE_PORT_LOCAL_UDP, "dst"),
        ("sctp", IPSet.NODE_PORT_SCTP, IPSet.NODE_PORT_LOCAL_SCTP, "dst,dst"),
    ):
        if local_set in nonempty:
            node_port.append(f"-p {proto} {_set(local_set, flags)} -j RETURN")
        if all_set in nonempty:
            node_port.append(f"-p {proto} {_set(all_set, flags)} -j {MARK_MASQ}")
    nat[NODE_PORT] = tuple(node_port)

    postrouting = []
    if IPSet.LOOP_BACK in nonempty:
        postrouting.append(f"{_comment('pyproxy endpoint hairpin')} "
                           f"{_set(IPSet.LOOP_BACK, 'dst,dst,src')} -j MASQUERADE")
    postrouting += [
        f"-m mark ! --mark {mark}/{mark} -j RETURN",
        f"-j MARK --set-xmark {mark}/0x0",
        f'{_comment("pyproxy service traffic requiring SNAT")} -j MASQUERADE --random-fully',
    ]
    nat[POSTROUTING] = tuple(postrouting)
    nat[MARK_MASQ] = (f"-j MARK --set-xmark {mark}/{mark}",)

    reject = ("REJECT --reject-with icmp-port-unreachable" if ctx.version == 4
              else "REJECT --reject-with icmp6-port-unreachable")
    filters: list[str] = []
    if IPSet.NO_ENDPOINTS in nonempty:
        filters.append(f"{_comment('service has no endpoints')} "
                       f"{_set(IPSet.NO_ENDPOINTS, 'dst,dst')} -j {reject}")
    if IPSet.LOAD_BALANCER_FW in nonempty:
        src = []
        for s in (IPSet.LOAD_BALANCER_SOURCE_CIDR, IPSet.LOAD_BALANCER_SOURCE_IP):
            if s in nonempty:
                src.append(f"-m set ! --match-set {s} dst,dst,src")
        filters.append(f"{_comment('loadBalancerSourceRanges')} "
                       f"{_set(IPSet.LOAD_BALANCER_FW, 'dst,dst')} {' '.join(src)} -j DROP")
    # Traffic to a service address on a port that is not a service port is refused,
    # as upstream's KUBE-IPVS-FILTER: the dummy interface must not expose the node.
    if IPSet.IPVS_IPS in nonempty:
        for s, flags in ((IPSet.CLUSTER_IP, "dst,dst"), (IPSet.LOAD_BALANCER, "dst,dst"),
                         (IPSet.EXTERNAL_IP, "dst,dst"), (IPSet.EXTERNAL_IP_LOCAL, "dst,dst"),
                         (IPSet.HEALTH_CHECK_NODE_PORT, "dst")):
            if s in nonempty:
                filters.append(f"{_set(s, flags)} -j RETURN")
        filters.append(f"-m conntrack --ctstate NEW {_set(IPSet.IPVS_IPS, 'dst')} -j {reject}")
    flt[IPVS_FILTER] = tuple(filters)
    health = []
    if IPSet.HEALTH_CHECK_NODE_PORT in nonempty:
        health.append(f"{_comment('pyproxy health check node port')} "
                      f"{_set(IPSet.HEALTH_CHECK_NODE_PORT, 'dst')} -j ACCEPT")
    flt[NODE_PORT] = tuple(health)
    flt[CANARY] = nat[CANARY] = ()
    flt[FORWARD] = (
        "-m conntrack --ctstate INVALID -j DROP",
        f'-m comment --comment "pyproxy forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT',
        '-m comment --comment "pyproxy forwarding conntrack rule" -m conntrack --ctstate '
        "RELATED,ESTABLISHED -j ACCEPT",
    )
    rs.jumps = (
        Jump(Table.NAT, "PREROUTING", f'{_comment("pyproxy service portals")} -j {SERVICES}'),
        Jump(Table.NAT, "OUTPUT", f'{_comment("pyproxy service portals")} -j {SERVICES}'),
        Jump(Table.NAT, "POSTROUTING",
             f'{_comment("pyproxy postrouting rules")} -j {POSTROUTING}'),
        Jump(Table.FILTER, "INPUT", f'{_comment("pyproxy ipvs access filter")} -j {IPVS_FILTER}'),
        Jump(Table.FILTER, "INPUT", f'{_comment("pyproxy health check rules")} -j {NODE_PORT}'),
        Jump(Table.FILTER, "FORWARD", f'{_comment("pyproxy forwarding rules")} -j {FORWARD}'),
    )
    return rs


def node_port_addresses(addresses: Sequence[str], excluded: Sequence[str] = ()) -> tuple[
        IPAddress, ...]:
    """The node's addresses NodePorts listen on: local ones, minus loopback and service VIPs."""
    out = []
    for text in addresses:
        ip = ipaddress.ip_address(text)
        if ip.is_loopback or ip.is_link_local or text in excluded:
            continue
        out.append(ip)
    return tuple(sorted(set(out), key=lambda a: (a.version, int(a))))


def describe(p: IPVSPlan) -> str:
    """The plan as an operator reads it: ipvsadm-save lines, addresses, ipset-save lines.

    The lines between the first two headers are valid ``ipvsadm --restore``
    input (which accepts no comments at all, not even at the end of a line), so
    which service each virtual server belongs to is listed in a section of its own.
    """
    flag = {Protocol.TCP: "-t", Protocol.UDP: "-u", Protocol.SCTP: "--sctp-service"}
    lines = ["# IPVS virtual and real servers (ipvsadm --restore format)"]
    owners = []
    for key in sorted(p.virtual_servers):
        vs = p.virtual_servers[key]
        host = f"[{key.address}]" if ":" in key.address else key.address
        where = f"{flag[key.protocol]} {host}:{key.port}"
        persist = f" -p {vs.persistence_timeout}" if vs.persistence_timeout else ""
        lines.append(f"-A {where} -s {vs.scheduler}{persist}")
        for rs in vs.real_servers:
            rhost = f"[{rs.address}]" if ":" in rs.address else rs.address
            lines.append(f"-a {where} -r {rhost}:{rs.port} -m -w {rs.weight}")
        if vs.service:
            owners.append(f"{key} {vs.service}")
    lines.append("# service of each virtual server")
    lines.extend(owners)
    lines.append(f"# addresses on {DUMMY_INTERFACE}")
    lines.extend(sorted(p.addresses, key=lambda a: (":" in a, a)))
    lines.append("# ipsets (ipset save format)")
    for name in sorted(p.ipsets):
        lines.append(f"create {name} {SET_TYPES[name]}")
        lines.extend(f"add {name} {entry}" for entry in sorted(p.ipsets[name]))
    return "\n".join(lines) + "\n"
