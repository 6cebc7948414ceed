"""Follow one packet through a Ruleset the way netfilter would.

Comparing generated rules as text tells you the planner printed what it
printed before; it does not tell you a packet to a ClusterIP reaches every
endpoint, or that a hairpinned packet gets masqueraded. This module answers
those questions directly, so planner tests can assert behaviour
(kube-proxy's ``tracePacket``/``runPacketFlowTests`` idea), and ``pyproxy
trace`` can explain to an operator what the node would do with a packet.

It is a model, not an emulator. What it deliberately simplifies:

* The packet is the first of a new connection: conntrack state is NEW (plus
  the DNAT/SNAT pseudo-states once NAT has been set up), TCP flags are SYN.
* ``-m statistic`` cannot be decided for one packet, so each such rule is a
  branch point and every outcome is explored; the result is the union.
  ``-m recent --rcheck`` (session affinity) is a branch point too when
  ``affinity=True``, and never matches otherwise.
* Interfaces (``-i``/``-o``) are unknown and assumed to match. ipset
  membership is unknown and assumed false unless the sets' members are
  given (``ipsets=``, IPVS mode). Both leave a note.
* Built-in chain policies are ACCEPT (the Ruleset does not carry policies).
* Only the hooks a proxied packet meets are walked: nat PREROUTING, filter
  INPUT or FORWARD, nat INPUT or POSTROUTING for packets from outside; nat
  OUTPUT, filter OUTPUT, nat POSTROUTING (and filter INPUT when it loops back
  to a local address) for packets the node sends.
* IPVS (``ipvs=``, the virtual servers by protocol, address and port) is
  consulted where the kernel's hooks are: after filter INPUT for packets
  from outside, after nat OUTPUT for the node's own. A virtual server picks
  each real server of non-zero weight as a branch (probability by weight),
  and the packet then leaves through filter OUTPUT and nat POSTROUTING, which
  is where IPVS mode's masquerade decision lives. A virtual server without
  real servers answers ICMP port unreachable: a REJECT.

Anything it does not understand (an unknown match module, option or target)
raises TraceError naming the rule, because a tracer that silently guesses
would let a planner bug pass a test.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pyproxy.iptables.ruleset import Ruleset, Table

__all__ = ["IPSetContents", "Packet", "Reach", "TraceError", "TraceResult", "VirtualService",
           "format_trace", "trace"]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = ("tcp", "udp", "sctp")
MAX_PATHS = 4096  # statistic/recent branch outcomes explored before giving up
MAX_DEPTH = 64  # nested jumps; deeper means a loop the kernel would have refused


class TraceError(ValueError):
    """The ruleset uses something the tracer cannot model; the message names the rule."""


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection, as the tracer sees it.

    ``sport`` is optional because a client's source port is normally
    ephemeral and unknown; ``--sport`` matches then count as not matching.
    """

    src: str
    dst: str
    dport: int
    protocol: str = "tcp"
    sport: int | None = None

    def __post_init__(self) -> None:
        src = ipaddress.ip_address(self.src)
        dst = ipaddress.ip_address(self.dst)
        if src.version != dst.version:
            raise ValueError(f"packet mixes address families: {self.src} -> {self.dst}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")
        for name, port in (("dport", self.dport), ("sport", self.sport)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} {port} out of range")


@dataclass(frozen=True)
class Reach:
    """One endpoint the packet can reach: with what probability, and whether masqueraded.

    ``probability`` is None when it depends on something other than random
    choice (an affinity record, a source-hashing scheduler).
    """

    endpoint: str
    probability: float | None
    masquerade: bool


@dataclass(frozen=True)
class IPSetContents:
    """An ipset's type and members, as ``ipset list`` prints them ("1.2.3.4,tcp:80")."""

    type: str
    members: frozenset[str]


@dataclass(frozen=True)
class VirtualService:
    """An IPVS virtual server: scheduler and real servers (address, port, weight)."""

    scheduler: str
    real_servers: tuple[tuple[str, int, int], ...]
    persistence_timeout: int = 0


VirtualServices = Mapping[tuple[str, str, int], VirtualService]  # (protocol, address, port)


@dataclass(frozen=True)
class TraceResult:
    """What happens to the packet, merged over every statistic/affinity branch.

    ``verdict`` is the common verdict of all branches, or ACCEPT if they
    disagree and at least one accepts. ``endpoints`` and ``masquerade`` only
    count accepting branches: a dropped packet reaches no endpoint.
    ``chains`` is in first-visit order over the branches, explored with
    "statistic matches" first. ``notes`` show each branch as ``path k/N``
    with its probability when only statistic rules decided it.
    """

    verdict: str
    endpoints: tuple[str, ...]
    masquerade: bool
    chains: tuple[str, ...]
    notes: tuple[str, ...]
    # Per endpoint: probability and masquerade, over the accepting branches.
    reach: tuple[Reach, ...] = ()
    # The rules (with their comments) that dropped or rejected the packet, in any branch.
    reasons: tuple[str, ...] = ()
    # Session affinity applies: a `recent --set` rule or a persistent virtual server.
    affinity: bool = False


