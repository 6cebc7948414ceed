"""Services and endpoints in, the iptables ruleset kube-proxy's iptables mode would hold out.

Pure: no I/O, no clock. The layout mirrors upstream's proxier so that an
operator who knows KUBE-SERVICES / KUBE-SVC-* / KUBE-SEP-* can read ours:

nat
  PYPROXY-SERVICES     (from PREROUTING, OUTPUT) dispatch on service addresses,
                       last rule jumps to PYPROXY-NODEPORTS for local addresses
  PYPROXY-NODEPORTS    dispatch on node ports
  PYPROXY-SVC-<hash>   cluster-policy endpoints, spread with `statistic`
  PYPROXY-SVL-<hash>   local-policy endpoints (eTP/iTP Local)
  PYPROXY-EXT-<hash>   external traffic: masquerade or short-circuit, then policy
  PYPROXY-FW-<hash>    loadBalancerSourceRanges
  PYPROXY-SEP-<hash>   one endpoint: hairpin masquerade, affinity, DNAT
  PYPROXY-MARK-MASQ    sets the masquerade mark
  PYPROXY-POSTROUTING  (from POSTROUTING) masquerades marked packets
filter
  PYPROXY-SERVICES           (OUTPUT, FORWARD; NEW) REJECT cluster IPs with no endpoints
  PYPROXY-EXTERNAL-SERVICES  (INPUT, FORWARD; NEW) REJECT/DROP external addresses
  PYPROXY-NODEPORTS          (INPUT) accept health-check node ports
  PYPROXY-FORWARD            (FORWARD) accept marked and established service traffic
  PYPROXY-FIREWALL           (INPUT, OUTPUT, FORWARD; NEW) drop what FW chains refused

Each service port's rules are computed on their own (`service_rules`), so a
partial sync can reuse the unchanged ones and a Planner can cache them.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pyproxy.iptables.ruleset import Jump, Ruleset, Table, quote
from pyproxy.model import (
    Endpoint,
    IPAddress,
    IPFamily,
    IPNetwork,
    NodeInfo,
    ServicePort,
    ServicePortName,
)

SERVICES = "PYPROXY-SERVICES"
EXTERNAL_SERVICES = "PYPROXY-EXTERNAL-SERVICES"
NODEPORTS = "PYPROXY-NODEPORTS"
FORWARD = "PYPROXY-FORWARD"
FIREWALL = "PYPROXY-FIREWALL"
POSTROUTING = "PYPROXY-POSTROUTING"
MARK_MASQ = "PYPROXY-MARK-MASQ"
# An empty chain in each table, as kube-proxy's KUBE-PROXY-CANARY: if it is gone, someone
# flushed the tables (a firewalld reload, say) and a full sync must put everything back.
CANARY = "PYPROXY-CANARY"

NAT_BASE_CHAINS = (SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ)
FILTER_BASE_CHAINS = (SERVICES, EXTERNAL_SERVICES, NODEPORTS, FORWARD, FIREWALL)

_NEW = "-m conntrack --ctstate NEW"

# (table, built-in chain, match, comment, target): kube-proxy's iptablesJumpChains.
JUMPS: tuple[tuple[Table, str, str, str, str], ...] = (
    (Table.FILTER, "INPUT", _NEW, "pyproxy load balancer firewall", FIREWALL),
    (Table.FILTER, "INPUT", "", "pyproxy health check service ports", NODEPORTS),
    (Table.FILTER, "INPUT", _NEW, "pyproxy externally-visible service portals",
     EXTERNAL_SERVICES),
    (Table.FILTER, "FORWARD", _NEW, "pyproxy load balancer firewall", FIREWALL),
    (Table.FILTER, "FORWARD", "", "pyproxy forwarding rules", FORWARD),
    (Table.FILTER, "FORWARD", _NEW, "pyproxy service portals", SERVICES),
    (Table.FILTER, "FORWARD", _NEW, "pyproxy externally-visible service portals",
     EXTERNAL_SERVICES),
    (Table.FILTER, "OUTPUT", _NEW, "pyproxy load balancer firewall", FIREWALL),
    (Table.FILTER, "OUTPUT", _NEW, "pyproxy service portals", SERVICES),
    (Table.NAT, "PREROUTING", "", "pyproxy service portals", SERVICES),
    (Table.NAT, "OUTPUT", "", "pyproxy service portals", SERVICES),
    (Table.NAT, "POSTROUTING", "", "pyproxy postrouting rules", POSTROUTING),
)


@dataclass(frozen=True, slots=True)
class PlanContext:
    """Everything besides services and endpoints that decides the rules."""

    node: NodeInfo
    family: IPFamily = IPFamily.IPv4
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    # NodePorts on 127.0.0.1 too (kube-proxy's iptables.localhostNodePorts, IPv4 only;
    # needs route_localnet, which the applier sets).
    localhost_node_ports: bool = True
    # nodePortAddresses: empty means every local address.
    node_port_cidrs: tuple[IPNetwork, ...] = ()

    @property
    def mark(self) -> str:
        return hex(1 << self.masquerade_bit)

    @property
    def reject(self) -> str:
        """REJECT as iptables-save prints it (it always names the ICMP type)."""
        icmp = "icmp" if self.family is IPFamily.IPv4 else "icmp6"
        return f"REJECT --reject-with {icmp}-port-unreachable"

    @property
    def local_cidrs(self) -> tuple[IPNetwork, ...]:
        return tuple(c for c in self.cluster_cidrs if c.version == _version(self.family))

    @property
    def node_ips(self) -> tuple[IPAddress, ...]:
        return tuple(a for a in self.node.addresses if a.version == _version(self.family))


def _version(family: IPFamily) -> int:
    return 4 if family is IPFamily.IPv4 else 6


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)  # 10 bits -> 2 characters


def _hash(*parts: str) -> str:
    """The first 16 characters of base32(sha256(...)), as kube-proxy's portProtoHash.

    base32 turns 5 bytes into 8 characters, so 16 need only the first 10 bytes;
    looking up 10 bits at a time is ~5x faster than Python 3.11's b32encode.
    """
    n = int.from_bytes(hashlib.sha256("".join(parts).encode()).digest()[:10], "big")
    return "".join(_B32_PAIRS[(n >> shift) & 1023] for shift in (70, 60, 50, 40, 30, 20, 10, 0))


@functools.lru_cache(maxsize=1 << 13)  # the SEP name is asked for twice in a row
def chain_name(kind: str, name: ServicePortName, endpoint: str = "") -> str:
    """Stable chain name: kube-proxy's hash of the port's identity (and endpoint).

    "PYPROXY-" + 3-letter kind + "-" + 16 hash characters is exactly 28, the
    kernel's limit; FW is shorter.
    """
    return f"PYPROXY-{kind}-{_hash(str(name), name.protocol.lower(), endpoint)}"




@functools.lru_cache(maxsize=1 << 12)
def _cidr(addr: IPAddress | IPNetwork) -> str:
    """Addresses and networks as iptables-save prints them (always with a prefix length)."""
    if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return f"{addr}/{addr.max_prefixlen}"
    return str(addr)


def probability(n: int) -> str:
    """1/n as iptables-save prints it (the kernel keeps it as a 31-bit fraction)."""
    fixed = round(0x80000000 / n)
    return f"{fixed / 0x80000000:.11f}"


def _match(proto: str, dst: IPAddress | None, dport: int, comment: str) -> str:
    dest = f"-d {_cidr(dst)} " if dst is not None else ""
    return f"{dest}-p {proto} -m comment --comment {quote(comment)} -m {proto} --dport {dport}"


@dataclass(frozen=True, slots=True)
class EndpointSets:
    """kube-proxy's CategorizeEndpoints: which endpoints each traffic policy uses."""

    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    reachable: tuple[Endpoint, ...]
    has_any: bool


