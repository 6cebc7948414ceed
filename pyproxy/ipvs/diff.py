"""What the kernel holds and what the plan wants, in; the operations that close the gap, out.

Pure: :class:`KernelState` is read by :mod:`pyproxy.ipvs.netlink` and the
operations are carried out there. The order of the operations is what keeps
traffic flowing while they run:

1. ipsets are created before anything puts members in them;
2. service addresses are bound on the dummy interface before their virtual
   servers exist (an address is also what marks a virtual server as
   pyproxy's, see :class:`Ownership`);
3. each new or changed virtual server, immediately followed by its new real
   servers (and weights restored);
4. ipset members added, then removed: a service that loses its last endpoint
   joins PYPROXY-NO-ENDPOINTS before its real servers go, one that gains an
   endpoint leaves it only after the real server is there;
5. real servers no longer wanted: drained (weight 0) or deleted;
6. virtual servers no longer wanted are deleted, then their addresses, then
   ipsets that are not pyproxy's any more.

Graceful termination, as upstream (pkg/proxy/ipvs/graceful_termination.go):
a real server that is no longer wanted is deleted at once if it has no
connections (ActiveConn + InActConn) or if its virtual server is UDP or SCTP,
and is otherwise set to weight 0, so that no new connection picks it, and kept
until a later sync finds its connections gone. Here a virtual server that is no
longer wanted is treated the same way: it stays, with its address bound, until
no real server of it holds TCP connections, then goes. :func:`pending` names
the virtual servers still waiting.

Partial syncs: a :class:`Scope` (what changed between two plans, plus what is
pending) lets the caller read and diff only those virtual servers, addresses
and ipset members, so one changed service costs a few netlink messages
whatever the size of the cluster. Within a scope, addresses and ipset members
are not read back: adding what is there or deleting what is not is harmless
for both, and the periodic full sync compares everything.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Set
from dataclasses import dataclass, field

from pyproxy.ipvs.plan import (
    SET_TYPES,
    IPVSPlan,
    RealServer,
    SetEntry,
    SetType,
    VirtualServer,
    VirtualServerKey,
)
from pyproxy.model import IPNetwork, Protocol

SET_PREFIX = "PYPROXY-"
NODE_PORT_RANGE = (30000, 32767)

# --------------------------------------------------------------------------- kernel state


@dataclass(frozen=True, slots=True, order=True)
class KernelRealServer:
    address: str
    port: int
    weight: int = 1
    active: int = 0  # ActiveConn
    inactive: int = 0  # InActConn
    masquerade: bool = True  # forwarding method; pyproxy only ever programs masquerading

    @property
    def connections(self) -> int:
        return self.active + self.inactive


@dataclass(frozen=True, slots=True)
class KernelVirtualServer:
    key: VirtualServerKey
    scheduler: str
    persistence_timeout: int = 0  # seconds; 0 when the service is not persistent
    real_servers: tuple[KernelRealServer, ...] = ()


@dataclass(frozen=True, slots=True)
class KernelSet:
    type: str  # "hash:ip,port", as SetType spells it
    ipv6: bool = False  # family inet6 (meaningless for bitmap:port)
    members: frozenset[SetEntry] = frozenset()


@dataclass(frozen=True)
class Scope:
    """Which virtual servers, dummy addresses and ipset members a partial sync covers."""

    virtual_servers: frozenset[VirtualServerKey] = frozenset()
    addresses: frozenset[str] = frozenset()
    members: Mapping[str, frozenset[SetEntry]] = field(default_factory=dict)

    @classmethod
    def between(cls, old: IPVSPlan, new: IPVSPlan) -> Scope:
        """Everything that differs between two plans (the last one applied and the next)."""
        keys = {k for k, vs in new.virtual_servers.items()
                if old.virtual_servers.get(k) != vs}
        keys.update(k for k in old.virtual_servers if k not in new.virtual_servers)
        members: dict[str, frozenset[SetEntry]] = {}
        for name in set(old.ipsets) | set(new.ipsets):
            changed = old.ipsets.get(name, set()) ^ new.ipsets.get(name, set())
            if changed:
                members[str(name)] = frozenset(changed)
        return cls(frozenset(keys), frozenset(old.addresses ^ new.addresses), members)

    def __or__(self, other: Scope) -> Scope:
        members = dict(self.members)
        for name, entries in other.members.items():
            members[name] = members.get(name, frozenset()) | entries
        return Scope(self.virtual_servers | other.virtual_servers,
                     self.addresses | other.addresses, members)

    def __bool__(self) -> bool:
        return bool(self.virtual_servers or self.addresses or self.members)


@dataclass
class KernelState:
    """pyproxy's part of the kernel: owned virtual servers, dummy addresses, PYPROXY-* sets.

    ``scope`` is None for a complete read. A read limited to a :class:`Scope`
    holds the scope's virtual servers that exist (and nothing else); its
    addresses and ipsets are not read.
    """

    virtual_servers: dict[VirtualServerKey, KernelVirtualServer] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)
    ipsets: dict[str, KernelSet] = field(default_factory=dict)
    scope: Scope | None = None


@dataclass(frozen=True)
class Ownership:
    """Which virtual servers are pyproxy's: never touch the others.

    A virtual server is pyproxy's if its address is bound on pyproxy's dummy
    interface, or if it listens on one of the node's NodePort addresses with a
    port in the NodePort range; never if its address is in ``exclude_cidrs``
    (``ipvs.excludeCIDRs``).
    """

    node_port_addresses: frozenset[str] = frozenset()
    node_port_range: tuple[int, int] = NODE_PORT_RANGE
    exclude_cidrs: tuple[IPNetwork, ...] = ()

    def owns(self, key: VirtualServerKey, bound: Collection[str]) -> bool:
        if self.excluded(key.address):
            return False
        if key.address in bound:
            return True
        low, high = self.node_port_range
        return key.address in self.node_port_addresses and low <= key.port <= high

    def excluded(self, address: str) -> bool:
        if not self.exclude_cidrs:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip.version == net.version and ip in net for net in self.exclude_cidrs)

    @staticmethod
    def owns_set(name: str) -> bool:
        return name.startswith(SET_PREFIX)


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class CreateSet:
    name: str
    type: str
    ipv6: bool = False


@dataclass(frozen=True, slots=True)
class DestroySet:
    name: str


@dataclass(frozen=True, slots=True)
class AddMember:
    set: str
    entry: SetEntry


@dataclass(frozen=True, slots=True)
class DelMember:
    set: str
    entry: SetEntry


@dataclass(frozen=True, slots=True)
class AddAddress:
    address: str


@dataclass(frozen=True, slots=True)
class DelAddress:
    address: str


@dataclass(frozen=True, slots=True)
class AddService:
    key: VirtualServerKey
    scheduler: str
    persistence_timeout: int = 0


@dataclass(frozen=True, slots=True)
class SetService:
    key: VirtualServerKey
    scheduler: str
    persistence_timeout: int = 0


@dataclass(frozen=True, slots=True)
class DelService:
    key: VirtualServerKey


@dataclass(frozen=True, slots=True)
class AddDest:
    service: VirtualServerKey
    address: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class SetDest:
    """Set a real server's weight (and its forwarding method back to masquerading)."""

    service: VirtualServerKey
    address: str
    port: int
    weight: int


