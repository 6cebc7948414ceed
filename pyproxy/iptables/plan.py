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
import operator
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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


def _b32(digest: bytes) -> str:
    """The first 16 characters of base32(digest).

    base32 turns 5 bytes into 8 characters, so 16 need only the first 10 bytes;
    looking up 10 bits at a time, unrolled into one f-string (one allocation), is
    ~3x faster than Python 3.11's b32encode, and this runs once per endpoint of
    every service.
    """
    n = int.from_bytes(digest[:10], "big")
    p = _B32_PAIRS
    return (f"{p[n >> 70]}{p[(n >> 60) & 1023]}{p[(n >> 50) & 1023]}{p[(n >> 40) & 1023]}"
            f"{p[(n >> 30) & 1023]}{p[(n >> 20) & 1023]}{p[(n >> 10) & 1023]}{p[n & 1023]}")


def _hash(*parts: str) -> str:
    """The first 16 characters of base32(sha256(...)), as kube-proxy's portProtoHash."""
    return _b32(hashlib.sha256("".join(parts).encode()).digest())


@functools.lru_cache(maxsize=1 << 13)
def chain_name(kind: str, name: ServicePortName, endpoint: str = "") -> str:
    """Stable chain name: kube-proxy's hash of the port's identity (and endpoint).

    "PYPROXY-" + 3-letter kind + "-" + 16 hash characters is exactly 28, the
    kernel's limit; FW is shorter. The SVC, SVL, EXT and FW chains of one port
    share one hash (only the kind differs), as upstream's do. The planner
    spells these names itself (`_service_rules`), hashing once per port and
    once per endpoint; this is for everyone else.
    """
    return f"PYPROXY-{kind}-{_hash(str(name), name.protocol.lower(), endpoint)}"


def _ip_text(ip: IPAddress) -> str:
    """str(ip): for IPv4 by inet_ntoa, which spells it as ipaddress does, ~4x faster.

    A full plan spells every endpoint address in the cluster; ipaddress's __str__
    and model's memo (sized for repeats within a sync, so all misses at 50,000
    endpoints) were a fifth of a cold plan.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return socket.inet_ntoa(ip.packed)
    return str(ip)


def _address(ep: Endpoint) -> str:
    """ep.address (ip:port, brackets for IPv6), spelt by _ip_text."""
    ip = ep.ip
    if isinstance(ip, ipaddress.IPv4Address):
        return f"{socket.inet_ntoa(ip.packed)}:{ep.port}"
    return ep.address


def _cidr(addr: IPAddress | IPNetwork) -> str:
    """Addresses and networks as iptables-save prints them (always with a prefix length)."""
    if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return f"{_ip_text(addr)}/{addr.max_prefixlen}"
    return str(addr)


@functools.lru_cache(maxsize=1 << 10)  # n is an endpoint count: few distinct values
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
        ready = [e for e in endpoints if e.ready]
        allowed = _topology_filter(ready, node)
        cluster = tuple(ready) if allowed is None else tuple(e for e in ready if allowed(e))
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
    ready: Sequence[Endpoint], node: NodeInfo
) -> Callable[[Endpoint], bool] | None:
    """Upstream's topologyModeFromHints: hints decide, whatever the Service says.

    Node hints (PreferSameNode) apply when every ready endpoint has some and one
    names this node; zone hints when every ready endpoint has some and one names
    this node's zone. Otherwise all endpoints are used: None, the usual case,
    which the caller takes without filtering.
    """
    if not ready:
        return None
    first = ready[0]  # without hints (the usual case) it decides at once
    if first.node_hints and all(e.node_hints for e in ready) and any(
        node.name in (e.node_hints or ()) for e in ready
    ):
        return lambda e: node.name in (e.node_hints or ())
    if node.zone and first.zone_hints and all(e.zone_hints for e in ready) and any(
        node.zone in (e.zone_hints or ()) for e in ready
    ):
        return lambda e: node.zone in (e.zone_hints or ())
    return None


SHARDS = 16  # dispatch chains per table; a full sync on nf_tables writes one shard at a time


def shard_of(name: ServicePortName) -> int:
    """Which dispatch shard a service port's rules live in: stable, like chain names.

    The first byte of the same digest the port's chain names come from.
    """
    digest = hashlib.sha256(f"{name}{name.protocol.lower()}".encode()).digest()
    return digest[0] % SHARDS


def shard_chain(base: str, shard: int) -> str:
    return f"{base}-{shard:02X}"


ChainKey = tuple[Table, str]
# The nat dispatch chains are sharded: a port's rules go to its shard's copy of each.
_NAT_SERVICES = tuple((Table.NAT, shard_chain(SERVICES, i)) for i in range(SHARDS))
_NAT_NODEPORTS = tuple((Table.NAT, shard_chain(NODEPORTS, i)) for i in range(SHARDS))
_FILTER_SERVICES: ChainKey = (Table.FILTER, SERVICES)
_FILTER_EXTERNAL: ChainKey = (Table.FILTER, EXTERNAL_SERVICES)
_FILTER_FIREWALL: ChainKey = (Table.FILTER, FIREWALL)
_FILTER_NODEPORTS: ChainKey = (Table.FILTER, NODEPORTS)


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """One service port's contribution: its own chains plus rules in shared chains."""

    name: ServicePortName
    # Its own nat chains, in the order they are first written: chain -> rules.
    nat_chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Its rules in shared chains, nat dispatch already in its shard's chain.
    shared: Mapping[ChainKey, tuple[str, ...]] = field(default_factory=dict)
    shard: int = 0
    no_local_endpoints: bool = False  # eTP/iTP Local with no local endpoint: for metrics


