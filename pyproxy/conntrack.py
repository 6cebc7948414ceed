"""Stale UDP (and SCTP) conntrack entries: which to delete after a sync, and deleting them.

A UDP "connection" is a conntrack entry that lives as long as the client keeps
sending. Rules only decide where a flow's *first* packet goes, so when an
endpoint goes away its clients keep being sent to it, and when a service that
was not served gains endpoints, clients whose flow was tracked to the bare
address keep being blackholed. kube-proxy deletes those entries after each
successful restore (pkg/proxy/conntrack); so does this module:

- An endpoint stopped being usable for a UDP/SCTP service port (removed, not
  ready, or no longer chosen by `categorize`): delete the flows to each of the
  port's addresses (ClusterIP, externalIPs, LoadBalancer IPs on the port; any
  address on the NodePort) that were DNATed to that endpoint.
- A UDP/SCTP service port went from no usable endpoint to some: delete the flows
  to its addresses that are not DNATed to one of its usable endpoints (those
  were tracked to the address itself and would never be DNATed).
- With nothing known about what the kernel held before (the first sync of a
  process, as with `pyproxy run --once`, or after a failure), reconcile: delete
  every flow to a service address that is not DNATed to a usable endpoint, as
  kube-proxy's current CleanStaleEntries does.

Deciding (`udp_state`, `stale_flows`, `reconcile`, `Matcher`) is pure;
`FlowTable` is the only kernel I/O, over pyroute2's ctnetlink socket: a dump of
the entries sent to each frontend concerned (filtered in the kernel), then one
delete per stale entry, which is what the `conntrack -D` tool does too. With
nothing to delete (the usual sync) the table is not touched at all.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

# Imported with the module, not when the first cleanup opens a socket: pyroute2 takes
# ~0.12 s to import, which the agent pays at start anyway (pyproxy.ipvs.netlink), and a
# lazy import put it, and the collections its allocations set off over a 10,000-service
# heap, into the first full sync.
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, NFCTSocket

from pyproxy.iptables.plan import categorize
from pyproxy.model import (
    Endpoint,
    IPAddress,
    IPFamily,
    NodeInfo,
    Protocol,
    ServicePort,
    ServicePortName,
)

log = logging.getLogger(__name__)

# Protocols whose flows outlive the endpoint they were sent to (upstream's
# IsClearConntrackNeeded).
CLEARED_PROTOCOLS = (Protocol.UDP, Protocol.SCTP)
IP_PROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP,
            Protocol.SCTP: socket.IPPROTO_SCTP}
_PROTOCOL_OF = {num: proto for proto, num in IP_PROTO.items()}

Backend = tuple[IPAddress, int]  # an endpoint as a DNATed flow's reply source: ip, port


# --------------------------------------------------------------------------
# What the kernel was told: the dataplane's own copy, taken at each sync.


@dataclass(frozen=True, slots=True)
class UDPPort:
    """What stale-flow cleanup needs of one UDP/SCTP service port, frozen at a sync."""

    name: ServicePortName
    addresses: tuple[IPAddress, ...]  # ClusterIP, externalIPs, LoadBalancer IPs
    port: int
    node_port: int
    usable: frozenset[Backend]  # endpoints some traffic to this port may be DNATed to

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol


UDPState = Mapping[ServicePortName, UDPPort]


def udp_port(svc: ServicePort, endpoints: Sequence[Endpoint], node: NodeInfo) -> UDPPort:
    sets = categorize(endpoints, svc, node)
    return UDPPort(
        name=svc.name,
        addresses=(svc.cluster_ip, *svc.external_ips, *svc.load_balancer_ips),
        port=svc.port,
        node_port=svc.node_port,
        usable=frozenset((e.ip, e.port) for e in sets.reachable),
    )


def udp_state(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    node: NodeInfo,
) -> dict[ServicePortName, UDPPort]:
    """The UDP/SCTP service ports and their usable endpoints, copied out of live maps."""
    return {
        spn: udp_port(svc, endpoints.get(spn, ()), node)
        for spn, svc in services.items()
        if spn.protocol in CLEARED_PROTOCOLS
    }


# --------------------------------------------------------------------------
# Deciding


@dataclass(frozen=True, slots=True)
class Flow:
    """One conntrack entry, as far as cleanup cares: its original and reply tuples."""

    protocol: Protocol
    orig_src: IPAddress
    orig_sport: int
    orig_dst: IPAddress
    orig_dport: int
    reply_src: IPAddress
    reply_sport: int

    @property
    def backend(self) -> Backend:
        """Where the flow really goes: the endpoint it was DNATed to, or its destination."""
        return (self.reply_src, self.reply_sport)


ENDPOINT_GONE = "endpoint no longer usable"
NEWLY_SERVED = "service gained endpoints"
RECONCILE = "not sent to a usable endpoint"


@dataclass(frozen=True, slots=True)
class Deletion:
    """Flows to delete: to one frontend (address and port, or any address on a NodePort),
    and either DNATed to `endpoint`, or (when it is None) not DNATed to any of `keep`."""

    service: ServicePortName
    reason: str
    port: int
    address: IPAddress | None = None  # None: a NodePort, on any node address
    endpoint: Backend | None = None
    keep: frozenset[Backend] = frozenset()

    @property
    def protocol(self) -> Protocol:
        return self.service.protocol

    def matches(self, flow: Flow) -> bool:
        if flow.protocol is not self.protocol or flow.orig_dport != self.port:
            return False
        if self.address is not None and flow.orig_dst != self.address:
            return False
        if self.endpoint is not None:
            return flow.backend == self.endpoint
        return flow.backend not in self.keep

    def describe(self) -> str:
        """conntrack(8)'s spelling of the filter, for logs."""
        parts = [f"-p {self.protocol.lower()}"]
        if self.address is not None:
            parts.append(f"--orig-dst {self.address}")
        parts.append(f"--orig-port-dst {self.port}")
        if self.endpoint is not None:
            parts.append(f"--reply-src {self.endpoint[0]} --reply-port-src {self.endpoint[1]}")
        elif self.keep:
            kept = sorted(self.keep, key=_backend_key)
            parts.append("(except to " + ",".join(_backend(b) for b in kept) + ")")
        return " ".join(parts)