@dataclass(frozen=True, slots=True)
class DelDest:
    service: VirtualServerKey
    address: str
    port: int


Operation = (CreateSet | DestroySet | AddMember | DelMember | AddAddress | DelAddress
             | AddService | SetService | DelService | AddDest | SetDest | DelDest)
SetOperation = CreateSet | DestroySet | AddMember | DelMember
AddressOperation = AddAddress | DelAddress
IPVSOperation = AddService | SetService | DelService | AddDest | SetDest | DelDest


# --------------------------------------------------------------------------- the diff


def graceful(protocol: Protocol) -> bool:
    """Whether a removed real server of this protocol waits for its connections (TCP only)."""
    return protocol not in (Protocol.UDP, Protocol.SCTP)


def waits(key: VirtualServerKey, rs: KernelRealServer) -> bool:
    """A real server that is no longer wanted but must stay (at weight 0) for now."""
    return graceful(key.protocol) and rs.connections > 0


def ipset_family_matters(set_type: str) -> bool:
    return set_type != SetType.BITMAP_PORT


def diff(desired: IPVSPlan, current: KernelState, *, ipv6: bool | None = None) -> list[Operation]:
    """The operations that turn ``current`` into ``desired``, in a traffic-safe order.

    ``ipv6`` is the family of the ipsets to create; by default, that of the
    planned addresses.
    """
    if ipv6 is None:
        ipv6 = _plan_is_ipv6(desired)
    scope = current.scope
    create_sets: list[Operation] = []
    add_addresses: list[Operation] = []
    services: list[Operation] = []
    add_members: list[Operation] = []
    del_members: list[Operation] = []
    drain: list[Operation] = []
    del_services: list[Operation] = []
    del_addresses: list[Operation] = []
    destroy_sets: list[Operation] = []

    # -- virtual servers and real servers
    if scope is None:
        wanted: Mapping[VirtualServerKey, VirtualServer] = desired.virtual_servers
    else:
        wanted = {k: desired.virtual_servers[k] for k in sorted(scope.virtual_servers)
                  if k in desired.virtual_servers}
    for key in sorted(wanted):
        vs = wanted[key]
        have = current.virtual_servers.get(key)
        if have is None:
            services.append(AddService(key, vs.scheduler, vs.persistence_timeout))
            services.extend(AddDest(key, rs.address, rs.port, rs.weight)
                            for rs in vs.real_servers)
            continue
        if (have.scheduler, have.persistence_timeout) != (vs.scheduler, vs.persistence_timeout):
            services.append(SetService(key, vs.scheduler, vs.persistence_timeout))
        kernel_rs = {(rs.address, rs.port): rs for rs in have.real_servers}
        want_rs: dict[tuple[str, int], RealServer] = {}
        for want in vs.real_servers:
            want_rs[(want.address, want.port)] = want
            old = kernel_rs.get((want.address, want.port))
            if old is None:
                services.append(AddDest(key, want.address, want.port, want.weight))
            elif old.weight != want.weight or not old.masquerade:
                services.append(SetDest(key, want.address, want.port, want.weight))
        for addr_port in sorted(kernel_rs):
            if addr_port not in want_rs:
                drain.extend(_drain(key, kernel_rs[addr_port]))

    keep_addresses: set[str] = set()
    for key in sorted(current.virtual_servers):
        if key in desired.virtual_servers:
            continue
        if scope is not None and key not in scope.virtual_servers:
            continue
        have = current.virtual_servers[key]
        if any(waits(key, rs) for rs in have.real_servers):
            keep_addresses.add(key.address)
            for rs in have.real_servers:
                drain.extend(_drain(key, rs))
        else:
            del_services.append(DelService(key))

    # -- addresses on the dummy interface
    to_bind: Set[str]
    to_unbind: Set[str]
    if scope is None:
        to_bind = desired.addresses - current.addresses
        to_unbind = current.addresses - desired.addresses - keep_addresses
    else:
        to_bind = scope.addresses & desired.addresses
        to_unbind = scope.addresses - desired.addresses - keep_addresses
        # a virtual server in scope may have been removed since (drift): rebind its address
        for key in wanted:
            if key.address in desired.addresses and key not in current.virtual_servers:
                to_bind = to_bind | {key.address}
    add_addresses.extend(AddAddress(a) for a in sorted(to_bind, key=_address_order))
    del_addresses.extend(DelAddress(a) for a in sorted(to_unbind, key=_address_order))

    # -- ipsets and their members
    if scope is None:
        for ipset in sorted(desired.ipsets):
            name, set_type = str(ipset), str(SET_TYPES[ipset])
            have_set = current.ipsets.get(name)
            members = desired.ipsets[ipset]
            present: frozenset[SetEntry] = frozenset()
            if have_set is None:
                create_sets.append(CreateSet(name, set_type, ipv6))
            elif have_set.type != set_type or (
                    ipset_family_matters(set_type) and have_set.ipv6 != ipv6):
                create_sets.append(DestroySet(name))
                create_sets.append(CreateSet(name, set_type, ipv6))
            else:
                present = have_set.members
            add_members.extend(AddMember(name, e) for e in sorted(members - present))
            del_members.extend(DelMember(name, e) for e in sorted(present - members))
        desired_names = {str(n) for n in desired.ipsets}
        destroy_sets.extend(DestroySet(name) for name in sorted(current.ipsets)
                            if name not in desired_names and Ownership.owns_set(name))
    else:
        by_name = {str(k): v for k, v in desired.ipsets.items()}
        for name in sorted(scope.members):
            wanted_members = by_name.get(name, set())
            entries = scope.members[name]
            add_members.extend(AddMember(name, e) for e in sorted(entries & wanted_members))
            del_members.extend(DelMember(name, e) for e in sorted(entries - wanted_members))

    return (create_sets + add_addresses + services + add_members + del_members + drain
            + del_services + del_addresses + destroy_sets)


