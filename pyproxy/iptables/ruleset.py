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
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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

_TABLES = frozenset(Table)
_BLOCK = 1 << 20  # iter_lines splits this many characters at a time


def iter_lines(text: str) -> Iterator[str]:
    """``text.splitlines()``, one block of about ``_BLOCK`` characters at a time.

    At 10,000 services a full save or restore is 250,000 lines: as a list of
    strings they would take more memory than the text itself, at the moment
    the text is alive anyway.
    """
    start, size = 0, len(text)
    while start < size:
        end = text.find("\n", start + _BLOCK)
        end = size if end < 0 else end + 1
        yield from text[start:end].splitlines()
        start = end


def parse_tables(text: str | Iterable[str], like: Ruleset | None = None) -> Tables:
    """iptables-save output, every table it holds (mangle and raw included).

    ``text`` may also be its lines, as they are read (IPTables.save_lines).

    A rule equal to the one at the same place of the same chain in ``like``
    is kept as ``like``'s own string: a full sync parses the kernel's rules
    with its plan as ``like``, and where the two agree, which is almost
    everywhere, the parsed rules then cost a reference each instead of a
    second copy of every rule.
    """
    tables: Tables = {}
    current: dict[str, list[str]] | None = None
    want: Mapping[str, tuple[str, ...]] = {}
    for raw in iter_lines(text) if isinstance(text, str) else text:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name = line[1:]
            current = tables.setdefault(name, {})
            want = {}
            if like is not None and name in _TABLES:
                want = like.chains.get(Table(name), {})
        elif current is None:
            continue
        elif line.startswith(":"):
            current.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            space = line.find(" ", 3)
            chain, rule = (line[3:], "") if space < 0 else (line[3:space], line[space + 1:])
            rules = current.get(chain)
            if rules is None:
                rules = current[chain] = []
            same = want.get(chain, ())
            if len(rules) < len(same) and same[len(rules)] == rule:
                rule = same[len(rules)]
            rules.append(rule)
        elif line == "COMMIT":
            current = None
    return tables


def parse_save(text: str | Iterable[str], like: Ruleset | None = None) -> Ruleset:
    """iptables-save output as a Ruleset: filter and nat, built-in chains included.

    ``like``, when given, is the ruleset the caller will compare this one
    with (a sync's plan): equal rules and chains share its strings and tuples
    (see parse_tables), which keeps a full sync's view of a large kernel
    small. Only memory is shared, never meaning: the result is the same.
    """
    rs = Ruleset()
    for name, chains in parse_tables(text, like).items():
        if name in _TABLES:
            table = Table(name)
            want = like.chains.get(table, {}) if like is not None else {}
            parsed = rs.chains[table] = {}
            for chain, rules in chains.items():
                kept = tuple(rules)
                same = want.get(chain)
                parsed[chain] = same if same is not None and same == kept else kept
    return rs


class RestorePayload:
    """An iptables-restore --noflush transaction: its text, added a block of lines at a time.

    A full sync at 10,000 services writes 250,000 lines, 30 MB. As one string
    per line they would cost half as much again; joined into one text, the
    text and its pieces would both be alive while it is joined. So each block
    of lines (a chain's rules, say) is one string, IPTables.restore writes the
    blocks one by one (``pieces``), and they are joined only if ``text`` is
    read (tests, fakes), lines split off only when asked for (error context).
    """

    __slots__ = ("_blocks", "line_count")

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self._blocks: list[str] = []
        self.line_count = 0
        self.extend(lines)

    def append(self, line: str) -> None:
        self.extend((line,))

    def extend(self, lines: Iterable[str]) -> None:
        block = list(lines)
        if block:
            self.line_count += len(block)
            block.append("")  # so the block ends with a newline, without another copy of it
            self._blocks.append("\n".join(block))

    def add_block(self, block: str) -> None:
        """Whole lines, each ending with a newline, as one piece."""
        if block:
            self.line_count += block.count("\n")
            self._blocks.append(block)

    @property
    def pieces(self) -> Iterable[str]:
        """The text in the pieces it was added in, in order."""
        return tuple(self._blocks)

    @property
    def text(self) -> str:
        """The payload as iptables-restore reads it (every line ends with a newline)."""
        if len(self._blocks) > 1:
            self._blocks = ["".join(self._blocks)]
        return self._blocks[0] if self._blocks else ""

    @property
    def lines(self) -> list[str]:
        """The payload's lines, split off the text (a string each: for small payloads)."""
        return self.text.splitlines()

    def iter_lines(self) -> Iterator[str]:
        """The payload's lines, a piece at a time (for large payloads)."""
        for piece in self._blocks:
            yield from piece.splitlines() if len(piece) <= _BLOCK else iter_lines(piece)

    def __bool__(self) -> bool:
        return self.line_count > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RestorePayload):
            return NotImplemented
        return self.text == other.text

    def __repr__(self) -> str:
        return f"RestorePayload({self.line_count} lines)"