def _backend(b: Backend) -> str:
    ip, port = b
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


Frontend = tuple[IPAddress | None, int]  # (address, port); None: any address on a NodePort


def frontends(p: UDPPort) -> list[Frontend]:
    out: list[Frontend] = [(addr, p.port) for addr in p.addresses]
    if p.node_port:
        out.append((None, p.node_port))
    return out


def _deletions(spn: ServicePortName, reason: str, where: Iterable[Frontend], *,
               endpoint: Backend | None = None,
               keep: frozenset[Backend] = frozenset()) -> list[Deletion]:
    return [Deletion(spn, reason, port, addr, endpoint, keep)
            for addr, port in dict.fromkeys(where)]


def stale_flows(previous: UDPState, current: UDPState) -> list[Deletion]:
    """What to delete after a sync that moved the kernel from `previous` to `current`.

    Flows to an endpoint that stopped being usable are looked for on every
    address the port had or has (one removed together with the endpoint, or the
    port's Service deleted altogether, still leaves flows DNATed through it).
    """
    out: list[Deletion] = []
    for spn in sorted(previous.keys() | current.keys()):
        old, new = previous.get(spn), current.get(spn)
        if old is not None:
            gone = old.usable - (new.usable if new is not None else frozenset())
            where = frontends(old) + (frontends(new) if new is not None else [])
            for backend in sorted(gone, key=_backend_key):
                out += _deletions(spn, ENDPOINT_GONE, where, endpoint=backend)
        if new is not None and new.usable and (old is None or not old.usable):
            out += _deletions(spn, NEWLY_SERVED, frontends(new), keep=new.usable)
    return out


def _backend_key(b: Backend) -> tuple[int, int, int]:
    return (b[0].version, int(b[0]), b[1])


def reconcile(current: UDPState) -> list[Deletion]:
    """With no record of the past: every flow to a service that no usable endpoint serves.

    As kube-proxy's list-based CleanStaleEntries, except that a service port with
    no usable endpoint is included too: nothing to it is legitimately tracked
    (its rules REJECT or DROP new flows), and an old flow DNATed to a vanished
    endpoint would otherwise keep going there instead of being refused.
    """
    out: list[Deletion] = []
    for spn in sorted(current):
        p = current[spn]
        out += _deletions(spn, RECONCILE, frontends(p), keep=p.usable)
    return out


@dataclass
class Matcher:
    """The deletions indexed by (protocol, original destination port), for one pass."""

    deletions: Sequence[Deletion]
    # A NodePort matches any destination, but not a service address that merely
    # shares the port number (ClusterIP port 30053 beside NodePort 30053).
    service_addresses: frozenset[IPAddress] = frozenset()
    _by_port: dict[tuple[Protocol, int], list[Deletion]] = field(init=False)

    def __post_init__(self) -> None:
        self._by_port = {}
        for d in self.deletions:
            self._by_port.setdefault((d.protocol, d.port), []).append(d)

    def first_match(self, flow: Flow) -> Deletion | None:
        for d in self._by_port.get((flow.protocol, flow.orig_dport), ()):
            if d.address is None and flow.orig_dst in self.service_addresses:
                continue
            if d.matches(flow):
                return d
        return None