def categorize(
    endpoints: Sequence[Endpoint], svc: ServicePort, node: NodeInfo
) -> EndpointSets:
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    has_any = False
    if svc.uses_cluster_endpoints:
        allowed = _topology_filter(endpoints, svc, node)
        cluster = tuple(e for e in endpoints if e.ready and allowed(e))
        if not cluster:
            cluster = tuple(e for e in endpoints if e.serving and e.terminating)
        has_any = bool(cluster)
    if not svc.uses_local_endpoints:
        return EndpointSets(cluster, (), cluster, has_any)
    local_ready = any(e.ready and e.is_local for e in endpoints)
    local_terminating = any(
        e.serving and e.terminating and e.is_local and not e.ready for e in endpoints
    )
    has_any = has_any or any(e.ready or (e.serving and e.terminating) for e in endpoints)
    if local_ready:
        local = tuple(e for e in endpoints if e.is_local and e.ready)
    elif local_terminating:
        local = tuple(e for e in endpoints if e.is_local and e.serving and e.terminating)
    if not svc.uses_cluster_endpoints:
        return EndpointSets((), local, local, has_any)
    seen = {e.address for e in cluster}
    reachable = cluster + tuple(e for e in local if e.address not in seen)
    return EndpointSets(cluster, local, reachable, has_any)