# ---------------------------------------------------------------------------
# Rule parsing


@dataclass(frozen=True, slots=True)
class _Opt:
    name: str  # canonical long name, e.g. "--dport"; core options keep "-s" etc.
    args: tuple[str, ...]
    negated: bool


@dataclass(frozen=True, slots=True)
class _Match:
    module: str
    opts: tuple[_Opt, ...]


@dataclass(frozen=True, slots=True)
class _Rule:
    text: str
    core: tuple[_Opt, ...]
    matches: tuple[_Match, ...]
    target: str | None
    goto: bool
    target_opts: tuple[_Opt, ...]
    comment: str | None


# Option name -> (canonical name, number of arguments). A module not listed
# here is unknown and makes the rule untraceable.
_Spec = Mapping[str, tuple[str, int]]

_PORT_SPEC: _Spec = {
    "--dport": ("--dport", 1),
    "--destination-port": ("--dport", 1),
    "--sport": ("--sport", 1),
    "--source-port": ("--sport", 1),
}
_MODULES: Mapping[str, _Spec] = {
    "tcp": {**_PORT_SPEC, "--syn": ("--syn", 0), "--tcp-flags": ("--tcp-flags", 2)},
    "udp": _PORT_SPEC,
    "sctp": _PORT_SPEC,
    "multiport": {
        "--dports": ("--dports", 1),
        "--destination-ports": ("--dports", 1),
        "--sports": ("--sports", 1),
        "--source-ports": ("--sports", 1),
        "--ports": ("--ports", 1),
    },
    "addrtype": {
        "--src-type": ("--src-type", 1),
        "--dst-type": ("--dst-type", 1),
        "--limit-iface-in": ("--limit-iface-in", 0),
        "--limit-iface-out": ("--limit-iface-out", 0),
    },
    "comment": {"--comment": ("--comment", 1)},
    "mark": {"--mark": ("--mark", 1)},
    "conntrack": {"--ctstate": ("--ctstate", 1)},
    "state": {"--state": ("--ctstate", 1)},
    "statistic": {
        "--mode": ("--mode", 1),
        "--probability": ("--probability", 1),
        "--every": ("--every", 1),
        "--packet": ("--packet", 1),
    },
    "recent": {
        "--set": ("--set", 0),
        "--rcheck": ("--rcheck", 0),
        "--update": ("--update", 0),
        "--remove": ("--remove", 0),
        "--name": ("--name", 1),
        "--seconds": ("--seconds", 1),
        "--reap": ("--reap", 0),
        "--hitcount": ("--hitcount", 1),
        "--rttl": ("--rttl", 0),
        "--rsource": ("--rsource", 0),
        "--rdest": ("--rdest", 0),
        "--mask": ("--mask", 1),
    },
    "set": {"--match-set": ("--match-set", 2), "--return-nomatch": ("--return-nomatch", 0)},
}
_TARGETS: Mapping[str, _Spec] = {
    "ACCEPT": {},
    "DROP": {},
    "RETURN": {},
    "REJECT": {"--reject-with": ("--reject-with", 1)},
    "DNAT": {
        "--to-destination": ("--to-destination", 1),
        "--random": ("--random", 0),
        "--persistent": ("--persistent", 0),
    },
    "SNAT": {
        "--to-source": ("--to-source", 1),
        "--random": ("--random", 0),
        "--random-fully": ("--random-fully", 0),
        "--persistent": ("--persistent", 0),
    },
    "MASQUERADE": {
        "--to-ports": ("--to-ports", 1),
        "--random": ("--random", 0),
        "--random-fully": ("--random-fully", 0),
    },
    "MARK": {
        "--set-mark": ("--set-mark", 1),
        "--set-xmark": ("--set-xmark", 1),
        "--or-mark": ("--or-mark", 1),
        "--and-mark": ("--and-mark", 1),
        "--xor-mark": ("--xor-mark", 1),
    },
    "LOG": {
        "--log-prefix": ("--log-prefix", 1),
        "--log-level": ("--log-level", 1),
        "--log-tcp-sequence": ("--log-tcp-sequence", 0),
        "--log-tcp-options": ("--log-tcp-options", 0),
        "--log-ip-options": ("--log-ip-options", 0),
        "--log-uid": ("--log-uid", 0),
    },
}
_CORE: Mapping[str, str] = {
    "-s": "-s",
    "--source": "-s",
    "--src": "-s",
    "-d": "-d",
    "--destination": "-d",
    "--dst": "-d",
    "-p": "-p",
    "--protocol": "-p",
    "-i": "-i",
    "--in-interface": "-i",
    "-o": "-o",
    "--out-interface": "-o",
}