def service_addresses(state: UDPState) -> frozenset[IPAddress]:
    return frozenset(a for p in state.values() for a in p.addresses)


# --------------------------------------------------------------------------
# The kernel side


ProtoFrontend = tuple[Protocol, IPAddress | None, int]  # what a client sent to


class FlowTable(TypingProtocol):
    """The node's conntrack table: list the flows sent to some frontends, delete one.

    `flows` may return more than was asked for (callers match every flow again),
    but never less, and each flow once.
    """

    def flows(self, frontends: Sequence[ProtoFrontend]) -> Iterable[Flow]: ...
    def delete(self, flow: Flow) -> bool: ...  # False when it was already gone
    def close(self) -> None: ...


class NetlinkFlowTable:
    """ctnetlink through pyroute2's NFCTSocket, in the current network namespace.

    Raw messages are read rather than pyroute2's ConntrackEntry, which leaves an
    SCTP entry's ports out; deletes send the complete original tuple.

    Decoding is what costs here (measured: ~80 us an entry in pyroute2, ~0.35 ms
    a delete, against ~4 us an entry for conntrack(8) -L), so the kernel filters
    each dump by the frontend's protocol, address and port (CTA_FILTER, Linux
    5.8+; older kernels ignore it and send everything, which is only slower):
    walking 20,000 entries in the kernel to return none took ~10 ms. With many
    frontends (a reconcile of many UDP services), one dump per protocol is
    cheaper than that many walks.
    """

    MAX_FILTERED_DUMPS = 32

    def __init__(self, family: IPFamily = IPFamily.IPv4) -> None:
        self._tuple = NFCTAttrTuple
        self.family = family
        self._af = socket.AF_INET if family is IPFamily.IPv4 else socket.AF_INET6
        self._ip = "CTA_IP_V4" if family is IPFamily.IPv4 else "CTA_IP_V6"
        self._sock: Any = NFCTSocket(nfgen_family=self._af)

    def flows(self, frontends: Sequence[ProtoFrontend]) -> Iterator[Flow]:
        wanted = list(dict.fromkeys(frontends))
        if len(wanted) > self.MAX_FILTERED_DUMPS:
            wanted = [(proto, None, 0) for proto in dict.fromkeys(p for p, _, _ in wanted)]
        seen: set[Flow] = set()
        for proto, address, port in wanted:
            match = self._tuple(family=self._af, proto=IP_PROTO[proto],
                                daddr=None if address is None else str(address),
                                dport=port or None)
            try:
                msgs = list(self._sock.dump(tuple_orig=match))
            except NetlinkError:  # a kernel that refuses the filter: take everything
                msgs = list(self._sock.dump())
            for msg in msgs:
                flow = self._parse(msg)
                if flow is not None and flow not in seen:
                    seen.add(flow)
                    yield flow

    def _parse(self, msg: Any) -> Flow | None:
        orig, reply = msg.get_attr("CTA_TUPLE_ORIG"), msg.get_attr("CTA_TUPLE_REPLY")
        if orig is None or reply is None:
            return None
        o_ip, o_pr = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
        r_ip, r_pr = reply.get_attr("CTA_TUPLE_IP"), reply.get_attr("CTA_TUPLE_PROTO")
        if None in (o_ip, o_pr, r_ip, r_pr):
            return None
        proto = _PROTOCOL_OF.get(o_pr.get_attr("CTA_PROTO_NUM"))
        values = (o_ip.get_attr(self._ip + "_SRC"), o_pr.get_attr("CTA_PROTO_SRC_PORT"),
                  o_ip.get_attr(self._ip + "_DST"), o_pr.get_attr("CTA_PROTO_DST_PORT"),
                  r_ip.get_attr(self._ip + "_SRC"), r_pr.get_attr("CTA_PROTO_SRC_PORT"))
        if proto is None or None in values:
            return None
        o_src, o_sport, o_dst, o_dport, r_src, r_sport = values
        return Flow(proto, ipaddress.ip_address(o_src), int(o_sport),
                    ipaddress.ip_address(o_dst), int(o_dport),
                    ipaddress.ip_address(r_src), int(r_sport))

    def delete(self, flow: Flow) -> bool:
        orig = self._tuple(family=self._af, saddr=str(flow.orig_src), daddr=str(flow.orig_dst),
                           proto=IP_PROTO[flow.protocol], sport=flow.orig_sport,
                           dport=flow.orig_dport)
        try:
            self._sock.entry("del", tuple_orig=orig)
        except NetlinkError as err:
            if err.code == errno.ENOENT:
                return False  # expired, or deleted by someone else, meanwhile
            raise
        return True

    def close(self) -> None:
        self._sock.close()


# --------------------------------------------------------------------------
# Gluing decision and kernel together, with the state between syncs