def _topology_filter(
    endpoints: Sequence[Endpoint], svc: ServicePort, node: NodeInfo
) -> Callable[[Endpoint], bool]:
    """Upstream's topologyModeFromHints: hints decide, whatever the Service says.

    Node hints (PreferSameNode) apply when every ready endpoint has some and one
    names this node; zone hints when every ready endpoint has some and one names
    this node's zone. Otherwise all endpoints are used.
    """
    ready = [e for e in endpoints if e.ready]
    if not ready:
        return _allow_all
    if all(e.node_hints for e in ready) and any(
        node.name in (e.node_hints or ()) for e in ready
    ):
        return lambda e: node.name in (e.node_hints or ())
    if node.zone and all(e.zone_hints for e in ready) and any(
        node.zone in (e.zone_hints or ()) for e in ready
    ):
        return lambda e: node.zone in (e.zone_hints or ())
    return _allow_all


def _allow_all(_: Endpoint) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """One service port's contribution: its own chains plus rules in shared chains."""

    name: ServicePortName
    nat_chains: tuple[tuple[str, tuple[str, ...]], ...] = ()
    dispatch: tuple[tuple[Table, str, str], ...] = ()  # (table, shared chain, rule)
    no_local_endpoints: bool = False  # eTP/iTP Local with no local endpoint: for metrics