class StreamedPayload(RestorePayload):
    """A payload whose pieces are rendered anew each time they are read (`Pending.stream`)."""

    __slots__ = ("_source",)

    def __init__(self, source: Callable[[], Iterable[str]], line_count: int) -> None:
        super().__init__()
        self._source = source
        self.line_count = line_count

    @property
    def pieces(self) -> Iterable[str]:
        return self._source()

    @property
    def text(self) -> str:
        return "".join(self._source())

    def iter_lines(self) -> Iterator[str]:
        for piece in self._source():
            yield from piece.splitlines()


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


def _section_blocks(table: str, want: Mapping[str, tuple[str, ...]], *,
                    declare: Iterable[str] = (), write: Iterable[str] = (),
                    stale: Iterable[str] = (), obsolete: Iterable[tuple[str, str]] = (),
                    jumps: Iterable[Jump] = ()) -> Iterator[str]:
    """One table's section, a block of whole lines at a time (a chain's rules, say).

    The ``*table`` line is a block of its own (generation.commits counts them).
    """
    write, stale, obsolete, jumps = list(write), list(stale), list(obsolete), list(jumps)
    declare = [name for name in declare if name not in write]
    if not (declare or write or stale or obsolete or jumps):
        return
    yield f"*{table}\n"
    yield "".join(f":{name} - [0:0]\n" for name in (*declare, *write, *stale))
    for name in write:
        if rules := want[name]:
            prefix = f"-A {name} "
            yield prefix + f"\n{prefix}".join(rules) + "\n"
    yield "".join(f"-D {chain} {rule}\n" for chain, rule in obsolete)
    # each jump goes first, so insert in reverse
    yield "".join(f"-I {jump.chain} 1 {jump.rule}\n" for jump in reversed(jumps))
    yield "".join(f"-X {name}\n" for name in stale)  # flushed above, after their users changed
    yield "COMMIT\n"


def _section(payload: RestorePayload, table: str, want: Mapping[str, tuple[str, ...]],
             **parts: Any) -> None:
    for block in _section_blocks(table, want, **parts):
        payload.add_block(block)


