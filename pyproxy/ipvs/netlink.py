"""The IPVS dataplane's kernel I/O: read pyproxy's state back, carry out operations.

Thin on purpose: what to change is decided by :mod:`pyproxy.ipvs.diff`; this
module only translates between the kernel's netlink messages (declared in
:mod:`pyproxy.ipvs.genl` and pyroute2) and the dataclasses of ``diff``. Three
netlink sockets, opened on first use: generic netlink "IPVS" (virtual and real
servers, timeouts), nfnetlink ipset (PYPROXY-* sets) and rtnetlink (the dummy
interface and its addresses). Requests are sent in batches; a run of
operations that go to the same socket costs one send per ~1000 operations.

Only what pyproxy owns is read or changed (see ``diff.Ownership``): virtual
servers on addresses bound to its dummy interface or on NodePorts of the
node's addresses, ipsets named PYPROXY-*, and the dummy interface itself.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import Any

from pyroute2.netlink import (
    NETLINK_NETFILTER,
    NETLINK_ROUTE,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
)
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
)
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from pyproxy.ipvs.diff import (
    NODE_PORT_RANGE,
    SET_PREFIX,
    AddAddress,
    AddDest,
    AddMember,
    AddService,
    CreateSet,
    DelAddress,
    DelDest,
    DelMember,
    DelService,
    DestroySet,
    KernelRealServer,
    KernelSet,
    KernelState,
    KernelVirtualServer,
    Operation,
    Ownership,
    Scope,
    SetDest,
    SetService,
)
from pyproxy.ipvs.genl import (
    IP_VS_CONN_F_FWD_MASK,
    IP_VS_CONN_F_MASQ,
    IP_VS_SVC_F_PERSISTENT,
    IPSET_CMD_ADD,
    IPSET_CMD_CREATE,
    IPSET_CMD_DEL,
    IPSET_CMD_DESTROY,
    IPSET_CMD_LIST,
    IPSET_CMD_TYPE,
    IPSET_FLAG_LIST_HEADER,
    IPVS_CMD_DEL_DEST,
    IPVS_CMD_DEL_SERVICE,
    IPVS_CMD_GET_CONFIG,
    IPVS_CMD_GET_DEST,
    IPVS_CMD_GET_SERVICE,
    IPVS_CMD_NEW_DEST,
    IPVS_CMD_NEW_SERVICE,
    IPVS_CMD_SET_CONFIG,
    IPVS_CMD_SET_DEST,
    IPVS_CMD_SET_SERVICE,
    IPVS_GENL_NAME,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    Channel,
    Counters,
    Message,
    NetlinkError,
    address_request,
    decoder,
    ipset_adt,
    ipset_request,
    ipvs_request,
    open_genl,
)
from pyproxy.ipvs.plan import DUMMY_INTERFACE, SetEntry, SetType, VirtualServerKey
from pyproxy.model import IPNetwork, Protocol

log = logging.getLogger(__name__)

PROTOCOL_NUMBERS = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP,
                    Protocol.SCTP: socket.IPPROTO_SCTP}
PROTOCOLS = {number: proto for proto, number in PROTOCOL_NUMBERS.items()}
SET_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP,
                 "sctp": socket.IPPROTO_SCTP}
SET_PROTOCOL_NAMES = {number: name for name, number in SET_PROTOCOLS.items()}
MEMBERS_PER_MESSAGE = 400  # IPSET_ATTR_ADT is one attribute: at most 64 KiB
IFA_F_NODAD = 0x02
IFA_F_PERMANENT = 0x80
RT_SCOPE_LINK = 253


KUBE_PROXY_DUMMY = "kube-ipvs0"


class IPVSApplyError(RuntimeError):
    """Some operations failed; the others were carried out. The next sync should be full."""

    def __init__(self, failures: Sequence[tuple[Operation, NetlinkError]]) -> None:
        self.failures = list(failures)
        shown = "; ".join(f"{op}: {err.strerror}" for op, err in self.failures[:5])
        more = f" (and {len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
        super().__init__(f"{len(self.failures)} IPVS operations failed: {shown}{more}")


@dataclass(frozen=True)
class Timeouts:
    """IPVS connection timeouts in seconds (``ipvsadm --set tcp tcpfin udp``)."""

    tcp: int = 0
    tcpfin: int = 0
    udp: int = 0


@dataclass
class _Batch:
    """Messages for one socket, and the operations each one carries."""

    channel: Channel
    messages: list[Any] = field(default_factory=list)
    ops: list[list[Operation]] = field(default_factory=list)

    def add(self, msg: Any, *ops: Operation) -> None:
        self.messages.append(msg)
        self.ops.append(list(ops))


class IPVSKernel:
    """pyproxy's IPVS virtual servers, dummy interface and ipsets, over netlink.

    ``netns`` names a network namespace (as ``ip netns`` does) to work in;
    None is the caller's own. ``dummy`` and ``set_prefix`` say whose state this
    is: pyproxy's by default; ``pyproxy cleanup --kube-proxy`` passes
    kube-proxy's (kube-ipvs0, its KUBE-* set names) to remove what it left.
    """

    def __init__(self, dummy: str = DUMMY_INTERFACE, *,
                 node_port_addresses: Iterable[str] = (),
                 exclude_cidrs: Iterable[IPNetwork | str] = (),
                 node_port_range: tuple[int, int] = NODE_PORT_RANGE,
                 set_prefix: str | tuple[str, ...] = SET_PREFIX,
                 netns: str | None = None) -> None:
        self.dummy = dummy
        self.set_prefix = set_prefix
        self.netns = netns
        self.ownership = Ownership(
            node_port_addresses=frozenset(str(a) for a in node_port_addresses),
            node_port_range=node_port_range,
            exclude_cidrs=tuple(ipaddress.ip_network(c, strict=False) if isinstance(c, str)
                                else c for c in exclude_cidrs),
        )
        self._ipvs_channel: Channel | None = None
        self._ipvs_family = 0
        self._ipset_channel: Channel | None = None
        self._rtnl_channel: Channel | None = None
        self._dummy_index: int | None = None
        self._revisions: dict[tuple[str, int], int] = {}

    # -- sockets -------------------------------------------------------------

    @property
    def _ipvs(self) -> Channel:
        if self._ipvs_channel is None:
            self._ipvs_channel, self._ipvs_family = open_genl(
                IPVS_GENL_NAME, netns=self.netns, decoder=decoder("ipvs"))
        return self._ipvs_channel

    @property
    def _ipset(self) -> Channel:
        if self._ipset_channel is None:
            self._ipset_channel = Channel(NETLINK_NETFILTER, netns=self.netns,
                                          default=decoder("ipset-reply"))
        return self._ipset_channel

    @property
    def _rtnl(self) -> Channel:
        if self._rtnl_channel is None:
            self._rtnl_channel = Channel(
                NETLINK_ROUTE, netns=self.netns, strict=True,
                decoders={RTM_NEWADDR: decoder("address"), RTM_NEWLINK: ifinfmsg})
        return self._rtnl_channel

    def open(self) -> IPVSKernel:
        """Open the three sockets now rather than on first use (in another network
        namespace each costs a fork); raises if IPVS is not in the kernel."""
        for _ in (self._rtnl, self._ipset, self._ipvs):
            pass
        return self

    def set_node_port_addresses(self, addresses: Iterable[str]) -> None:
        """The node's addresses changed: NodePort virtual servers on them are pyproxy's."""
        self.ownership = replace(self.ownership,
                                 node_port_addresses=frozenset(str(a) for a in addresses))

    def close(self) -> None:
        for ch in (self._ipvs_channel, self._ipset_channel, self._rtnl_channel):
            if ch is not None:
                ch.close()
        self._ipvs_channel = self._ipset_channel = self._rtnl_channel = None

    def __enter__(self) -> IPVSKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def counters(self) -> Counters:
        """Netlink requests, sends and receives so far, over all three sockets."""
        total = Counters()
        for ch in (self._ipvs_channel, self._ipset_channel, self._rtnl_channel):
            if ch is not None:
                total = total + ch.counters
        return total

    # -- reading ---------------------------------------------------------------

    def read(self, scope: Scope | None = None) -> KernelState:
        """pyproxy's state in the kernel; with a scope, only the scope's virtual servers."""
        if scope is not None:
            return self._read_scope(scope)
        index = self._link_index()
        addresses = self._addresses(index) if index is not None else set()
        return KernelState(self._owned_services(addresses), addresses, self._read_sets())

    def _owned_services(self, addresses: set[str]) -> dict[VirtualServerKey, KernelVirtualServer]:
        services: dict[VirtualServerKey, KernelVirtualServer] = {}
        for msg in self._ipvs.dump(self._ipvs_msg(IPVS_CMD_GET_SERVICE, [])):
            parsed = _parse_service(msg)
            if parsed is None or not self.ownership.owns(parsed[0], addresses):
                continue
            key, scheduler, timeout = parsed
            services[key] = KernelVirtualServer(key, scheduler, timeout, self._dests(key))
        return services

    def _read_scope(self, scope: Scope) -> KernelState:
        keys = [k for k in sorted(scope.virtual_servers)
                if not self.ownership.excluded(k.address)]
        answers = self._ipvs.query(
            [self._ipvs_msg(IPVS_CMD_GET_SERVICE, [_service_key(k)]) for k in keys])
        services: dict[VirtualServerKey, KernelVirtualServer] = {}
        for key, answer in zip(keys, answers, strict=True):
            if isinstance(answer, NetlinkError):
                if answer.code in (errno.ESRCH, errno.ENOENT):
                    continue
                raise answer
            parsed = _parse_service(answer)
            if parsed is not None:
                _, scheduler, timeout = parsed
                services[key] = KernelVirtualServer(key, scheduler, timeout, self._dests(key))
        return KernelState(services, set(), {}, scope)

    def _dests(self, key: VirtualServerKey) -> tuple[KernelRealServer, ...]:
        msgs = self._ipvs.dump(self._ipvs_msg(IPVS_CMD_GET_DEST, [_service_key(key)]))
        return tuple(sorted(_parse_dest(m) for m in msgs))

    def _read_sets(self) -> dict[str, KernelSet]:
        headers = self._ipset.dump(ipset_request(
            IPSET_CMD_LIST, [["IPSET_ATTR_FLAGS", IPSET_FLAG_LIST_HEADER]]))
        out: dict[str, KernelSet] = {}
        for header in headers:
            name = header.get("IPSET_ATTR_SETNAME")
            if not name or not name.startswith(self.set_prefix) or name in out:
                continue
            set_type = header.get("IPSET_ATTR_TYPENAME")
            ipv6 = header.get("IPSET_ATTR_FAMILY") == NFPROTO_IPV6
            members: set[SetEntry] = set()
            for msg in self._ipset.dump(ipset_request(
                    IPSET_CMD_LIST, [["IPSET_ATTR_SETNAME", name]])):
                members.update(_parse_members(msg, set_type))
            out[name] = KernelSet(set_type, ipv6, frozenset(members))
        return out

    def _addresses(self, index: int) -> set[str]:
        out = set()
        for answer in self._rtnl.dump(address_request(RTM_GETADDR, [], index=index)):
            if answer.fields["index"] != index or answer.fields["scope"] == RT_SCOPE_LINK:
                continue
            address = answer.get("IFA_LOCAL") or answer.get("IFA_ADDRESS")
            if address:
                out.add(str(ipaddress.ip_address(address)))
        return out

    def local_addresses(self) -> list[str]:
        """Every address of this namespace except service addresses: those on the dummy
        interface, and on kube-proxy's kube-ipvs0 while a migration leaves it behind
        (they are VIPs, not the node's addresses, and must get no NodePort servers)."""
        skip = {self._link_index(), self._link_index(KUBE_PROXY_DUMMY)} - {None}
        out = set()
        for answer in self._rtnl.dump(address_request(RTM_GETADDR, [])):
            if answer.fields["index"] in skip:
                continue
            address = answer.get("IFA_LOCAL") or answer.get("IFA_ADDRESS")
            if address:
                out.add(ipaddress.ip_address(address))
        return [str(a) for a in sorted(out, key=lambda a: (a.version, int(a)))]

    # -- the dummy interface ------------------------------------------------------

    def _link_index(self, name: str | None = None) -> int | None:
        """The index of the dummy interface (or of another interface, by ``name``)."""
        msg = ifinfmsg()
        msg["header"]["type"] = RTM_GETLINK
        msg["attrs"] = [("IFLA_IFNAME", name or self.dummy)]
        (answer,) = self._rtnl.query([msg])
        ours = name is None or name == self.dummy
        if isinstance(answer, NetlinkError):
            if answer.code in (errno.ENODEV, errno.ENOENT):
                if ours:
                    self._dummy_index = None
                return None
            raise answer
        if not ours:
            return int(answer["index"])
        self._dummy_index = int(answer["index"])
        return self._dummy_index

    def ensure_dummy(self) -> int:
        """Create the dummy interface if it is missing; its index."""
        index = self._link_index()
        if index is not None:
            return index
        msg = ifinfmsg()
        msg["header"]["type"] = RTM_NEWLINK
        msg["header"]["flags"] = NLM_F_CREATE | NLM_F_EXCL
        msg["attrs"] = [("IFLA_IFNAME", self.dummy),
                        ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "dummy")]})]
        (err,) = self._rtnl.write([msg])
        if err is not None and err.code != errno.EEXIST:
            raise err
        index = self._link_index()
        if index is None:
            raise NetlinkError(errno.ENODEV, f"{self.dummy} vanished after creation")
        log.info("created the dummy interface", extra={"interface": self.dummy})
        return index

    # -- timeouts --------------------------------------------------------------

    def timeouts(self) -> Timeouts:
        (answer,) = self._ipvs.query([self._ipvs_msg(IPVS_CMD_GET_CONFIG, [])])
        if isinstance(answer, NetlinkError):
            raise answer
        return Timeouts(
            int(answer.get("IPVS_CMD_ATTR_TIMEOUT_TCP") or 0),
            int(answer.get("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN") or 0),
            int(answer.get("IPVS_CMD_ATTR_TIMEOUT_UDP") or 0),
        )

    def set_timeouts(self, tcp: int = 0, tcpfin: int = 0, udp: int = 0) -> bool:
        """Set the timeouts (seconds; 0 leaves one as it is) that differ; True if any did."""
        now = self.timeouts()
        attrs = [(name, int(want)) for name, want, have in (
            ("IPVS_CMD_ATTR_TIMEOUT_TCP", tcp, now.tcp),
            ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", tcpfin, now.tcpfin),
            ("IPVS_CMD_ATTR_TIMEOUT_UDP", udp, now.udp),
        ) if want > 0 and int(want) != have]
        if not attrs:
            return False
        (err,) = self._ipvs.write([self._ipvs_msg(IPVS_CMD_SET_CONFIG, attrs)])
        if err is not None:
            raise err
        log.info("IPVS timeouts set", extra={"timeouts": dict(attrs)})
        return True

    # -- writing ---------------------------------------------------------------

    def apply(self, ops: Sequence[Operation]) -> None:
        """Carry out ``ops`` in order, batched; IPVSApplyError lists the ones that failed."""
        failures: list[tuple[Operation, NetlinkError]] = []
        for run in _runs(ops):
            retry: list[Operation] = []
            for op, err in self._send(run):
                follow = _fallback(op, err)
                if follow is not None:
                    retry.append(follow)
                elif not _harmless(op, err):
                    failures.append((op, err))
            if retry:
                failures.extend((op, err) for op, err in self._send(retry)
                                if not _harmless(op, err))
        if failures:
            raise IPVSApplyError(failures)

    def _send(self, run: Sequence[Operation]) -> list[tuple[Operation, NetlinkError]]:
        """Send one run of operations (all for the same socket); the failed ones."""
        batch = self._batch(run)
        out: list[tuple[Operation, NetlinkError]] = []
        for ops, err in zip(batch.ops, batch.channel.write(batch.messages), strict=True):
            if err is not None:
                out.extend((op, err) for op in ops)
        return out

    def _batch(self, run: Sequence[Operation]) -> _Batch:
        first = run[0]
        if isinstance(first, AddAddress | DelAddress):
            batch = _Batch(self._rtnl)
            index = self._dummy_index if self._dummy_index is not None else self.ensure_dummy()
            for op in run:
                assert isinstance(op, AddAddress | DelAddress)
                batch.add(_address_msg(op, index), op)
            return batch
        if isinstance(first, CreateSet | DestroySet | AddMember | DelMember):
            return self._set_batch(run)
        batch = _Batch(self._ipvs)
        for op in run:
            batch.add(self._ipvs_op(op), op)
        return batch

    def _set_batch(self, run: Sequence[Operation]) -> _Batch:
        batch = _Batch(self._ipset)
        types = {(op.type, op.ipv6) for op in run if isinstance(op, CreateSet)}
        missing = sorted(t for t in types if (t[0], _family(t[1])) not in self._revisions)
        if missing:
            answers = self._ipset.query([ipset_request(
                IPSET_CMD_TYPE, [["IPSET_ATTR_TYPENAME", t], ["IPSET_ATTR_FAMILY", _family(v6)]])
                for t, v6 in missing])
            for (t, v6), answer in zip(missing, answers, strict=True):
                if isinstance(answer, NetlinkError):
                    raise NetlinkError(answer.code, f"ipset type {t}")
                self._revisions[(t, _family(v6))] = int(answer.get("IPSET_ATTR_REVISION"))
        for (kind, name), ops in groupby(run, key=_set_group):
            group = list(ops)
            if kind is AddMember or kind is DelMember:
                cmd = IPSET_CMD_ADD if kind is AddMember else IPSET_CMD_DEL
                for start in range(0, len(group), MEMBERS_PER_MESSAGE):
                    members = [op for op in group[start:start + MEMBERS_PER_MESSAGE]
                               if isinstance(op, AddMember | DelMember)]
                    v6 = any(":" in m.entry.ip for m in members)
                    batch.add(ipset_request(cmd, [
                        ["IPSET_ATTR_SETNAME", name],
                        *ipset_adt([_entry_attrs(m.entry) for m in members]),
                    ], family=_family(v6)), *members)
                continue
            for op in group:
                if isinstance(op, CreateSet):
                    batch.add(self._create_set(op), op)
                elif isinstance(op, DestroySet):
                    batch.add(ipset_request(IPSET_CMD_DESTROY, [["IPSET_ATTR_SETNAME", op.name]]),
                              op)
        return batch

    def _create_set(self, op: CreateSet) -> bytes:
        data: list[list[Any]] = []
        if op.type == SetType.BITMAP_PORT:
            data = [["IPSET_ATTR_PORT_FROM", 0], ["IPSET_ATTR_PORT_TO", 65535]]
        family = _family(op.ipv6)
        return ipset_request(IPSET_CMD_CREATE, [
            ["IPSET_ATTR_SETNAME", op.name], ["IPSET_ATTR_TYPENAME", op.type],
            ["IPSET_ATTR_REVISION", self._revisions[(op.type, family)]],
            ["IPSET_ATTR_FAMILY", family], ["IPSET_ATTR_DATA", {"attrs": data}],
        ], family=family)

    def _ipvs_msg(self, cmd: int, attrs: list[tuple[str, Any]]) -> bytes:
        if self._ipvs_channel is None:
            _ = self._ipvs  # opening it resolves the family id
        return ipvs_request(self._ipvs_family, cmd, attrs)

    def _ipvs_op(self, op: Operation) -> Any:
        if isinstance(op, AddService | SetService):
            cmd = IPVS_CMD_NEW_SERVICE if isinstance(op, AddService) else IPVS_CMD_SET_SERVICE
            return self._ipvs_msg(cmd, [_service_full(op.key, op.scheduler,
                                                      op.persistence_timeout)])
        if isinstance(op, DelService):
            return self._ipvs_msg(IPVS_CMD_DEL_SERVICE, [_service_key(op.key)])
        if isinstance(op, AddDest | SetDest):
            cmd = IPVS_CMD_NEW_DEST if isinstance(op, AddDest) else IPVS_CMD_SET_DEST
            return self._ipvs_msg(cmd, [_service_key(op.service),
                                        _dest_full(op.address, op.port, op.weight)])
        if isinstance(op, DelDest):
            return self._ipvs_msg(IPVS_CMD_DEL_DEST, [_service_key(op.service),
                                                      _dest_key(op.address, op.port)])
        raise TypeError(f"not an IPVS operation: {op!r}")

    # -- cleanup ---------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove pyproxy's virtual servers, PYPROXY-* ipsets and dummy interface; only those.

        Works whether or not IPVS and ipset are in the kernel (nothing of
        theirs to remove then). Any iptables rule that uses the ipsets must be
        gone first: the kernel refuses to destroy a set in use.
        """
        index = self._link_index()
        addresses = self._addresses(index) if index is not None else set()
        ops: list[Operation] = []
        try:
            ops += [DelService(k) for k in sorted(self._owned_services(addresses))]
        except OSError as err:
            if err.errno not in _ABSENT:
                raise
        try:
            ops += [DestroySet(name) for name in sorted(self._read_sets())]
        except OSError as err:
            if err.errno not in _ABSENT:
                raise
        failure: IPVSApplyError | None = None
        try:
            if ops:
                self.apply(ops)
        except IPVSApplyError as err:
            failure = err
        if index is not None:
            msg = ifinfmsg()
            msg["index"] = index
            msg["header"]["type"] = RTM_DELLINK
            (gone,) = self._rtnl.write([msg])
            if gone is not None and gone.code not in (errno.ENODEV, errno.ENOENT):
                raise gone
            self._dummy_index = None
            log.info("deleted the dummy interface", extra={"interface": self.dummy})
        if failure is not None:
            raise failure


# The kernel has no IPVS (no "IPVS" generic netlink family) or no ipset (nfnetlink
# answers EINVAL for a subsystem it does not have, or has no nfnetlink at all).
_ABSENT = (errno.ENOENT, errno.EINVAL, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT)


# --------------------------------------------------------------------------- messages


def _runs(ops: Sequence[Operation]) -> list[list[Operation]]:
    """Consecutive operations for the same socket (order across sockets is kept)."""
    runs: list[list[Operation]] = []
    last = None
    for op in ops:
        kind = _socket_of(op)
        if kind != last:
            runs.append([])
            last = kind
        runs[-1].append(op)
    return runs


def _set_group(op: Operation) -> tuple[type, str]:
    """Consecutive additions to (or deletions from) one set travel in one message."""
    return (type(op), op.set if isinstance(op, AddMember | DelMember) else "")


def _socket_of(op: Operation) -> str:
    if isinstance(op, AddAddress | DelAddress):
        return "rtnl"
    if isinstance(op, CreateSet | DestroySet | AddMember | DelMember):
        return "ipset"
    return "ipvs"


def _fallback(op: Operation, err: NetlinkError) -> Operation | None:
    """What to do instead when ``op`` met ``err`` (None: nothing, it failed or did no harm)."""
    if isinstance(op, AddService) and err.code == errno.EEXIST:
        return SetService(op.key, op.scheduler, op.persistence_timeout)  # adopt it
    if isinstance(op, AddDest) and err.code == errno.EEXIST:
        return SetDest(op.service, op.address, op.port, op.weight)
    if isinstance(op, SetDest) and err.code == errno.ENOENT:
        return AddDest(op.service, op.address, op.port, op.weight)  # deleted meanwhile
    if isinstance(op, SetService) and err.code == errno.ESRCH:
        return AddService(op.key, op.scheduler, op.persistence_timeout)
    return None


def _harmless(op: Operation, err: NetlinkError) -> bool:
    """Errors that mean the operation's goal already holds."""
    gone = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)
    if isinstance(op, DelService | DelDest | DelAddress | DestroySet):
        return err.code in gone
    if isinstance(op, AddAddress):
        return err.code == errno.EEXIST
    return False