def _drain(key: VirtualServerKey, rs: KernelRealServer) -> list[Operation]:
    """A real server that is no longer wanted: to weight 0 while it has connections, else gone."""
    if waits(key, rs):
        return [] if rs.weight == 0 else [SetDest(key, rs.address, rs.port, 0)]
    return [DelDest(key, rs.address, rs.port)]


def pending(desired: IPVSPlan, current: KernelState) -> frozenset[VirtualServerKey]:
    """Virtual servers whose graceful termination is under way: sync them again later."""
    out = set()
    for key, have in current.virtual_servers.items():
        vs = desired.virtual_servers.get(key)
        wanted = set() if vs is None else {(rs.address, rs.port) for rs in vs.real_servers}
        if any((rs.address, rs.port) not in wanted and waits(key, rs)
               for rs in have.real_servers):
            out.add(key)
    return frozenset(out)


def _plan_is_ipv6(plan: IPVSPlan) -> bool:
    for address in plan.addresses:
        return ":" in address
    for key in plan.virtual_servers:
        return ":" in key.address
    return False


def _address_order(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


def apply_to(state: KernelState, ops: Iterable[Operation]) -> KernelState:
    """The state ``ops`` would leave behind (connection counts kept): for tests and dry runs."""
    vss = {k: {(rs.address, rs.port): rs for rs in v.real_servers}
           for k, v in state.virtual_servers.items()}
    attrs = {k: (v.scheduler, v.persistence_timeout) for k, v in state.virtual_servers.items()}
    addresses = set(state.addresses)
    sets = {n: (s.type, s.ipv6, set(s.members)) for n, s in state.ipsets.items()}
    for op in ops:
        match op:
            case CreateSet(name, set_type, v6):
                sets.setdefault(name, (set_type, v6, set()))
            case DestroySet(name):
                sets.pop(name, None)
            # A scoped (partial) read holds no ipsets: members are written blind there.
            case AddMember(name, entry):
                if name in sets:
                    sets[name][2].add(entry)
            case DelMember(name, entry):
                if name in sets:
                    sets[name][2].discard(entry)
            case AddAddress(address):
                addresses.add(address)
            case DelAddress(address):
                addresses.discard(address)
            case AddService(key, scheduler, timeout) | SetService(key, scheduler, timeout):
                attrs[key] = (scheduler, timeout)
                vss.setdefault(key, {})
            case DelService(key):
                attrs.pop(key, None)
                vss.pop(key, None)
            case AddDest(key, address, port, weight) | SetDest(key, address, port, weight):
                old = vss[key].get((address, port))
                vss[key][(address, port)] = KernelRealServer(
                    address, port, weight, old.active if old else 0, old.inactive if old else 0)
            case DelDest(key, address, port):
                vss[key].pop((address, port), None)
    return KernelState(
        virtual_servers={
            k: KernelVirtualServer(k, attrs[k][0], attrs[k][1], tuple(sorted(vss[k].values())))
            for k in vss},
        addresses=addresses,
        ipsets={n: KernelSet(t, v6, frozenset(m)) for n, (t, v6, m) in sets.items()},
        scope=state.scope,
    )
