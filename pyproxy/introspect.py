"""What pyproxy did, for an operator: the inputs of `pyproxy trace` and `pyproxy plan --diff`.

Both commands work either from a plan (computed from manifests, exactly as a
sync would) or from what the kernel holds now (iptables-save, the IPVS table
and the ipsets, read back). This module turns either into what the tracer
(`pyproxy.iptables.trace`) and the diff readers need, and renders the
results; reading the kernel stays in the appliers' modules.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyproxy.iptables.plan import Plan
from pyproxy.iptables.ruleset import (
    BUILTIN_CHAINS,
    Ruleset,
    Table,
    is_owned_chain,
    is_owned_rule,
    render,
)
from pyproxy.iptables.trace import (
    IPSetContents,
    Packet,
    TraceResult,
    VirtualService,
    VirtualServices,
    trace,
)
from pyproxy.ipvs.diff import (
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
    KernelState,
    Operation,
    SetDest,
    SetService,
)
from pyproxy.ipvs.plan import DUMMY_INTERFACE, SET_TYPES, IPVSPlan
from pyproxy.model import NodeInfo

# -------------------------------------------------------------------------- trace inputs


@dataclass(frozen=True)
class TraceInputs:
    """Everything the tracer needs besides the packet, and where it came from."""

    source: str  # "manifests" or "kernel (iptables-nft)", for the output
    ruleset: Ruleset
    local_addresses: tuple[str, ...]
    ipsets: Mapping[str, IPSetContents] | None = None
    ipvs: VirtualServices | None = None


def owned_view(rs: Ruleset) -> Ruleset:
    """pyproxy's chains, plus the rules in built-in chains that jump into them.

    `pyproxy trace` follows pyproxy's rules; other software's rules in the
    same tables (a CNI's, Docker's, an old kube-proxy's) may use matches the
    tracer does not model, and are not what the question is about.
    """
    out = Ruleset(jumps=rs.jumps)
    for table in (Table.FILTER, Table.NAT):
        have = rs.table(table)
        chains = out.table(table)
        for name, rules in have.items():
            if is_owned_chain(name):
                chains[name] = rules
            elif name in BUILTIN_CHAINS[table]:
                chains[name] = tuple(r for r in rules if is_owned_rule(r))
    return out


def from_iptables_plan(plan: Plan, node: NodeInfo) -> TraceInputs:
    return TraceInputs("manifests", plan.ruleset, tuple(str(a) for a in node.addresses))


def from_ipvs_plan(plan: IPVSPlan, node: NodeInfo) -> TraceInputs:
    """The IPVS plan: its rules, its ipsets' members, its virtual servers; the service
    addresses it binds on the dummy interface are local, as in the kernel."""
    local = (*(str(a) for a in node.addresses), *sorted(plan.addresses))
    sets = {str(name): IPSetContents(str(SET_TYPES[name]), frozenset(str(e) for e in members))
            for name, members in plan.ipsets.items()}
    vss = {(k.protocol.lower(), k.address, k.port): VirtualService(
        vs.scheduler, tuple((r.address, r.port, r.weight) for r in vs.real_servers),
        vs.persistence_timeout) for k, vs in plan.virtual_servers.items()}
    return TraceInputs("manifests", plan.ruleset, local, sets, vss)


def from_kernel_iptables(saved: Ruleset, local_addresses: Iterable[str],
                         source: str) -> TraceInputs:
    return TraceInputs(source, owned_view(saved), tuple(local_addresses))


def from_kernel_ipvs(saved: Ruleset, state: KernelState, local_addresses: Iterable[str],
                     source: str) -> TraceInputs:
    sets = {name: IPSetContents(s.type, frozenset(str(e) for e in s.members))
            for name, s in state.ipsets.items()}
    vss = {(k.protocol.lower(), k.address, k.port): VirtualService(
        vs.scheduler, tuple((r.address, r.port, r.weight) for r in vs.real_servers),
        vs.persistence_timeout) for k, vs in state.virtual_servers.items()}
    return TraceInputs(source, owned_view(saved), tuple(local_addresses), sets, vss)


def namespace_addresses() -> list[str]:
    """Every address of this network namespace (the dummy interface's included)."""
    from pyroute2 import IPRoute

    out: set[str] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if address:
                out.add(str(ipaddress.ip_address(address)))
    return sorted(out)


def run_trace(inputs: TraceInputs, packet: Packet, from_node: bool | None) -> tuple[
        TraceResult, bool]:
    """Trace ``packet``; ``from_node`` None means "from the node if its source is local"."""
    if from_node is None:
        src = ipaddress.ip_address(packet.src)
        from_node = src.is_loopback or packet.src in inputs.local_addresses
    result = trace(inputs.ruleset, packet, local_addresses=inputs.local_addresses,
                   from_local=from_node, ipsets=inputs.ipsets, ipvs=inputs.ipvs)
    return result, from_node


def trace_header(inputs: TraceInputs, packet: Packet, from_node: bool) -> str:
    where = "from this node" if from_node else "arriving from outside the node"
    host = f"[{packet.dst}]" if ":" in packet.dst else packet.dst
    return (f"packet:     {packet.protocol} {packet.src} -> {host}:{packet.dport} ({where})\n"
            f"rules:      {inputs.source}\n")


def trace_json(inputs: TraceInputs, packet: Packet, from_node: bool,
               result: TraceResult) -> dict[str, Any]:
    return {
        "packet": {"src": packet.src, "dst": packet.dst, "port": packet.dport,
                   "protocol": packet.protocol, "fromNode": from_node},
        "rules": inputs.source,
        "verdict": result.verdict,
        "masquerade": result.masquerade,
        "affinity": result.affinity,
        "endpoints": [{"endpoint": r.endpoint,
                       "probability": None if r.probability is None else round(r.probability, 6),
                       "masquerade": r.masquerade} for r in result.reach],
        "reasons": list(result.reasons),
        "chains": list(result.chains),
        "notes": list(result.notes),
    }


# -------------------------------------------------------------------------- plan --diff


def iptables_diff(desired: Ruleset, existing: Ruleset) -> list[str]:
    """What a full sync would write (`render(desired, existing, only=())`), as a readable
    diff per chain: ``--- table/CHAIN (new chain)`` then ``+``/``-`` rule lines.

    Empty when the kernel already holds the plan.
    """
    payload = render(desired, existing, only=())
    out: list[str] = []
    table: Table | None = None
    declared: list[str] = []
    edits: dict[str, list[str]] = {}  # built-in chain -> "+"/"-" lines from -I / -D
    deleted: set[str] = set()

    def flush() -> None:
        if table is None:
            return
        want, have = desired.table(table), existing.table(table)
        for name in declared:
            if name in deleted:
                out.append(f"--- {table}/{name} (deleted chain)")
                out.extend(f"- -A {name} {rule}" for rule in have.get(name, ()))
            elif name not in have:
                out.append(f"--- {table}/{name} (new chain)")
                out.extend(f"+ -A {name} {rule}" for rule in want.get(name, ()))
            else:
                out.append(f"--- {table}/{name}")
                out.extend(_rule_diff(name, have[name], want.get(name, ())))
        for name, lines in edits.items():
            out.append(f"--- {table}/{name}")
            out.extend(lines)

    for line in payload.lines:
        if line.startswith("*"):
            table = Table(line[1:])
            declared, edits, deleted = [], {}, set()
        elif line == "COMMIT":
            flush()
            table = None
        elif line.startswith(":"):
            declared.append(line[1:].split()[0])
        elif line.startswith("-D "):
            _, chain, rule = line.split(" ", 2)
            edits.setdefault(chain, []).append(f"- -A {chain} {rule}")
        elif line.startswith("-I "):
            _, chain, _position, rule = line.split(" ", 3)
            edits.setdefault(chain, []).append(f"+ -A {chain} {rule}")
        elif line.startswith("-X "):
            deleted.add(line[3:])
    return out


def _rule_diff(chain: str, old: Sequence[str], new: Sequence[str]) -> list[str]:
    out: list[str] = []
    matcher = difflib.SequenceMatcher(a=list(old), b=list(new), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        out.extend(f"- -A {chain} {rule}" for rule in old[i1:i2])
        out.extend(f"+ -A {chain} {rule}" for rule in new[j1:j2])
    return out


def describe_operation(op: Operation, dummy: str = DUMMY_INTERFACE) -> str:
    """One IPVS/ipset/address operation as a diff line (``+`` add, ``-`` delete, ``~`` set)."""
    if isinstance(op, CreateSet):
        return f"+ ipset {op.name} {op.type}{' family inet6' if op.ipv6 else ''}"
    if isinstance(op, DestroySet):
        return f"- ipset {op.name}"
    if isinstance(op, AddMember):
        return f"+ ipset {op.set} {op.entry}"
    if isinstance(op, DelMember):
        return f"- ipset {op.set} {op.entry}"
    if isinstance(op, AddAddress):
        return f"+ address {op.address} on {dummy}"
    if isinstance(op, DelAddress):
        return f"- address {op.address} on {dummy}"
    if isinstance(op, AddService | SetService):
        sign = "+" if isinstance(op, AddService) else "~"
        persist = f" persistent {op.persistence_timeout}s" if op.persistence_timeout else ""
        return f"{sign} virtual server {op.key} scheduler {op.scheduler}{persist}"
    if isinstance(op, DelService):
        return f"- virtual server {op.key}"
    if isinstance(op, AddDest | SetDest):
        sign = "+" if isinstance(op, AddDest) else "~"
        return f"{sign} real server {op.service} -> {_hostport(op.address, op.port)} " \
               f"weight {op.weight}"
    assert isinstance(op, DelDest)
    return f"- real server {op.service} -> {_hostport(op.address, op.port)}"


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def ipvs_diff(ops: Sequence[Operation], desired: Ruleset, existing: Ruleset) -> list[str]:
    """IPVS mode's `plan --diff`: the IPVS operations, then the iptables part."""
    out = [describe_operation(op) for op in ops]
    out.extend(iptables_diff(desired, existing))
    return out