def service_rules(  # noqa: C901 - one flat walk, in upstream's order, reads best
    svc: ServicePort, endpoints: Sequence[Endpoint], ctx: PlanContext
) -> ServiceRules:
    name = str(svc.name)
    proto = svc.protocol.lower()
    sets = categorize(endpoints, svc, ctx.node)
    svc_chain = chain_name("SVC", svc.name)
    svl_chain = chain_name("SVL", svc.name)
    ext_chain = chain_name("EXT", svc.name)
    fw_chain = chain_name("FW", svc.name)

    uses_cluster_chain = bool(sets.cluster) and svc.uses_cluster_endpoints
    uses_local_chain = bool(sets.local) and svc.uses_local_endpoints
    has_endpoints = sets.has_any

    internal_chain = svc_chain
    has_internal = has_endpoints
    if svc.internal_policy_local:
        internal_chain = svl_chain
        has_internal = bool(sets.local)
    external_policy_chain = svc_chain
    has_external = has_endpoints
    if svc.external_policy_local:
        external_policy_chain = svl_chain
        has_external = bool(sets.local)
    uses_ext_chain = has_endpoints and svc.externally_accessible
    uses_fw_chain = (
        has_endpoints and bool(svc.load_balancer_ips) and bool(svc.load_balancer_source_ranges)
    )
    lb_chain = fw_chain if uses_fw_chain else ext_chain

    if not has_endpoints:
        int_target = ext_target = ctx.reject
        int_comment = ext_comment = f"{name} has no endpoints"
    else:
        int_target = ext_target = ""
        int_comment = ext_comment = ""
        if not has_internal:
            int_target, int_comment = "DROP", f"{name} has no local endpoints"
        if not has_external:
            ext_target, ext_comment = "DROP", f"{name} has no local endpoints"

    dispatch: list[tuple[Table, str, str]] = []
    nat = Table.NAT
    flt = Table.FILTER

    # Cluster IP.
    if has_internal:
        dispatch.append((nat, SERVICES, _match(proto, svc.cluster_ip, svc.port,
                                               f"{name} cluster IP") + f" -j {internal_chain}"))
    else:
        dispatch.append((flt, SERVICES, _match(proto, svc.cluster_ip, svc.port, int_comment)
                         + f" -j {int_target}"))
    # External IPs.
    for ip in svc.external_ips:
        if has_endpoints:
            dispatch.append((nat, SERVICES, _match(proto, ip, svc.port, f"{name} external IP")
                             + f" -j {ext_chain}"))
        if not has_external:
            dispatch.append((flt, EXTERNAL_SERVICES, _match(proto, ip, svc.port, ext_comment)
                             + f" -j {ext_target}"))
    # LoadBalancer ingress IPs.
    for ip in svc.load_balancer_ips:
        if has_endpoints:
            dispatch.append((nat, SERVICES, _match(proto, ip, svc.port, f"{name} loadbalancer IP")
                             + f" -j {lb_chain}"))
        if uses_fw_chain:
            dispatch.append((flt, FIREWALL, _match(
                proto, ip, svc.port, f"{name} traffic not accepted by {fw_chain}") + " -j DROP"))
    if not has_external:
        for ip in svc.load_balancer_ips:
            dispatch.append((flt, EXTERNAL_SERVICES, _match(proto, ip, svc.port, ext_comment)
                             + f" -j {ext_target}"))
    # Node ports.
    if svc.node_port:
        if has_endpoints:
            dispatch.append((nat, NODEPORTS, _match(proto, None, svc.node_port, name)
                             + f" -j {ext_chain}"))
        if not has_external:
            dispatch.append((flt, EXTERNAL_SERVICES,
                             f"-p {proto} -m comment --comment {quote(ext_comment)} "
                             f"-m addrtype --dst-type LOCAL -m {proto} --dport {svc.node_port}"
                             f" -j {ext_target}"))
    if svc.health_check_node_port:
        dispatch.append((flt, NODEPORTS, _match(
            "tcp", None, svc.health_check_node_port, f"{name} health check node port")
            + " -j ACCEPT"))

    chains: dict[str, list[str]] = {}
    # Internal traffic: masquerade what comes from off the cluster.
    if has_internal:
        rules = chains.setdefault(internal_chain, [])
        match = _match(proto, svc.cluster_ip, svc.port, f"{name} cluster IP")
        if ctx.masquerade_all:
            rules.append(f"{match} -j {MARK_MASQ}")
        elif ctx.local_cidrs:
            for cidr in ctx.local_cidrs:  # one rule per CIDR, as `! -s` cannot take a list
                rules.append(_negated_source(match, cidr) + f" -j {MARK_MASQ}")

    if uses_ext_chain:
        rules = chains.setdefault(ext_chain, [])
        if not svc.external_policy_local:
            rules.append(f'-m comment --comment "masquerade traffic for {name} external '
                         f'destinations" -j {MARK_MASQ}')
        else:
            for cidr in ctx.local_cidrs:
                rules.append(f"-s {_cidr(cidr)} -m comment --comment "
                             f'"pod traffic for {name} external destinations" -j {svc_chain}')
            rules.append(f'-m comment --comment "masquerade LOCAL traffic for {name} external '
                         f'destinations" -m addrtype --src-type LOCAL -j {MARK_MASQ}')
            rules.append(f'-m comment --comment "route LOCAL traffic for {name} external '
                         f'destinations" -m addrtype --src-type LOCAL -j {svc_chain}')
        if has_external:
            rules.append(f"-j {external_policy_chain}")

    if uses_fw_chain:
        rules = chains.setdefault(fw_chain, [])
        comment = f"-m comment --comment {quote(f'{name} loadbalancer IP')}"
        allow_from_node = False
        for cidr in svc.load_balancer_source_ranges:
            rules.append(f"-s {_cidr(cidr)} {comment} -j {ext_chain}")
            if any(ip in cidr for ip in ctx.node_ips):
                allow_from_node = True
        if allow_from_node:
            for ip in svc.load_balancer_ips:
                rules.append(f"-s {_cidr(ip)} {comment} -j {ext_chain}")
        rules.append(f'-m comment --comment "other traffic to {name} will be dropped by '
                     f'{FIREWALL}"')

    if uses_cluster_chain:
        chains.setdefault(svc_chain, []).extend(_to_endpoints(svc, sets.cluster))
    if uses_local_chain:
        chains.setdefault(svl_chain, []).extend(_to_endpoints(svc, sets.local))

    for ep in sets.reachable:
        sep = chain_name("SEP", svc.name, ep.address)
        src = f"{ep.ip}/{ep.ip.max_prefixlen}"
        rules = chains.setdefault(sep, [])
        rules.append(f"-s {src} -m comment --comment {quote(name)} -j {MARK_MASQ}")
        recent = (f" -m recent --set --name {sep} --mask {_full_mask(ep.ip)} --rsource"
                  if svc.affinity_timeout else "")
        rules.append(f"-p {proto} -m comment --comment {quote(name)}{recent} -m {proto}"
                     f" -j DNAT --to-destination {ep.address}")

    no_local = (svc.internal_policy_local or svc.external_policy_local) and not sets.local
    return ServiceRules(
        name=svc.name,
        nat_chains=tuple((c, tuple(r)) for c, r in chains.items()),
        dispatch=tuple(dispatch),
        no_local_endpoints=no_local and has_endpoints,
    )