@dataclass(frozen=True, slots=True)
class _ContextText:
    """What a PlanContext puts into every service port's rules, spelt once per planner.

    PlanContext's properties build their tuples on each call; at 10,000
    service ports that is worth doing once.
    """

    node: NodeInfo
    node_ips: tuple[IPAddress, ...]
    masquerade_all: bool
    local_cidrs: tuple[str, ...]  # cluster CIDRs of this family, as iptables-save prints them
    reject: str

    @classmethod
    def of(cls, ctx: PlanContext) -> _ContextText:
        return cls(ctx.node, ctx.node_ips, ctx.masquerade_all,
                   tuple(_cidr(c) for c in ctx.local_cidrs), ctx.reject)


def service_rules(
    svc: ServicePort, endpoints: Sequence[Endpoint], ctx: PlanContext
) -> ServiceRules:
    """One service port's rules (see ServiceRules), a pure function of its arguments."""
    return _service_rules(svc, endpoints, _ContextText.of(ctx))


_V4_MASK = "255.255.255.255"
_V6_MASK = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def _service_rules(  # noqa: C901 - one flat walk, in upstream's order, reads best
    svc: ServicePort, endpoints: Sequence[Endpoint], ctx: _ContextText
) -> ServiceRules:
    """service_rules' body. It runs once per service port on a full plan, so the
    text that is the same for every rule of the port is spelt once, up front, and
    each endpoint costs one hash and a few concatenations."""
    spn = svc.name
    name = str(spn)
    proto = svc.protocol.lower()
    port = svc.port
    sets = categorize(endpoints, svc, ctx.node)
    has_endpoints = sets.has_any
    accessible = svc.externally_accessible
    etp_local = svc.external_policy_local
    itp_local = svc.internal_policy_local
    lb_ips = svc.load_balancer_ips

    # kube-proxy's servicePortChainName: SVC, SVL, EXT and FW share the port's hash,
    # and its first byte picks the dispatch shard (shard_of).
    hash_key = name + proto
    digest = hashlib.sha256(hash_key.encode()).digest()
    shard = digest[0] % SHARDS
    port_hash = _b32(digest)
    svc_chain = "PYPROXY-SVC-" + port_hash
    svl_chain = "PYPROXY-SVL-" + port_hash
    ext_chain = "PYPROXY-EXT-" + port_hash
    fw_chain = "PYPROXY-FW-" + port_hash

    uses_cluster_chain = bool(sets.cluster) and svc.uses_cluster_endpoints
    uses_local_chain = bool(sets.local) and svc.uses_local_endpoints

    internal_chain = svc_chain
    has_internal = has_endpoints
    if itp_local:
        internal_chain = svl_chain
        has_internal = bool(sets.local)
    external_policy_chain = svc_chain
    has_external = has_endpoints
    if etp_local:
        external_policy_chain = svl_chain
        has_external = bool(sets.local)
    uses_ext_chain = has_endpoints and accessible
    uses_fw_chain = has_endpoints and bool(lb_ips) and bool(svc.load_balancer_source_ranges)
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

    # Rules in shared chains, grouped by chain as they are appended.
    shared: dict[ChainKey, list[str]] = {}
    nat_services = _NAT_SERVICES[shard]
    # quote(f"{name}{suffix}") is `opened + suffix + '"'` when the suffix starts with a
    # space (so the whole is always quoted) and needs no escaping, as every comment
    # suffix here does, addresses included (digits, hex, '.', ':', brackets).
    quoted = quote(name)
    opened = quoted[:-1] if quoted[0] == '"' else f'"{quoted}'
    cluster_ip_match = (f'-d {_cidr(svc.cluster_ip)} -p {proto} -m comment --comment '
                        f'{opened} cluster IP" -m {proto} --dport {port}')

    # Cluster IP.
    if has_internal:
        shared[nat_services] = [f"{cluster_ip_match} -j {internal_chain}"]
    else:
        shared[_FILTER_SERVICES] = [_match(proto, svc.cluster_ip, port, int_comment)
                                    + f" -j {int_target}"]
    # External IPs.
    for ip in svc.external_ips:
        if has_endpoints:
            shared.setdefault(nat_services, []).append(
                _match(proto, ip, port, f"{name} external IP") + f" -j {ext_chain}")
        if not has_external:
            shared.setdefault(_FILTER_EXTERNAL, []).append(
                _match(proto, ip, port, ext_comment) + f" -j {ext_target}")
    # LoadBalancer ingress IPs.
    for ip in lb_ips:
        if has_endpoints:
            shared.setdefault(nat_services, []).append(
                _match(proto, ip, port, f"{name} loadbalancer IP") + f" -j {lb_chain}")
        if uses_fw_chain:
            shared.setdefault(_FILTER_FIREWALL, []).append(_match(
                proto, ip, port, f"{name} traffic not accepted by {fw_chain}") + " -j DROP")
    if not has_external:
        for ip in lb_ips:
            shared.setdefault(_FILTER_EXTERNAL, []).append(
                _match(proto, ip, port, ext_comment) + f" -j {ext_target}")
    # Node ports.
    if svc.node_port:
        if has_endpoints:
            shared.setdefault(_NAT_NODEPORTS[shard], []).append(
                _match(proto, None, svc.node_port, name) + f" -j {ext_chain}")
        if not has_external:
            shared.setdefault(_FILTER_EXTERNAL, []).append(
                f"-p {proto} -m comment --comment {quote(ext_comment)} "
                f"-m addrtype --dst-type LOCAL -m {proto} --dport {svc.node_port}"
                f" -j {ext_target}")
    if svc.health_check_node_port:
        shared.setdefault(_FILTER_NODEPORTS, []).append(_match(
            "tcp", None, svc.health_check_node_port, f"{name} health check node port")
            + " -j ACCEPT")

    chains: dict[str, list[str]] = {}
    # Internal traffic: masquerade what comes from off the cluster.
    if has_internal:
        rules = chains.setdefault(internal_chain, [])
        if ctx.masquerade_all:
            rules.append(f"{cluster_ip_match} -j {MARK_MASQ}")
        else:
            # One rule per CIDR, as `! -s` cannot take a list; iptables-save prints
            # the source before the destination.
            for cidr in ctx.local_cidrs:
                rules.append(f"! -s {cidr} {cluster_ip_match} -j {MARK_MASQ}")

    if uses_ext_chain:
        rules = chains.setdefault(ext_chain, [])
        if not etp_local:
            rules.append(f'-m comment --comment "masquerade traffic for {name} external '
                         f'destinations" -j {MARK_MASQ}')
        else:
            for cidr in ctx.local_cidrs:
                rules.append(f"-s {cidr} -m comment --comment "
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
        for net in svc.load_balancer_source_ranges:
            rules.append(f"-s {_cidr(net)} {comment} -j {ext_chain}")
            if any(ip in net for ip in ctx.node_ips):
                allow_from_node = True
        if allow_from_node:
            for ip in lb_ips:
                rules.append(f"-s {_cidr(ip)} {comment} -j {ext_chain}")
        rules.append(f'-m comment --comment "other traffic to {name} will be dropped by '
                     f'{FIREWALL}"')

    # Endpoints: each one's address and SEP chain name, worked out once (cluster and
    # local endpoints are both among the reachable ones).
    reachable = sets.reachable
    seps = _endpoint_chains(hash_key, reachable)
    affinity = svc.affinity_timeout
    arrow = f"{opened} -> "
    if uses_cluster_chain:
        chains.setdefault(svc_chain, []).extend(
            _to_endpoints(_subset(sets.cluster, reachable, seps), arrow, affinity))
    if uses_local_chain:
        chains.setdefault(svl_chain, []).extend(
            _to_endpoints(_subset(sets.local, reachable, seps), arrow, affinity))

    nat_chains: dict[str, tuple[str, ...]] = {c: tuple(r) for c, r in chains.items()}
    masq_tail = f" -m comment --comment {quoted} -j {MARK_MASQ}"
    dnat_head = f"-p {proto} -m comment --comment {quoted}"
    dnat_tail = f" -m {proto} -j DNAT --to-destination "
    for address, sep in seps:
        if address[0] == "[":  # IPv6: [ip]:port
            host, prefix, mask = address[1:address.rindex("]")], 128, _V6_MASK
        else:
            host, prefix, mask = address[:address.rindex(":")], 32, _V4_MASK
        recent = f" -m recent --set --name {sep} --mask {mask} --rsource" if affinity else ""
        sep_rules: tuple[str, ...] = (f"-s {host}/{prefix}{masq_tail}",
                                      f"{dnat_head}{recent}{dnat_tail}{address}")
        if sep in nat_chains:
            # An address listed twice (only from a caller that does not merge slices
            # as the tracker does): its rules are appended again, as they always were.
            sep_rules = nat_chains[sep] + sep_rules
        nat_chains[sep] = sep_rules

    no_local = (itp_local or etp_local) and not sets.local
    return ServiceRules(
        name=spn,
        nat_chains=nat_chains,
        shared={k: tuple(v) for k, v in shared.items()},
        shard=shard,
        no_local_endpoints=no_local and has_endpoints,
    )


def _endpoint_chains(hash_key: str, endpoints: Iterable[Endpoint]) -> list[tuple[str, str]]:
    """Each endpoint's address and SEP chain (the port's hash input, plus the address)."""
    sha256 = hashlib.sha256
    out = []
    for ep in endpoints:
        address = _address(ep)
        out.append((address, "PYPROXY-SEP-" + _b32(sha256((hash_key + address).encode()).digest())))
    return out


def _subset(endpoints: tuple[Endpoint, ...], reachable: tuple[Endpoint, ...],
            seps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`_endpoint_chains` of `endpoints`, a subset of `reachable`, from those of `reachable`.

    Usually they are the same tuple (no local traffic policy): nothing to do.
    """
    if endpoints is reachable:
        return seps
    by_address = dict(seps)
    return [(a, by_address[a]) for a in map(_address, endpoints)]


def _to_endpoints(pairs: Sequence[tuple[str, str]], arrow: str, affinity: int) -> list[str]:
    """Affinity checks first, then an even random spread (1/n, 1/(n-1), ..., 1).

    `pairs` are each endpoint's address and SEP chain; `arrow` is the quoted
    comment '"NAME -> ' without its closing quote.
    """
    rules: list[str] = []
    if affinity:
        for address, sep in pairs:
            mask = _V6_MASK if address[0] == "[" else _V4_MASK
            rules.append(
                f'-m comment --comment {arrow}{address}" -m recent --rcheck'
                f" --seconds {affinity} --reap --name {sep}"
                f" --mask {mask} --rsource -j {sep}"
            )
    last = len(pairs) - 1
    for i, (address, sep) in enumerate(pairs):
        if i < last:
            rules.append(f'-m comment --comment {arrow}{address}" -m statistic --mode random'
                         f" --probability {probability(last + 1 - i)} -j {sep}")
        else:
            rules.append(f'-m comment --comment {arrow}{address}" -j {sep}')
    return rules


# ServicePortName's own order (its fields, in order), compared in C rather than by
# the dataclass's __lt__: a full plan sorts every service port.
_ORDER = operator.attrgetter("namespace", "name", "port", "protocol")
_NO_RULES = ServiceRules(ServicePortName("", "", "", Protocol.TCP))  # what a new port had


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
    _text: _ContextText = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._text = _ContextText.of(self.ctx)

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
        # A full plan's result counts every chain as touched: no need to record them.
        chain_touched = None if full else touched
        for spn in sorted(check, key=_ORDER):
            self._update(spn, services.get(spn), endpoints, chain_touched, shared_touched)
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
                touched: set[ChainKey] | None, shared_touched: set[ChainKey]) -> None:
        """Re-plan one service port if its inputs changed; record the nat chains that
        changed in `touched` (None: do not record) and the shared chains to rebuild
        in `shared_touched`."""
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
            new_rules = _service_rules(svc, eps, self._text)
            self._cache[spn] = (svc, eps, new_rules)
        old_rules = old[2] if old is not None else _NO_RULES
        new_chains = new_rules.nat_chains
        if svc is None:
            self._chains_by_service.pop(spn, None)
        else:
            self._chains_by_service[spn] = tuple(new_chains)
        nat, groups = self._nat, self._groups
        for chain in old_rules.nat_chains:
            if chain not in new_chains:
                nat.pop(chain, None)
                groups.pop(chain, None)
                if touched is not None:
                    touched.add((Table.NAT, chain))
        if touched is None:
            nat.update(new_chains)
        else:
            for chain, rules in new_chains.items():
                if nat.get(chain) != rules:
                    nat[chain] = rules
                    touched.add((Table.NAT, chain))
        groups.update(dict.fromkeys(new_chains, new_rules.shard))
        old_parts, new_parts = old_rules.shared, new_rules.shared
        for key, rules in new_parts.items():
            if old_parts.get(key) != rules:
                self._shared.setdefault(key, {})[spn] = rules
                shared_touched.add(key)
        for key in old_parts:
            if key not in new_parts:
                self._shared.setdefault(key, {}).pop(spn, None)
                shared_touched.add(key)
        self._no_local += new_rules.no_local_endpoints - old_rules.no_local_endpoints

    def _rebuild_shared(self, key: ChainKey, touched: set[ChainKey]) -> None:
        table, chain = key
        bucket = self._shared.get(key, {})
        rules = tuple(r for spn in sorted(bucket, key=_ORDER) for r in bucket[spn])
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