@dataclass
class Pending:
    """What turns ``existing`` (pyproxy's part) into ``desired``, before any text exists.

    Sized first (``line_count``), so a sync can choose between one transaction
    and several without rendering both, then rendered either way.
    """

    desired: Ruleset
    existing: Ruleset
    changes: list[_TableChange]

    @property
    def line_count(self) -> int:
        """Exactly the lines `render` would write."""
        total = 0
        for c in self.changes:
            if not c:
                continue
            want = self.desired.table(c.table)
            total += (2 + 2 * len(c.stale) + len(c.write) + len(c.obsolete_jumps)
                      + len(c.missing_jumps) + sum(len(want[name]) for name in c.write))
        return total

    def render(self) -> RestorePayload:
        """One transaction (filter and nat together)."""
        payload = RestorePayload()
        for block in self._blocks():
            payload.add_block(block)
        return payload

    def stream(self) -> RestorePayload:
        """`render`'s transaction, rendered again each time it is written, never held.

        For legacy's one transaction of a full sync: 30 MB at 10,000 services,
        which iptables-restore reads as it is rendered.
        """
        return StreamedPayload(self._blocks, self.line_count)

    def _blocks(self) -> Iterator[str]:
        for c in self.changes:
            yield from _section_blocks(c.table, self.desired.table(c.table), write=c.write,
                                       stale=c.stale, obsolete=c.obsolete_jumps,
                                       jumps=c.missing_jumps)

    def transactions(self) -> Iterator[RestorePayload]:
        """Split by ``desired.groups`` (dispatch shards), rendered one at a time.

        For nf_tables, where the cost of one transaction grows much faster than
        the chains it declares. The first transaction holds the shared chains
        (declaring, empty, any grouped chain they will reference that does not
        exist yet); then one per group, each carrying a shard's dispatch chain
        together with every chain of the services in it, so a service's chains
        and its dispatch rules still change together; the jumps from built-in
        chains and the stale chains go last, when nothing references the latter
        any more. Only the transaction being written is held (30 MB in all at
        10,000 services).

        The jumps go last because every nf_tables commit that adds a rule with a
        jump or an xt match re-validates every rule reachable from a built-in
        chain (measured at 10,000 services: ~0.25 s a commit, ~16 ms while the
        services are unreachable). On a first programming that makes each
        group's commit cheap, and every service becomes reachable at once,
        complete.
        """
        shared: list[tuple[_TableChange, list[str], list[str]]] = []
        groups: dict[int, list[tuple[Table, list[str]]]] = {}
        for c in self.changes:
            want, have = self.desired.table(c.table), self.existing.table(c.table)
            grouped: dict[int, list[str]] = {}
            ungrouped: list[str] = []
            for name in c.write:
                g = self.desired.groups.get(name)
                (ungrouped if g is None else grouped.setdefault(g, [])).append(name)
            # Only the shared chains' jump targets need to exist before their own transaction.
            targets = {_target(rule) for name in ungrouped for rule in want[name]}
            placeholders = sorted(n for names in grouped.values() for n in names
                                  if n not in have and n in targets)
            shared.append((c, ungrouped, placeholders))
            for g, names in grouped.items():
                groups.setdefault(g, []).append((c.table, names))
        base = RestorePayload()
        for c, ungrouped, placeholders in shared:
            _section(base, c.table, self.desired.table(c.table), declare=placeholders,
                     write=ungrouped)
        if base:
            yield base
        for g in sorted(groups):
            payload = RestorePayload()
            for table, names in groups[g]:
                _section(payload, table, self.desired.table(table), write=names)
            yield payload
        final = RestorePayload()
        for c, _, _ in shared:
            _section(final, c.table, self.desired.table(c.table), stale=c.stale,
                     obsolete=c.obsolete_jumps, jumps=c.missing_jumps)
        if final:
            yield final


def pending(
    desired: Ruleset,
    existing: Ruleset,
    *,
    only: Iterable[str] | None = None,
    chains: Collection[tuple[Table, str]] | None = None,
) -> Pending:
    """The changes `render` would write; see there for ``only`` and ``chains``."""
    forced = None if only is None else set(only)
    return Pending(desired, existing, [_changes(desired, existing, table, forced, chains)
                                       for table in (Table.FILTER, Table.NAT)])


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
    return pending(desired, existing, only=only, chains=chains).render()


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
                    deletes.append((chain, rule))
        removal_section(payload, table, chains, deletes)
    return payload


def removal_section(payload: RestorePayload, table: str, chains: Sequence[str],
                    jumps: Iterable[tuple[str, str]]) -> None:
    """Delete ``chains`` and the (chain, rule) ``jumps`` into them, as one table's section.

    Chains are flushed (declared) first, the jumps into them deleted, and only
    then the chains themselves; nothing is written if there is nothing to remove.
    """
    _section(payload, table, {}, stale=chains, obsolete=jumps)


def _target(rule: str) -> str | None:
    args = split_rule(rule)
    for flag in ("-j", "-g"):
        if flag in args:
            i = args.index(flag)
            if i + 1 < len(args):
                return args[i + 1]
    return None
