"""iptables rules as plain data: what the planner produces, what iptables-save reads back.

One representation serves the planner (desired state), the applier (rendering
an iptables-restore payload), the tracer (following a packet) and cleanup
(finding what pyproxy owns). Rules are kept as the argument text that follows
``-A CHAIN`` so that they can be written, read back and compared as text.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Iterable, Iterator, Mapping
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

    def table(self, table: Table) -> dict[str, tuple[str, ...]]:
        return self.chains.setdefault(table, {})

    def owned_chains(self, table: Table) -> set[str]:
        return {name for name in self.table(table) if is_owned_chain(name)}

    def rule_count(self, table: Table) -> int:
        return sum(len(rules) for rules in self.table(table).values())

    def iter_rules(self) -> Iterator[tuple[Table, str, str]]:
        for table, chains in self.chains.items():
            for chain, rules in chains.items():
                for rule in rules:
                    yield table, chain, rule


def parse_save(text: str) -> Ruleset:
    """Parse iptables-save output into a Ruleset (all chains, built-in included)."""
    rs = Ruleset()
    current: dict[str, list[str]] | None = None
    table: Table | None = None
    building: dict[Table, dict[str, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            try:
                table = Table(line[1:])
            except ValueError:
                table = None  # mangle, raw, security: not ours, not read
                current = None
                continue
            current = building.setdefault(table, {})
        elif current is None:
            continue
        elif line.startswith(":"):
            current.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.setdefault(chain, []).append(rest[0] if rest else "")
        elif line == "COMMIT":
            current = None
    for tbl, chains in building.items():
        rs.chains[tbl] = {name: tuple(rules) for name, rules in chains.items()}
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


def render(
    desired: Ruleset,
    existing: Ruleset,
    *,
    only: Iterable[str] | None = None,
) -> RestorePayload:
    """The restore payload that turns ``existing`` (pyproxy's part) into ``desired``.

    With ``only=None`` every desired owned chain is declared and rewritten (a
    full sync). With ``only`` given, just those chains are rewritten, plus any
    chain whose rules differ from ``existing`` (a partial sync): chains that did
    not change are not even declared, because on nf_tables re-declaring a chain
    is what makes large transactions slow. Owned chains that exist but are not
    desired are flushed and deleted in the same transaction, after the rules
    that referenced them are gone, so no packet meets half a service.
    """
    forced = None if only is None else set(only)
    payload = RestorePayload()
    for table in (Table.FILTER, Table.NAT):
        want = desired.table(table)
        have = existing.table(table)
        write = [
            name
            for name in want
            if is_owned_chain(name)
            and (forced is None or name in forced or have.get(name) != want[name])
        ]
        stale = sorted(name for name in have if is_owned_chain(name) and name not in want)
        missing_jumps = [
            j for j in desired.jumps
            if j.table is table and j not in existing.jumps
            and j.rule not in have.get(j.chain, ())
        ]
        # Jumps into owned chains that the plan no longer wants (an older pyproxy's, or a
        # chain going stale) go in the same transaction, or the chain could not be deleted.
        obsolete_jumps = [
            (chain, rule)
            for chain in BUILTIN_CHAINS[table]
            for rule in have.get(chain, ())
            if is_owned_rule(rule) and Jump(table, chain, rule) not in desired.jumps
        ]
        if not (write or stale or missing_jumps or obsolete_jumps):
            continue
        lines = payload.lines
        lines.append(f"*{table}")
        for name in write:
            lines.append(f":{name} - [0:0]")
        for name in stale:
            lines.append(f":{name} - [0:0]")  # flushes it, so its jumps elsewhere go first
        for name in write:
            lines.extend(f"-A {name} {rule}" for rule in want[name])
        for chain, rule in obsolete_jumps:
            lines.append(f"-D {chain} {rule}")
        for jump in reversed(missing_jumps):  # each goes first, so insert in reverse
            lines.append(f"-I {jump.chain} 1 {jump.rule}")
        for name in stale:
            lines.append(f"-X {name}")
        lines.append("COMMIT")
    return payload


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