@dataclass(frozen=True)
class CleanupResult:
    deleted: int = 0
    reconciled: bool = False  # no previous state: every service address was checked
    by_service: Mapping[tuple[ServicePortName, str], int] = field(default_factory=dict)


def _open_netlink(family: IPFamily) -> FlowTable:
    return NetlinkFlowTable(family)


@dataclass
class StaleFlowCleaner:
    """Owned by a dataplane: remembers what it last applied, deletes what became stale.

    `after_sync` must run only after the rules were written (as kube-proxy does):
    deleting first would let the next packet be tracked again under the old rules.
    """

    node: NodeInfo
    family: IPFamily = IPFamily.IPv4
    open_table: Callable[[IPFamily], FlowTable] = _open_netlink
    previous: dict[ServicePortName, UDPPort] | None = field(default=None, init=False)
    _cache: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...], UDPPort]] = (
        field(default_factory=dict, init=False))

    def forget(self) -> None:
        """The kernel's state is unknown (a failed write): reconcile on the next sync."""
        self.previous = None

    def set_node(self, node: NodeInfo) -> None:
        if node != self.node:
            self.node = node
            self._cache = {}

    def state(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    ) -> dict[ServicePortName, UDPPort]:
        """udp_state, reusing each port's result while its inputs are unchanged."""
        out: dict[ServicePortName, UDPPort] = {}
        cache: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...], UDPPort]] = {}
        for spn, svc in services.items():
            if spn.protocol not in CLEARED_PROTOCOLS:
                continue
            eps = tuple(endpoints.get(spn, ()))
            hit = self._cache.get(spn)
            if hit is not None and hit[0] == svc and hit[1] == eps:
                p = hit[2]
            else:
                p = udp_port(svc, eps, self.node)
            cache[spn] = (svc, eps, p)
            out[spn] = p
        self._cache = cache
        return out

    def _update(
        self,
        previous: dict[ServicePortName, UDPPort],
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
        changed: Collection[ServicePortName],
    ) -> dict[ServicePortName, UDPPort]:
        """The state after a partial sync: only the changed ports are recomputed."""
        current = dict(previous)
        for spn in changed:
            svc = services.get(spn)
            if svc is None or spn.protocol not in CLEARED_PROTOCOLS:
                current.pop(spn, None)
                self._cache.pop(spn, None)
                continue
            eps = tuple(endpoints.get(spn, ()))
            p = udp_port(svc, eps, self.node)
            self._cache[spn] = (svc, eps, p)
            current[spn] = p
        return current

    def after_sync(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
        changed: Collection[ServicePortName] | None = None,
    ) -> CleanupResult:
        """Delete what the sync just made stale; raises on kernel errors (then reconciles
        on the next call, since it no longer knows what is left).

        With ``changed`` (a partial sync's service ports) only those are compared, so
        the cost follows the change rather than the number of services.
        """
        previous, self.previous = self.previous, None
        if previous is not None and changed is not None:
            current = self._update(previous, services, endpoints, changed)
            keys = [k for k in changed if k in previous or k in current]
            deletions = stale_flows({k: previous[k] for k in keys if k in previous},
                                    {k: current[k] for k in keys if k in current})
        else:
            current = self.state(services, endpoints)
            deletions = (reconcile(current) if previous is None
                         else stale_flows(previous, current))
        counts = self._apply(deletions, service_addresses(current)) if deletions else {}
        self.previous = current
        for d, n in counts.items():
            log.debug("deleted conntrack entries", extra={
                "service": d.service.service, "filter": d.describe(), "entries": n})
        by_service: dict[tuple[ServicePortName, str], int] = {}
        for d, n in counts.items():
            by_service[(d.service, d.reason)] = by_service.get((d.service, d.reason), 0) + n
        for (spn, reason), n in sorted(by_service.items()):
            log.info("deleted stale conntrack entries", extra={
                "service": spn.service, "port": spn.port or "-", "protocol": str(spn.protocol),
                "reason": reason, "entries": n})
        return CleanupResult(sum(counts.values()), previous is None, by_service)

    def _apply(self, deletions: Sequence[Deletion],
               addresses: frozenset[IPAddress]) -> dict[Deletion, int]:
        matcher = Matcher(deletions, addresses)
        wanted = list(dict.fromkeys((d.protocol, d.address, d.port) for d in deletions))
        counts: dict[Deletion, int] = {}
        table = self.open_table(self.family)
        try:
            # The whole dump first: deleting while it is read would skip entries.
            stale = [(d, f) for f in list(table.flows(wanted))
                     if (d := matcher.first_match(f)) is not None]
            for d, f in stale:
                if table.delete(f):
                    counts[d] = counts.get(d, 0) + 1
        finally:
            table.close()
        return counts
