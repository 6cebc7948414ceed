"""iptables rules as plain data: what the planner produces, what iptables-save reads back.

One representation serves the planner (desired state), the applier (rendering
an iptables-restore payload), the tracer (following a packet) and cleanup
(finding what pyproxy owns). Rules are kept as the argument text that follows
``-A CHAIN`` so that they can be written, read back and compared as text.
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

PREFIX = "PYPROXY-"
MAX_CHAIN_NAME = 28  # the kernel's xt_table name limit (XT_EXTENSION_MAXNAMELEN - 1)


class Table(enum.StrEnum):
    FILTER = "filter"
    NAT = "nat"


BUILTIN_CHAINS: Mapping[Table, tuple[str, ...]] = {
    Table.FILTER: ("INPUT", "FORWARD", "OUTPUT"),
    Table.NAT: ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}


_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\", "'": "\\'"})


def quote(value: str) -> str:
    """A string argument as iptables-save prints it (xtables_save_string).

    Bare when it is only letters, digits, '_' and '-'; otherwise in double
    quotes with '"', '\\' and "'" escaped. Writing rules this way is what lets a
    sync compare its plan with the kernel's rules as plain text.
    """
    if _BARE.fullmatch(value):
        return value
    return f'"{value.translate(_ESCAPES)}"'


def is_owned_chain(name: str) -> bool:
    return name.startswith(PREFIX)


def is_owned_rule(rule: str) -> bool:
    """A rule in a built-in chain is pyproxy's when it jumps to one of pyproxy's chains."""
    args = split_rule(rule)
    for flag in ("-j", "-g"):
        if flag in args:
            i = args.index(flag)
            if i + 1 < len(args) and is_owned_chain(args[i + 1]):
                return True
    return False


def split_rule(rule: str) -> list[str]:
    return shlex.split(rule)


@dataclass(frozen=True, slots=True)
class Jump:
    """A rule pyproxy keeps in a built-in chain (added once, kept first)."""

    table: Table
    chain: str
    rule: str


@dataclass
class Ruleset:
    """Chains (name -> rules) per table. Rules are the text after ``-A CHAIN``.

    ``jumps`` holds the rules pyproxy keeps in built-in chains; they are not
    chains of their own, so they are ensured rather than rewritten.
    """

    chains: dict[Table, dict[str, tuple[str, ...]]] = field(
        default_factory=lambda: {Table.FILTER: {}, Table.NAT: {}}
    )
    jumps: tuple[Jump, ...] = ()
    # Transaction groups for large syncs: chain -> group (a service's chains share its
    # dispatch shard's group). Chains without a group go in the first transaction.
    groups: Mapping[str, int] = field(default_factory=dict, compare=False)

    def table(self, table: Table) -> dict[str, tuple[str, ...]]:
        return self.chains.setdefault(table, {})

    def copy(self) -> Ruleset:
        """Each table's chain map copied (the rule tuples are immutable and shared)."""
        return Ruleset({t: dict(c) for t, c in self.chains.items()}, self.jumps, self.groups)

    def owned_chains(self, table: Table) -> set[str]:
        return {name for name in self.table(table) if is_owned_chain(name)}

    def rule_count(self, table: Table) -> int:
        return sum(len(rules) for rules in self.table(table).values())

    def iter_rules(self) -> Iterator[tuple[Table, str, str]]:
        for table, chains in self.chains.items():
            for chain, rules in chains.items():
                for rule in rules:
                    yield table, chain, rule


Tables = dict[str, dict[str, list[str]]]  # table -> chain -> rules (text after -A CHAIN)


def parse_tables(text: str) -> Tables:
    """iptables-save output, every table it holds (mangle and raw included)."""
    tables: Tables = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], {})
        elif current is None:
            continue
        elif line.startswith(":"):
            current.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.setdefault(chain, []).append(rest[0] if rest else "")
        elif line == "COMMIT":
            current = None
    return tables


def parse_save(text: str) -> Ruleset:
    """iptables-save output as a Ruleset: filter and nat, built-in chains included."""
    rs = Ruleset()
    for name, chains in parse_tables(text).items():
        if name in (Table.FILTER, Table.NAT):
            rs.chains[Table(name)] = {c: tuple(rules) for c, rules in chains.items()}
    return rs