def _af(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _family(ipv6: bool) -> int:
    return NFPROTO_IPV6 if ipv6 else NFPROTO_IPV4


def _service_key(key: VirtualServerKey) -> tuple[str, Any]:
    return ("IPVS_CMD_ATTR_SERVICE", {"attrs": [
        ("IPVS_SVC_ATTR_AF", _af(key.address)),
        ("IPVS_SVC_ATTR_PROTOCOL", PROTOCOL_NUMBERS[key.protocol]),
        ("IPVS_SVC_ATTR_ADDR", key.address),
        ("IPVS_SVC_ATTR_PORT", key.port),
    ]})


def _service_full(key: VirtualServerKey, scheduler: str, timeout: int) -> tuple[str, Any]:
    name, body = _service_key(key)
    v6 = ":" in key.address
    body["attrs"] += [
        ("IPVS_SVC_ATTR_SCHED_NAME", scheduler),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": IP_VS_SVC_F_PERSISTENT if timeout else 0,
                                 "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", timeout),
        ("IPVS_SVC_ATTR_NETMASK", 128 if v6 else 0xFFFFFFFF),
    ]
    return name, body


def _dest_key(address: str, port: int) -> tuple[str, Any]:
    return ("IPVS_CMD_ATTR_DEST", {"attrs": [
        ("IPVS_DEST_ATTR_ADDR", address),
        ("IPVS_DEST_ATTR_PORT", port),
        ("IPVS_DEST_ATTR_ADDR_FAMILY", _af(address)),
    ]})