def _full_mask(ip: IPAddress) -> str:
    return "255.255.255.255" if ip.version == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def _negated_source(match: str, cidr: IPNetwork) -> str:
    # iptables-save prints the source before the destination.
    return f"! -s {_cidr(cidr)} {match}"


def _to_endpoints(svc: ServicePort, endpoints: Sequence[Endpoint]) -> list[str]:
    """Affinity checks first, then an even random spread (1/n, 1/(n-1), ..., 1)."""
    name = str(svc.name)
    rules: list[str] = []
    seps = [(ep, chain_name("SEP", svc.name, ep.address)) for ep in endpoints]
    if svc.affinity_timeout:
        for ep, sep in seps:
            rules.append(
                f"-m comment --comment {quote(f'{name} -> {ep.address}')} -m recent --rcheck"
                f" --seconds {svc.affinity_timeout} --reap --name {sep}"
                f" --mask {_full_mask(ep.ip)} --rsource -j {sep}"
            )
    n = len(seps)
    for i, (ep, sep) in enumerate(seps):
        comment = f"-m comment --comment {quote(f'{name} -> {ep.address}')}"
        if i < n - 1:
            rules.append(f"{comment} -m statistic --mode random --probability "
                         f"{probability(n - i)} -j {sep}")
        else:
            rules.append(f"{comment} -j {sep}")
    return rules


SHARDS = 16  # dispatch chains per table; a full sync on nf_tables writes one shard at a time


def shard_of(name: ServicePortName) -> int:
    """Which dispatch shard a service port's rules live in: stable, like chain names."""
    digest = hashlib.sha256(f"{name}{name.protocol.lower()}".encode()).digest()
    return digest[0] % SHARDS


def shard_chain(base: str, shard: int) -> str:
    return f"{base}-{shard:02X}"


_SHARDED = {(Table.NAT, SERVICES), (Table.NAT, NODEPORTS)}
ChainKey = tuple[Table, str]


@dataclass(frozen=True)
class Plan:
    ruleset: Ruleset  # the planner's live state: valid until its next plan(); copy() to keep
    chains_by_service: Mapping[ServicePortName, tuple[str, ...]]
    no_local_endpoints: int
    # The chains this plan may have changed since the previous one, or None for "any"
    # (the first plan, or a full re-plan): a partial sync compares only these.
    touched: frozenset[ChainKey] | None = None