@dataclass
class RestorePayload:
    """An iptables-restore --noflush transaction, kept as lines for error context."""

    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n" if self.lines else ""

    def __bool__(self) -> bool:
        return bool(self.lines)


@dataclass
class _TableChange:
    table: Table
    write: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    missing_jumps: list[Jump] = field(default_factory=list)
    obsolete_jumps: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.write or self.stale or self.missing_jumps or self.obsolete_jumps)


def _changes(desired: Ruleset, existing: Ruleset, table: Table, forced: set[str] | None,
             chains: Collection[tuple[Table, str]] | None) -> _TableChange:
    want = desired.table(table)
    have = existing.table(table)
    change = _TableChange(table)
    if chains is None:
        names: Iterable[str] = set(want) | set(have)
    else:
        names = {name for t, name in chains if t is table}
    for name in sorted(names):
        if not is_owned_chain(name):
            continue
        if name in want:
            if (forced is None or name in forced or have.get(name) != want[name]):
                change.write.append(name)
        elif name in have:
            change.stale.append(name)
    if chains is None:
        change.missing_jumps = [
            j for j in desired.jumps
            if j.table is table and j not in existing.jumps
            and j.rule not in have.get(j.chain, ())
        ]
        # Jumps into owned chains that the plan no longer wants (an older pyproxy's, or a
        # chain going stale) go in the same transaction, or the chain could not be deleted.
        change.obsolete_jumps = [
            (chain, rule)
            for chain in BUILTIN_CHAINS[table]
            for rule in have.get(chain, ())
            if is_owned_rule(rule) and Jump(table, chain, rule) not in desired.jumps
        ]
    return change


def _section(lines: list[str], table: Table, want: Mapping[str, tuple[str, ...]], *,
             declare: Iterable[str] = (), write: Iterable[str] = (),
             stale: Iterable[str] = (), obsolete: Iterable[tuple[str, str]] = (),
             jumps: Iterable[Jump] = ()) -> None:
    write, stale, obsolete, jumps = list(write), list(stale), list(obsolete), list(jumps)
    declare = [name for name in declare if name not in write]
    if not (declare or write or stale or obsolete or jumps):
        return
    lines.append(f"*{table}")
    lines.extend(f":{name} - [0:0]" for name in (*declare, *write, *stale))
    for name in write:
        lines.extend(f"-A {name} {rule}" for rule in want[name])
    lines.extend(f"-D {chain} {rule}" for chain, rule in obsolete)
    # each jump goes first, so insert in reverse
    lines.extend(f"-I {jump.chain} 1 {jump.rule}" for jump in reversed(jumps))
    lines.extend(f"-X {name}" for name in stale)  # flushed above, after their users changed
    lines.append("COMMIT")


def render(
    desired: Ruleset,
    existing: Ruleset,
    *,
    only: Iterable[str] | None = None,
    chains: Collection[tuple[Table, str]] | None = None,
) -> RestorePayload:
    """The restore payload that turns ``existing`` (pyproxy's part) into ``desired``.

    ``only=None`` (the default) rewrites every desired chain, as `pyproxy plan`
    prints it. Syncs pass ``only=()``: then chains whose rules already match
    are not even declared, because on nf_tables re-declaring a chain is what
    makes large transactions slow; ``only`` may name chains to rewrite even if
    unchanged. ``chains`` restricts the comparison to
    those (table, chain) pairs: a partial sync passes what its plan touched, so
    its cost follows the change, not the size of the ruleset. Owned chains that
    exist but are not desired are flushed and deleted in the same transaction,
    after the rules that referenced them are gone, so no packet meets half a
    service.
    """
    forced = None if only is None else set(only)
    payload = RestorePayload()
    for table in (Table.FILTER, Table.NAT):
        c = _changes(desired, existing, table, forced, chains)
        _section(payload.lines, table, desired.table(table), write=c.write, stale=c.stale,
                 obsolete=c.obsolete_jumps, jumps=c.missing_jumps)
    return payload