def _dest_full(address: str, port: int, weight: int) -> tuple[str, Any]:
    name, body = _dest_key(address, port)
    body["attrs"] += [
        ("IPVS_DEST_ATTR_FWD_METHOD", IP_VS_CONN_F_MASQ),
        ("IPVS_DEST_ATTR_WEIGHT", weight),
        ("IPVS_DEST_ATTR_U_THRESH", 0),
        ("IPVS_DEST_ATTR_L_THRESH", 0),
    ]
    return name, body


def _parse_service(msg: Message) -> tuple[VirtualServerKey, str, int] | None:
    svc = msg.get("IPVS_CMD_ATTR_SERVICE")
    if svc is None:
        return None
    proto = PROTOCOLS.get(svc.get("IPVS_SVC_ATTR_PROTOCOL"))
    address = svc.get("IPVS_SVC_ATTR_ADDR")
    if proto is None or not address:  # firewall-mark services, other protocols: not ours
        return None
    key = VirtualServerKey(proto, str(ipaddress.ip_address(address)),
                           int(svc.get("IPVS_SVC_ATTR_PORT")))
    flags = svc.get("IPVS_SVC_ATTR_FLAGS")
    persistent = bool(flags and flags["flags"] & IP_VS_SVC_F_PERSISTENT)
    timeout = int(svc.get("IPVS_SVC_ATTR_TIMEOUT") or 0) if persistent else 0
    return key, str(svc.get("IPVS_SVC_ATTR_SCHED_NAME")), timeout