@functools.lru_cache(maxsize=8192)
def _parse_rule(text: str) -> _Rule:
    """Parse one rule's text; cached because every branch re-walks the same rules."""
    try:
        toks = shlex.split(text)
    except ValueError as err:
        raise TraceError(f"cannot split rule: {err}") from None
    core: list[_Opt] = []
    modules: list[tuple[str, list[_Opt]]] = []
    proto: str | None = None
    target: str | None = None
    goto = False
    target_opts: list[_Opt] = []
    negate = False
    i = 0

    def take(n: int) -> tuple[str, ...]:
        if i + 1 + n > len(toks):
            raise TraceError(f"option {toks[i]!r} is missing its argument")
        return tuple(toks[i + 1 : i + 1 + n])

    while i < len(toks):
        tok = toks[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        if tok in _CORE:
            name = _CORE[tok]
            (value,) = take(1)
            core.append(_Opt(name, (value,), negate))
            if name == "-p" and not negate:
                proto = value
            i += 2
        elif tok in ("-f", "--fragment"):
            core.append(_Opt("-f", (), negate))
            i += 1
        elif tok in ("-m", "--match"):
            (mod,) = take(1)
            if mod not in _MODULES:
                raise TraceError(f"unsupported match module -m {mod}")
            modules.append((mod, []))
            i += 2
        elif tok in ("-j", "--jump", "-g", "--goto"):
            (target,) = take(1)
            goto = tok in ("-g", "--goto")
            i += 2
        elif tok.startswith("--"):
            if target is not None:
                spec = _TARGETS.get(target, {})
                if tok not in spec:
                    raise TraceError(f"unsupported option {tok} for target {target}")
                name, nargs = spec[tok]
                target_opts.append(_Opt(name, take(nargs), negate))
            else:
                owner = _option_owner(tok, modules, proto)
                if owner is None:
                    raise TraceError(f"unsupported option {tok}")
                name, nargs = _MODULES[owner[0]][tok]
                owner[1].append(_Opt(name, take(nargs), negate))
            i += 1 + nargs
        else:
            raise TraceError(f"cannot parse {tok!r}")
        negate = False
    if negate:
        raise TraceError("dangling '!'")
    if target is not None and target.startswith("-"):
        raise TraceError(f"bad target {target!r}")
    comment = next((o.args[0] for mod, opts in modules if mod == "comment" for o in opts), None)
    return _Rule(
        text=text,
        core=tuple(core),
        matches=tuple(_Match(mod, tuple(opts)) for mod, opts in modules),
        target=target,
        goto=goto,
        target_opts=tuple(target_opts),
        comment=comment,
    )


def _option_owner(
    opt: str, modules: list[tuple[str, list[_Opt]]], proto: str | None
) -> tuple[str, list[_Opt]] | None:
    """Which loaded match an option belongs to: the latest that knows it.

    ``-p tcp`` loads the tcp match implicitly (``-p tcp --dport 80`` is legal),
    so it is tried last and added to the rule the first time it is needed.
    """
    for mod in reversed(modules):
        if opt in _MODULES[mod[0]]:
            return mod
    if proto in PROTOCOLS and opt in _MODULES[proto]:
        implicit: tuple[str, list[_Opt]] = (proto, [])
        modules.append(implicit)
        return implicit
    return None


def _port_in(spec: str, port: int) -> bool:
    """iptables port syntax: ``80``, ``80:90``, ``:90``, ``1024:``."""
    try:
        if ":" in spec:
            lo, hi = spec.split(":", 1)
            return (int(lo) if lo else 0) <= port <= (int(hi) if hi else 65535)
        return port == int(spec)
    except ValueError:
        raise TraceError(f"bad port {spec!r}") from None


def _int(value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise TraceError(f"bad number {value!r}") from None


def _mark_mask(value: str) -> tuple[int, int]:
    mark, _, mask = value.partition("/")
    return _int(mark), _int(mask) if mask else 0xFFFFFFFF


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise TraceError(f"bad address {value!r}") from None


def _split_endpoint(value: str, dport: int) -> tuple[_IPAddress, int]:
    """``--to-destination`` forms: ``ip``, ``ip:port``, ``[v6]``, ``[v6]:port``, ``v6``."""
    host, port = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    if "-" in host or "-" in port:
        raise TraceError(f"DNAT ranges are not supported: {value!r}")
    try:
        return ipaddress.ip_address(host), int(port) if port else dport
    except ValueError:
        raise TraceError(f"bad --to-destination {value!r}") from None


def _endpoint(addr: _IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


# ---------------------------------------------------------------------------
# Walking


class _Flow(enum.Enum):
    CONTINUE = "CONTINUE"  # fell off the end of a chain, or RETURN
    ACCEPT = "ACCEPT"  # this table is done with the packet for this hook
    DROP = "DROP"
    REJECT = "REJECT"


_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp"}


@dataclass(frozen=True, slots=True)
class _PathResult:
    verdict: str
    endpoint: str | None
    masquerade: bool
    chains: tuple[str, ...]
    notes: tuple[str, ...]
    choices: tuple[bool, ...]
    probability: float | None  # None when a non-statistic (affinity) branch was taken
    reason: str | None = None  # the rule that dropped or rejected the packet
    affinity: bool = False


class _Path:
    """One walk through the hooks with the branch decisions fixed up front.

    Branches are explored by replay: a walk takes the given decisions in
    order and defaults to "match" for any branch point past them. The caller
    then replays with the last defaulted decision flipped, so the decision
    tree is enumerated depth-first without copying interpreter state.
    """

    def __init__(
        self,
        ruleset: Ruleset,
        packet: Packet,
        local: frozenset[_IPAddress],
        from_local: bool,
        affinity: bool,
        choices: Sequence[bool],
        ipsets: Mapping[str, IPSetContents] | None = None,
        ipvs: VirtualServices | None = None,
    ) -> None:
        self.ruleset = ruleset
        self.ipsets = ipsets
        self.ipvs = ipvs
        self.reason: str | None = None
        self.sticky = False
        self.dnat_by_ipvs = False
        self.local = local
        self.from_local = from_local
        self.affinity = affinity
        self.preset = choices
        self.made: list[bool] = []
        self.probability: float | None = 1.0
        self.src: _IPAddress = ipaddress.ip_address(packet.src)
        self.dst: _IPAddress = ipaddress.ip_address(packet.dst)
        self.dport = packet.dport
        self.sport = packet.sport
        self.proto = packet.protocol
        self.mark = 0
        self.dnat: str | None = None
        self.snat = False
        self.masquerade = False
        self.chains: dict[str, None] = {}
        self.notes: list[str] = []
        self.remarks: list[str] = []

    # -- driver ------------------------------------------------------------

    def run(self) -> _PathResult:
        verdict = self._hooks()
        return _PathResult(
            verdict=verdict,
            endpoint=self.dnat,
            masquerade=self.masquerade,
            chains=tuple(self.chains),
            notes=tuple(self.notes),
            choices=tuple(self.made),
            probability=self.probability,
            reason=self.reason,
            affinity=self.sticky,
        )

    def _hooks(self) -> str:
        if self.from_local:
            if (verdict := self._builtin(Table.NAT, "OUTPUT")) is not None:
                return verdict
            if (verdict := self._virtual_server()) is not None:
                return verdict
            for table, chain in ((Table.FILTER, "OUTPUT"), (Table.NAT, "POSTROUTING")):
                if (verdict := self._builtin(table, chain)) is not None:
                    return verdict
            if self._is_local(self.dst):
                self.notes.append(f"route: {self.dst} is local, packet loops back to filter/INPUT")
                if (verdict := self._builtin(Table.FILTER, "INPUT")) is not None:
                    return verdict
            return "ACCEPT"
        if (verdict := self._builtin(Table.NAT, "PREROUTING")) is not None:
            return verdict
        if self._is_local(self.dst):
            self.notes.append(f"route: {self.dst} is local, deliver via INPUT")
            if (verdict := self._builtin(Table.FILTER, "INPUT")) is not None:
                return verdict
            if self.ipvs is not None and (verdict := self._virtual_server()) is not None:
                return verdict
            if self.dnat_by_ipvs:  # IPVS sends it on through LOCAL_OUT and POSTROUTING
                steps = [(Table.FILTER, "OUTPUT"), (Table.NAT, "POSTROUTING")]
            else:
                steps = [(Table.NAT, "INPUT")]
        else:
            self.notes.append(f"route: {self.dst} is not local, forward")
            steps = [(Table.FILTER, "FORWARD"), (Table.NAT, "POSTROUTING")]
        for table, chain in steps:
            if (verdict := self._builtin(table, chain)) is not None:
                return verdict
        return "ACCEPT"

    def _virtual_server(self) -> str | None:
        """IPVS: a virtual server on (protocol, destination, port) sends it to a real server."""
        if self.ipvs is None or self.dnat is not None:
            return None
        key = (self.proto, str(self.dst), self.dport)
        vs = self.ipvs.get(key)
        if vs is None:
            return None
        name = f"ipvs/{self.proto}/{_endpoint(self.dst, self.dport)}"
        self.chains.setdefault(name, None)
        if vs.persistence_timeout:
            self.sticky = True
        usable = [(a, p, w) for a, p, w in vs.real_servers if w > 0]
        if not usable:
            self.reason = (f"{name}: IPVS virtual server has no real server with weight > 0 "
                           "(ICMP port unreachable)")
            self.notes.append(self.reason)
            return "REJECT"
        remaining = sum(w for _, _, w in usable)
        chosen = usable[-1]
        for address, port, weight in usable[:-1]:
            if self._choose(weight / remaining):
                chosen = (address, port, weight)
                break
            remaining -= weight
        if vs.scheduler not in ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sed", "nq"):
            self.probability = None  # hashing schedulers: decided by the packet, not by chance
        addr, port = ipaddress.ip_address(chosen[0]), chosen[1]
        self.dst, self.dport = addr, port
        self.dnat = _endpoint(addr, port)
        self.dnat_by_ipvs = True
        persist = f", persistent {vs.persistence_timeout}s" if vs.persistence_timeout else ""
        self.notes.append(f"{name}: scheduler {vs.scheduler}{persist}, "
                          f"{len(usable)} real server(s): to {self.dnat}")
        return None

    def _builtin(self, table: Table, chain: str) -> str | None:
        """Walk one hook's built-in chain; a DROP/REJECT verdict ends the packet."""
        existing = self.ruleset.chains.get(table, {}).get(chain, ())
        jumps = tuple(
            j.rule
            for j in self.ruleset.jumps
            if j.table is table and j.chain == chain and j.rule not in existing
        )
        flow = self._chain(table, chain, jumps + tuple(existing), 0)
        if flow in (_Flow.DROP, _Flow.REJECT):
            return flow.name
        return None

    def _chain(self, table: Table, chain: str, rules: Sequence[str], depth: int) -> _Flow:
        where = f"{table}/{chain}"
        self.chains.setdefault(where, None)
        if depth > MAX_DEPTH:
            raise TraceError(f"jumps nest deeper than {MAX_DEPTH} at {where}: a chain loop?")
        for index, text in enumerate(rules, 1):
            try:
                rule = _parse_rule(text)
                self.remarks = []
                matched = self._matches(rule)
                label = f"{where}#{index}" + (f" [{rule.comment}]" if rule.comment else "")
                if not matched:
                    if self.remarks:
                        self.notes.append(f"{label}: not matched: {'; '.join(self.remarks)}")
                    continue
                remarks = self.remarks
                flow = self._target(table, rule, label, remarks, depth)
            except TraceError as err:
                if str(err).startswith("in rule "):
                    raise
                raise TraceError(f"in rule {where}#{index} ({text}): {err}") from None
            if flow is not _Flow.CONTINUE:
                return flow
            if rule.goto or rule.target == "RETURN":
                return _Flow.CONTINUE
        return _Flow.CONTINUE

    def _target(
        self, table: Table, rule: _Rule, label: str, remarks: list[str], depth: int
    ) -> _Flow:
        """Apply a matched rule's target. CONTINUE means "go on with the next rule"."""
        extra = f" ({'; '.join(remarks)})" if remarks else ""
        target = rule.target
        opts = {o.name: o.args for o in rule.target_opts}
        if target is None:
            self.notes.append(f"{label}: matched, no target{extra}")
            return _Flow.CONTINUE
        if target in ("ACCEPT", "DROP", "REJECT"):
            self.notes.append(f"{label}: {target}{extra}")
            if target != "ACCEPT":
                self.reason = label
            return _Flow(target)
        if target == "RETURN":
            self.notes.append(f"{label}: RETURN{extra}")
            return _Flow.CONTINUE
        if target == "DNAT":
            if "--to-destination" not in opts:
                raise TraceError("DNAT without --to-destination")
            addr, port = _split_endpoint(opts["--to-destination"][0], self.dport)
            self.dst, self.dport = addr, port
            self.dnat = _endpoint(addr, port)
            if any(m.module == "recent" and any(o.name == "--set" for o in m.opts)
                   for m in rule.matches):
                self.sticky = True
            self.notes.append(f"{label}: DNAT to {self.dnat}{extra}")
            return _Flow.ACCEPT
        if target == "SNAT":
            self.snat = True
            to = opts.get("--to-source", ("?",))[0]
            self.notes.append(f"{label}: SNAT to {to}{extra}")
            return _Flow.ACCEPT
        if target == "MASQUERADE":
            self.snat = self.masquerade = True
            self.notes.append(f"{label}: MASQUERADE{extra}")
            return _Flow.ACCEPT
        if target == "MARK":
            before = self.mark
            self.mark = _apply_mark(self.mark, rule)
            self.notes.append(f"{label}: MARK {before:#x} -> {self.mark:#x}{extra}")
            return _Flow.CONTINUE
        if target == "LOG":
            self.notes.append(f"{label}: LOG{extra}")
            return _Flow.CONTINUE
        rules = self.ruleset.chains.get(table, {}).get(target)
        if rules is None:
            raise TraceError(f"target {target} is neither supported nor a chain in {table}")
        if rule.target_opts:
            raise TraceError(f"options given for chain target {target}")
        verb = "goto" if rule.goto else "jump"
        self.notes.append(f"{label}: {verb} {target}{extra}")
        return self._chain(table, target, rules, depth + 1)

    # -- matching ----------------------------------------------------------

    def _matches(self, rule: _Rule) -> bool:
        """Core matches first, then extensions in order, stopping at the first miss.

        The order matters: a statistic branch only exists if the packet got
        that far, as in the kernel.
        """
        for opt in rule.core:
            if self._core(opt) == opt.negated:
                return False
        return all(self._module(match) for match in rule.matches)

    def _core(self, opt: _Opt) -> bool:
        if opt.name == "-s":
            return self.src in _network(opt.args[0])
        if opt.name == "-d":
            return self.dst in _network(opt.args[0])
        if opt.name == "-p":
            want = _PROTO_NUMBERS.get(opt.args[0], opt.args[0].lower())
            return want in ("all", "0", self.proto)
        if opt.name in ("-i", "-o"):
            self.remarks.append(f"interface {opt.name} {opt.args[0]} ignored")
            return not opt.negated
        return False  # -f: the first packet of a connection is not a fragment

    def _module(self, match: _Match) -> bool:
        mod = match.module
        if mod in PROTOCOLS and self.proto != mod:
            return False
        if mod == "statistic":
            return self._statistic(match)
        if mod == "recent":
            return self._recent(match)
        return all(self._option(mod, opt) != opt.negated for opt in match.opts)

    def _option(self, mod: str, opt: _Opt) -> bool:
        """Whether one (non-negated) option holds for the packet."""
        name, args = opt.name, opt.args
        if name == "--dport":
            return _port_in(args[0], self.dport)
        if name == "--sport":
            if self.sport is None:
                self.remarks.append("source port unknown, --sport assumed not to match")
                return False
            return _port_in(args[0], self.sport)
        if name in ("--dports", "--sports", "--ports"):
            ports = []
            if name != "--sports":
                ports.append(self.dport)
            if name != "--dports" and self.sport is not None:
                ports.append(self.sport)
            return any(_port_in(p, port) for p in args[0].split(",") for port in ports)
        if name == "--syn":
            return True
        if name == "--tcp-flags":
            examined, wanted = (set(a.split(",")) for a in args)
            if "ALL" in examined:
                examined = {"SYN", "ACK", "FIN", "RST", "URG", "PSH"}
            return {"SYN"} & examined == wanted - {"NONE"}
        if name in ("--src-type", "--dst-type"):
            addr = self.src if name == "--src-type" else self.dst
            return bool(self._addr_types(addr) & set(args[0].split(",")))
        if name in ("--limit-iface-in", "--limit-iface-out"):
            self.remarks.append(f"addrtype {name} ignored")
            return True
        if name == "--comment":
            return True
        if name == "--mark":
            value, mask = _mark_mask(args[0])
            return self.mark & mask == value
        if name == "--ctstate":
            states = {"NEW"}
            if self.dnat is not None:
                states.add("DNAT")
            if self.snat:
                states.add("SNAT")
            if mod == "state":
                states &= {"NEW"}
            return bool(states & set(args[0].split(",")))
        if name == "--match-set":
            if self.ipsets is None:
                self.remarks.append(f"ipset {args[0]} membership unknown, assumed not a member")
                return False
            return self._in_set(args[0], args[1])
        if name == "--return-nomatch":
            return True
        raise TraceError(f"cannot evaluate -m {mod} {name}")

    def _in_set(self, name: str, flags: str) -> bool:
        """ipset membership of the packet's fields named by ``flags`` (src/dst per dimension)."""
        assert self.ipsets is not None
        contents = self.ipsets.get(name)
        if contents is None:
            self.remarks.append(f"ipset {name} does not exist")
            return False
        dims = flags.split(",")
        addr = {"src": self.src, "dst": self.dst}
        port = {"src": self.sport, "dst": self.dport}
        try:
            kind, _, shape = contents.type.partition(":")
            fields = shape.split(",")
            if len(dims) < len(fields):
                raise TraceError(f"ipset {name} ({contents.type}) needs {len(fields)} flags")
            key: list[str] = []
            net: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
            for field_name, dim in zip(fields, dims, strict=False):
                if field_name == "ip":
                    key.append(str(addr[dim]))
                elif field_name == "port":
                    value = port[dim]
                    if value is None:
                        self.remarks.append(f"ipset {name}: source port unknown, not a member")
                        return False
                    key.append(f"{self.proto}:{value}" if kind == "hash" else str(value))
                elif field_name == "net":
                    net = ipaddress.ip_network(addr[dim])
                else:
                    raise TraceError(f"unsupported ipset type {contents.type}")
        except KeyError:
            raise TraceError(f"bad ipset flags {flags!r}") from None
        if net is None:
            return ",".join(key) in contents.members
        prefix = ",".join(key) + ","
        for member in contents.members:
            if member.startswith(prefix):
                cidr = _network(member[len(prefix):])
                if net.network_address in cidr:
                    return True
        return False

    def _addr_types(self, addr: _IPAddress) -> set[str]:
        if self._is_local(addr):
            return {"LOCAL"}
        if addr.is_multicast:
            return {"MULTICAST"}
        if addr == ipaddress.IPv4Address("255.255.255.255"):
            return {"BROADCAST"}
        return {"UNICAST"}

    def _is_local(self, addr: _IPAddress) -> bool:
        return addr.is_loopback or addr in self.local

    def _statistic(self, match: _Match) -> bool:
        opts = {o.name: o for o in match.opts}
        mode = opts["--mode"].args[0] if "--mode" in opts else "random"
        if mode == "random":
            opt = opts.get("--probability")
            if opt is None:
                raise TraceError("statistic --mode random without --probability")
            try:
                p = float(opt.args[0])
            except ValueError:
                raise TraceError(f"bad probability {opt.args[0]!r}") from None
            negated = opt.negated
        elif mode == "nth":
            every = _int(opts["--every"].args[0]) if "--every" in opts else 0
            if every <= 0:
                raise TraceError("statistic --mode nth needs --every N")
            p = 1.0 / every
            negated = opts["--every"].negated
        else:
            raise TraceError(f"unsupported statistic mode {mode!r}")
        if p <= 0.0 or p >= 1.0:
            hit = p >= 1.0
        else:
            hit = self._choose(p)
            state = "taken" if hit else "not taken"
            self.remarks.append(f"statistic {mode} p={p:.5g}: branch {state}")
        return hit != negated

    def _recent(self, match: _Match) -> bool:
        opts = {o.name: o for o in match.opts}
        name = opts["--name"].args[0] if "--name" in opts else "DEFAULT"
        if "--set" in opts:
            return not opts["--set"].negated
        command = next((c for c in ("--rcheck", "--update", "--remove") if c in opts), None)
        if command is None:
            raise TraceError("recent match without --set/--rcheck/--update/--remove")
        if self.affinity:
            hit = self._choose(None)
            if hit:
                self.remarks.append(f"recent {command} {name}: branch with an affinity record")
            else:
                self.remarks.append(f"recent {command} {name}: branch without an affinity record")
        else:
            hit = False
            self.remarks.append(f"recent {command} {name}: no affinity record (affinity=False)")
        return hit != opts[command].negated

    def _choose(self, p: float | None) -> bool:
        """Take the next branch decision: replayed if preset, else "match"."""
        pos = len(self.made)
        hit = self.preset[pos] if pos < len(self.preset) else True
        self.made.append(hit)
        if p is None:
            self.probability = None
        elif self.probability is not None:
            self.probability *= p if hit else 1.0 - p
        return hit


def _apply_mark(mark: int, rule: _Rule) -> int:
    """The MARK target's arithmetic (xt_MARK): everything reduces to xor-with-mask."""
    if not rule.target_opts:
        raise TraceError("MARK without an operation")
    for opt in rule.target_opts:
        value, mask = _mark_mask(opt.args[0])
        if opt.name == "--set-xmark":
            mark = (mark & ~mask) ^ value
        elif opt.name == "--set-mark":
            mark = (mark & ~mask) | value
        elif opt.name == "--or-mark":
            mark |= value
        elif opt.name == "--and-mark":
            mark &= value
        else:  # --xor-mark
            mark ^= value
    return mark & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Public API


def trace(
    ruleset: Ruleset,
    packet: Packet,
    *,
    local_addresses: Iterable[str],
    from_local: bool = False,
    affinity: bool = False,
    ipsets: Mapping[str, IPSetContents] | None = None,
    ipvs: VirtualServices | None = None,
) -> TraceResult:
    """Follow ``packet`` through ``ruleset`` and merge the outcomes of every branch.

    ``local_addresses`` are the node's own addresses (loopback is always
    local); they decide ``-m addrtype ... LOCAL`` and whether the packet is
    delivered (INPUT) or forwarded (FORWARD). ``from_local`` starts the packet
    in the node's OUTPUT path instead of PREROUTING. ``affinity`` lets
    ``-m recent --rcheck`` match (as a branch), as if the client had an
    affinity record. ``ipsets`` gives the sets' members (IPVS mode), so
    ``-m set`` matches are decided instead of assumed false; ``ipvs`` gives
    the IPVS virtual servers, consulted as the kernel does (see the module
    docstring).
    """
    local = frozenset(ipaddress.ip_address(a) for a in local_addresses)
    paths: list[_PathResult] = []
    pending: list[tuple[bool, ...]] = [()]
    while pending:
        prefix = pending.pop()
        result = _Path(ruleset, packet, local, from_local, affinity, prefix,
                       ipsets, ipvs).run()
        paths.append(result)
        if len(paths) + len(pending) > MAX_PATHS:
            raise TraceError(f"more than {MAX_PATHS} branch outcomes; ruleset too branchy")
        # Every decision defaulted to "match" past the prefix has an unexplored
        # "no match" sibling; push shallow first so the deepest is explored next.
        for i in range(len(prefix), len(result.choices)):
            pending.append(result.choices[:i] + (False,))
    return _merge(paths)


def _merge(paths: list[_PathResult]) -> TraceResult:
    notes: list[str] = []
    chains: dict[str, None] = {}
    for path in paths:
        chains.update(dict.fromkeys(path.chains))
    verdicts = [p.verdict for p in paths]
    accepting = [p for p in paths if p.verdict == "ACCEPT"]
    if len(set(verdicts)) == 1:
        verdict = verdicts[0]
    else:
        verdict = "ACCEPT" if accepting else verdicts[0]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
        notes.append(f"branches disagree ({counts}); verdict {verdict}")
    endpoints = tuple(sorted({p.endpoint for p in accepting if p.endpoint is not None}))
    reach: list[Reach] = []
    for endpoint in endpoints:
        mine = [p for p in accepting if p.endpoint == endpoint]
        probs = [p.probability for p in mine]
        total = None if None in probs else sum(p for p in probs if p is not None)
        reach.append(Reach(endpoint, total, any(p.masquerade for p in mine)))
    reasons = tuple(dict.fromkeys(p.reason for p in paths
                                  if p.verdict != "ACCEPT" and p.reason is not None))
    masq = {p.masquerade for p in accepting}
    if len(masq) > 1:
        notes.append("only some accepting branches are masqueraded")
    if len(paths) == 1:
        notes[:0] = paths[0].notes
    else:
        body: list[str] = []
        for k, path in enumerate(paths, 1):
            prob = f" p={path.probability:.3g}" if path.probability is not None else ""
            outcome = path.verdict
            if path.endpoint is not None:
                outcome += f" -> {path.endpoint}"
            if path.masquerade:
                outcome += ", masquerade"
            body.append(f"path {k}/{len(paths)}{prob}: {outcome}")
            body.extend(f"  {note}" for note in path.notes)
        notes[:0] = body
    return TraceResult(
        verdict=verdict,
        endpoints=endpoints,
        masquerade=True in masq,
        chains=tuple(chains),
        notes=tuple(notes),
        reach=tuple(reach),
        reasons=reasons,
        affinity=any(p.affinity for p in accepting),
    )


def format_trace(result: TraceResult) -> str:
    """A multi-line rendering for ``pyproxy trace``: summary first, then the walk."""
    lines = [
        f"verdict:    {result.verdict}",
        f"endpoints:  {', '.join(result.endpoints) if result.endpoints else '(not DNATed)'}",
        f"masquerade: {'yes' if result.masquerade else 'no'}",
    ]
    if result.reach:
        lines.append("reach:")
        for r in result.reach:
            prob = f"p={r.probability:.3f}" if r.probability is not None else "p=?"
            lines.append(f"  {r.endpoint:<24} {prob}  {'masquerade' if r.masquerade else ''}"
                         .rstrip())
    if result.affinity:
        lines.append("affinity:   yes (a client sticks to the endpoint it first reached)")
    if result.reasons:
        verb = "rejected" if result.verdict == "REJECT" else "dropped"
        lines.append(f"{verb} by:" if result.verdict != "ACCEPT" else "some branches end at:")
        lines.extend(f"  {reason}" for reason in result.reasons)
    lines += [
        "chains:",
        *(f"  {chain}" for chain in result.chains),
        "notes:",
        *(f"  {note}" for note in result.notes),
    ]
    return "\n".join(lines) + "\n"