def render_transactions(
    desired: Ruleset,
    existing: Ruleset,
    *,
    chains: Collection[tuple[Table, str]] | None = None,
) -> list[RestorePayload]:
    """Like `render`, split into transactions by ``desired.groups`` (dispatch shards).

    For nf_tables, where the cost of one transaction grows much faster than the
    chains it declares. The first transaction holds the shared chains and the
    jumps (declaring, empty, any grouped chain they will reference that does
    not exist yet); then one per group, each carrying a shard's dispatch chain
    together with every chain of the services in it, so a service's chains and
    its dispatch rules still change together; stale chains go last, when
    nothing references them any more.
    """
    out: list[RestorePayload] = []
    base = RestorePayload()
    per_group: dict[int, RestorePayload] = {}
    final = RestorePayload()
    for table in (Table.FILTER, Table.NAT):
        c = _changes(desired, existing, table, set(), chains)
        want, have = desired.table(table), existing.table(table)
        grouped: dict[int, list[str]] = {}
        ungrouped: list[str] = []
        for name in c.write:
            g = desired.groups.get(name)
            (ungrouped if g is None else grouped.setdefault(g, [])).append(name)
        # Only the shared chains' jump targets need to exist before their own transaction.
        targets = {_target(rule) for name in ungrouped for rule in want[name]}
        placeholders = [n for names in grouped.values() for n in names
                        if n not in have and n in targets]
        _section(base.lines, table, want, declare=sorted(placeholders), write=ungrouped,
                 jumps=c.missing_jumps)
        for g in sorted(grouped):
            _section(per_group.setdefault(g, RestorePayload()).lines, table, want,
                     write=grouped[g])
        _section(final.lines, table, want, stale=c.stale, obsolete=c.obsolete_jumps)
    out.append(base)
    out.extend(per_group[g] for g in sorted(per_group))
    out.append(final)
    return [p for p in out if p]


# What an upstream kube-proxy leaves behind (iptables and IPVS modes), for
# `pyproxy cleanup --kube-proxy`: its own chains by name or prefix, as its
# CleanupLeftovers knows them. Not the kubelet's (KUBE-FIREWALL,
# KUBE-KUBELET-CANARY, KUBE-MARK-DROP, KUBE-MARK-MASQ on older kubelets,
# KUBE-IPTABLES-HINT), which the kubelet would recreate anyway.
KUBE_PROXY_CHAINS = (
    "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
    "KUBE-FORWARD", "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY",
    "KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-SVL-", "KUBE-FW-", "KUBE-XLB-",
    "KUBE-LOAD-BALANCER", "KUBE-NODE-PORT", "KUBE-FIRE-WALL", "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
)


def render_cleanup(existing: Ruleset, owned: Iterable[str] | None = None) -> RestorePayload:
    """A payload deleting every owned chain and every owned jump in built-in chains.

    ``owned`` overrides the chain-name test (``pyproxy cleanup --kube-proxy``
    passes upstream's prefixes); the default is pyproxy's own prefix.
    """
    prefixes = tuple(owned) if owned is not None else (PREFIX,)

    def mine(chain: str) -> bool:
        return chain.startswith(prefixes)

    payload = RestorePayload()
    for table in (Table.FILTER, Table.NAT):
        have = existing.table(table)
        chains = sorted(name for name in have if mine(name))
        deletes = []
        for chain, rules in have.items():
            if mine(chain):
                continue
            for rule in rules:
                target = _target(rule)
                if target is not None and mine(target):
                    deletes.append(f"-D {chain} {rule}")
        if not (chains or deletes):
            continue
        payload.lines.append(f"*{table}")
        payload.lines.extend(f":{name} - [0:0]" for name in chains)
        payload.lines.extend(deletes)
        payload.lines.extend(f"-X {name}" for name in chains)
        payload.lines.append("COMMIT")
    return payload


def _target(rule: str) -> str | None:
    args = split_rule(rule)
    for flag in ("-j", "-g"):
        if flag in args:
            i = args.index(flag)
            if i + 1 < len(args):
                return args[i + 1]
    return None