def _parse_dest(msg: Message) -> KernelRealServer:
    dest = msg.get("IPVS_CMD_ATTR_DEST")
    fwd = int(dest.get("IPVS_DEST_ATTR_FWD_METHOD") or 0)
    return KernelRealServer(
        address=str(ipaddress.ip_address(dest.get("IPVS_DEST_ATTR_ADDR"))),
        port=int(dest.get("IPVS_DEST_ATTR_PORT")),
        weight=int(dest.get("IPVS_DEST_ATTR_WEIGHT") or 0),
        active=int(dest.get("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0),
        inactive=int(dest.get("IPVS_DEST_ATTR_INACT_CONNS") or 0),
        masquerade=(fwd & IP_VS_CONN_F_FWD_MASK) == IP_VS_CONN_F_MASQ,
    )


def _ip_attr(name: str, address: str) -> list[Any]:
    version = "IPSET_ATTR_IPADDR_IPV6" if ":" in address else "IPSET_ATTR_IPADDR_IPV4"
    return [name, {"attrs": [[version, address]]}]


def _entry_attrs(entry: SetEntry) -> list[list[Any]]:
    """An ipset member as IPSET_ATTR_DATA attributes (its fields say which ones)."""
    attrs: list[list[Any]] = []
    if entry.ip:
        attrs.append(_ip_attr("IPSET_ATTR_IP", entry.ip))
    if entry.port or entry.protocol:
        attrs.append(["IPSET_ATTR_PORT", entry.port])
    if entry.protocol:
        attrs.append(["IPSET_ATTR_PROTO", SET_PROTOCOLS[entry.protocol]])
    if entry.ip2:
        ip2, _, prefix = entry.ip2.partition("/")
        attrs.append(_ip_attr("IPSET_ATTR_IP2", ip2))
        if prefix:
            attrs.append(["IPSET_ATTR_CIDR2", int(prefix)])
    return attrs


def _nested_ip(data: Message, *names: str) -> str:
    for name in names:
        nested = data.get(name)
        if nested is not None:
            value = nested.get("IPSET_ATTR_IPADDR_IPV4") or nested.get("IPSET_ATTR_IPADDR_IPV6")
            if value:
                return str(ipaddress.ip_address(value))
    return ""


def _parse_members(msg: Message, set_type: str) -> list[SetEntry]:
    adt = msg.get("IPSET_ATTR_ADT")
    if adt is None:
        return []
    out = []
    for data in adt.get_all("IPSET_ATTR_DATA"):
        ip = _nested_ip(data, "IPSET_ATTR_IP_FROM", "IPSET_ATTR_IP")
        port = data.get("IPSET_ATTR_PORT_FROM")
        if port is None:
            port = data.get("IPSET_ATTR_PORT", 0)
        proto = data.get("IPSET_ATTR_PROTO")
        proto_name = SET_PROTOCOL_NAMES.get(proto, str(proto)) if proto is not None else ""
        if set_type == SetType.BITMAP_PORT:
            out.append(SetEntry(port=int(port)))
        elif set_type == SetType.HASH_IP:
            out.append(SetEntry(ip))
        elif set_type == SetType.HASH_IP_PORT_IP:
            out.append(SetEntry(ip, proto_name, int(port), _nested_ip(data, "IPSET_ATTR_IP2")))
        elif set_type == SetType.HASH_IP_PORT_NET:
            net = _nested_ip(data, "IPSET_ATTR_IP2")
            cidr = data.get("IPSET_ATTR_CIDR2")
            if net:
                prefix = cidr if cidr is not None else (128 if ":" in net else 32)
                net = str(ipaddress.ip_network(f"{net}/{prefix}", strict=False))
            out.append(SetEntry(ip, proto_name, int(port), net))
        else:  # hash:ip,port, and whatever else carries an address and a port
            out.append(SetEntry(ip, proto_name, int(port)))
    return out


def _address_msg(op: AddAddress | DelAddress, index: int) -> bytes:
    v6 = ":" in op.address
    fields = {"family": socket.AF_INET6 if v6 else socket.AF_INET,
              "prefixlen": 128 if v6 else 32, "index": index}
    attrs: list[tuple[str, Any]] = [("IFA_ADDRESS", op.address)]
    if not v6:
        attrs.insert(0, ("IFA_LOCAL", op.address))
    if isinstance(op, DelAddress):
        return address_request(RTM_DELADDR, attrs, **fields)
    if v6:
        attrs.append(("IFA_FLAGS", IFA_F_NODAD))
    return address_request(RTM_NEWADDR, attrs, NLM_F_CREATE | NLM_F_REPLACE, **fields)