@dataclass
class Planner:
    """Keeps the desired ruleset up to date, re-planning only the service ports that changed.

    Each service port's rules are a pure function of (port, endpoints, context),
    cached with their inputs; dispatch chains are rebuilt only for the shards a
    change lands in. That keeps the Python work for one changed service small
    at 10,000 services, while `plan()` with no change set re-checks everything.
    """

    ctx: PlanContext
    _cache: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...], ServiceRules]] = (
        field(default_factory=dict))
    _shared: dict[ChainKey, dict[ServicePortName, tuple[str, ...]]] = field(default_factory=dict)
    _nat: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _filter: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _groups: dict[str, int] = field(default_factory=dict)
    _chains_by_service: dict[ServicePortName, tuple[str, ...]] = field(default_factory=dict)
    _no_local: int = 0
    _started: bool = False

    def plan(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
        changed: Iterable[ServicePortName] | None = None,
    ) -> Plan:
        full = changed is None or not self._started
        check = set(services) | set(self._cache) if full else set(changed or ())
        touched: set[ChainKey] = set()
        shared_touched: set[ChainKey] = set()
        if not self._started:
            self._static(touched)
            self._started = True
        for spn in sorted(check):
            self._update(spn, services.get(spn), endpoints, touched, shared_touched)
        for key in shared_touched:
            self._rebuild_shared(key, touched)
        self._top_level(touched)
        # The planner's own maps, not copies: copying 60,000 chains would cost more than
        # planning one changed service. The ruleset is valid until the next plan().
        rs = Ruleset(chains={Table.FILTER: self._filter, Table.NAT: self._nat},
                     jumps=jump_rules(), groups=self._groups)
        return Plan(
            ruleset=rs,
            chains_by_service=dict(self._chains_by_service),
            no_local_endpoints=self._no_local,
            touched=None if full else frozenset(touched),
        )

    # -- one service port ------------------------------------------------------------

    def _update(self, spn: ServicePortName, svc: ServicePort | None,
                endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
                touched: set[ChainKey], shared_touched: set[ChainKey]) -> None:
        old = self._cache.get(spn)
        if svc is None:
            if old is None:
                return
            new_rules = ServiceRules(spn)
            del self._cache[spn]
        else:
            eps = tuple(endpoints.get(spn, ()))
            if old is not None and old[0] == svc and old[1] == eps:
                return
            new_rules = service_rules(svc, eps, self.ctx)
            self._cache[spn] = (svc, eps, new_rules)
        old_rules = old[2] if old is not None else ServiceRules(spn)
        shard = shard_of(spn)
        new_chains = dict(new_rules.nat_chains)
        if svc is None:
            self._chains_by_service.pop(spn, None)
        else:
            self._chains_by_service[spn] = tuple(new_chains)
        for chain, _ in old_rules.nat_chains:
            if chain not in new_chains:
                self._nat.pop(chain, None)
                self._groups.pop(chain, None)
                touched.add((Table.NAT, chain))
        for chain, rules in new_chains.items():
            if self._nat.get(chain) != rules:
                self._nat[chain] = rules
                touched.add((Table.NAT, chain))
            self._groups[chain] = shard
        old_parts = _contributions(old_rules, shard)
        new_parts = _contributions(new_rules, shard)
        for key in old_parts.keys() | new_parts.keys():
            if old_parts.get(key) != new_parts.get(key):
                bucket = self._shared.setdefault(key, {})
                if key in new_parts:
                    bucket[spn] = new_parts[key]
                else:
                    bucket.pop(spn, None)
                shared_touched.add(key)
        self._no_local += new_rules.no_local_endpoints - old_rules.no_local_endpoints

    def _rebuild_shared(self, key: ChainKey, touched: set[ChainKey]) -> None:
        table, chain = key
        bucket = self._shared.get(key, {})
        rules = tuple(r for spn in sorted(bucket) for r in bucket[spn])
        target = self._nat if table is Table.NAT else self._filter
        head, tail = self._fixed.get(key, ((), ()))
        rules = head + rules + tail
        if chain.startswith((SERVICES + "-", NODEPORTS + "-")) and not rules:
            if target.pop(chain, None) is not None:
                touched.add(key)
            self._groups.pop(chain, None)
            return
        if target.get(chain) != rules:
            target[chain] = rules
            touched.add(key)
        if chain.startswith((SERVICES + "-", NODEPORTS + "-")):
            self._groups[chain] = int(chain[-2:], 16)

    # -- chains that do not belong to one service ------------------------------------------

    @property
    def _fixed(self) -> dict[ChainKey, tuple[tuple[str, ...], tuple[str, ...]]]:
        """Rules around the per-service contributions of the shared filter chains."""
        ctx = self.ctx
        cidrs = [c for c in ctx.node_port_cidrs if c.version == _version(ctx.family)]
        head: tuple[str, ...] = ()
        if ctx.family is IPFamily.IPv4 and ctx.localhost_node_ports and not cidrs:
            # route_localnet lets DNATed 127.0.0.1 traffic leave the node; this keeps
            # anyone else from sending 127.0.0.0/8 traffic in (kube-proxy's same rule).
            head = ('! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming '
                    'localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT '
                    "-j DROP",)
        return {(Table.FILTER, FIREWALL): (head, ())}

    def _static(self, touched: set[ChainKey]) -> None:
        mark = self.ctx.mark
        self._nat[MARK_MASQ] = (f"-j MARK --set-xmark {mark}/{mark}",)
        self._nat[POSTROUTING] = (
            f"-m mark ! --mark {mark}/{mark} -j RETURN",
            f"-j MARK --set-xmark {mark}/0x0",
            '-m comment --comment "pyproxy service traffic requiring SNAT" -j MASQUERADE '
            "--random-fully",
        )
        self._filter[FORWARD] = (
            "-m conntrack --ctstate INVALID -j DROP",
            f'-m comment --comment "pyproxy forwarding rules" -m mark --mark {mark}/{mark} '
            "-j ACCEPT",
            '-m comment --comment "pyproxy forwarding conntrack rule" -m conntrack --ctstate '
            "RELATED,ESTABLISHED -j ACCEPT",
        )
        for chain in FILTER_BASE_CHAINS:
            self._filter.setdefault(chain, ())
        self._filter[CANARY] = self._nat[CANARY] = ()
        touched.update({(Table.FILTER, CANARY), (Table.NAT, CANARY)})
        self._rebuild_shared((Table.FILTER, FIREWALL), touched)
        touched.update((Table.NAT, c) for c in (MARK_MASQ, POSTROUTING))
        touched.update((Table.FILTER, c) for c in FILTER_BASE_CHAINS)

    def _top_level(self, touched: set[ChainKey]) -> None:
        """PYPROXY-SERVICES and PYPROXY-NODEPORTS jump to their non-empty shards."""
        ctx = self.ctx
        services = [f"-j {shard_chain(SERVICES, i)}" for i in range(SHARDS)
                    if shard_chain(SERVICES, i) in self._nat]
        comment = ('-m comment --comment "pyproxy service nodeports; NOTE: this must be the '
                   'last rule in this chain"')
        cidrs = [c for c in ctx.node_port_cidrs if c.version == _version(ctx.family)]
        if cidrs:
            services += [f"-d {_cidr(c)} {comment} -m addrtype --dst-type LOCAL -j {NODEPORTS}"
                         for c in cidrs]
        else:
            loopback = ""
            if ctx.family is IPFamily.IPv6:
                loopback = "! -d ::1/128 "
            elif not ctx.localhost_node_ports:
                loopback = "! -d 127.0.0.0/8 "
            services.append(f"{loopback}{comment} -m addrtype --dst-type LOCAL -j {NODEPORTS}")
        nodeports = [f"-j {shard_chain(NODEPORTS, i)}" for i in range(SHARDS)
                     if shard_chain(NODEPORTS, i) in self._nat]
        for chain, rules in ((SERVICES, tuple(services)), (NODEPORTS, tuple(nodeports))):
            if self._nat.get(chain) != rules:
                self._nat[chain] = rules
                touched.add((Table.NAT, chain))


def _contributions(rules: ServiceRules, shard: int) -> dict[ChainKey, tuple[str, ...]]:
    """A service port's rules in shared chains, with nat dispatch mapped to its shard."""
    out: dict[ChainKey, list[str]] = {}
    for table, chain, rule in rules.dispatch:
        key = (table, shard_chain(chain, shard)) if (table, chain) in _SHARDED else (table, chain)
        out.setdefault(key, []).append(rule)
    return {k: tuple(v) for k, v in out.items()}


def plan(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    ctx: PlanContext,
) -> Plan:
    """The whole desired ruleset for one IP family."""
    return Planner(ctx).plan(services, endpoints)


def jump_rules() -> tuple[Jump, ...]:
    """The rules kept in built-in chains, as iptables-save prints them."""
    out = []
    for table, chain, match, comment, target in JUMPS:
        prefix = f"{match} " if match else ""
        rule = f"{prefix}-m comment --comment {quote(comment)} -j {target}"
        out.append(Jump(table, chain, rule))
    return tuple(out)
