"""The planner's shortcuts in spelling rules agree with the slow, obvious spelling.

A full plan at 10,000 services spells ~180,000 rules, so `_service_rules`
hashes each port once for its four chain names and its shard, spells IPv4
addresses itself, and builds comments from one quoted prefix. Each shortcut is
checked here against what it replaces: `chain_name`, `shard_of`,
`Endpoint.address`, `quote` of the whole comment, base64's base32.
"""

from __future__ import annotations

import base64
import hashlib
import re
from ipaddress import ip_address, ip_network

import pytest

from pyproxy.iptables.plan import (
    PlanContext,
    Planner,
    _address,
    _b32,
    _cidr,
    chain_name,
    service_rules,
    shard_of,
)
from pyproxy.iptables.ruleset import Table, quote
from pyproxy.model import (
    Endpoint,
    IPFamily,
    NodeInfo,
    Protocol,
    ServicePort,
    ServicePortName,
    ServiceType,
)

NODE = NodeInfo("node-a", (ip_address("198.18.100.1"),))
CTX = PlanContext(node=NODE, cluster_cidrs=(ip_network("198.18.0.0/16"),))


@pytest.mark.parametrize("text", ["", "a", "ns1/svc1:p80tcp", "x" * 300, "ü/ß:☃udp10.0.0.1:53"])
def test_b32_is_the_first_16_characters_of_base32(text: str) -> None:
    digest = hashlib.sha256(text.encode()).digest()
    assert _b32(digest) == base64.b32encode(digest).decode()[:16]


@pytest.mark.parametrize("ip", ["0.0.0.0", "10.0.0.1", "198.18.255.254", "255.255.255.255",
                                "fd00::1", "::ffff:10.0.0.1", "2001:db8::", "::"])
def test_address_and_cidr_spell_as_ipaddress_does(ip: str) -> None:
    ep = Endpoint(ip_address(ip), 8080)
    assert _address(ep) == ep.address
    addr = ip_address(ip)
    assert _cidr(addr) == f"{addr}/{addr.max_prefixlen}"
    assert _cidr(ip_network("10.0.0.0/8")) == "10.0.0.0/8"


def _port(name: ServicePortName, ip: str = "198.19.0.1", **kw: object) -> ServicePort:
    family = IPFamily.of(ip_address(ip))
    return ServicePort(name=name, family=family, type=kw.pop("type", ServiceType.CLUSTER_IP),
                       cluster_ip=ip_address(ip), port=80, **kw)  # type: ignore[arg-type]


EPS = (Endpoint(ip_address("198.18.1.1"), 8080, node_name="node-a", is_local=True),
       Endpoint(ip_address("198.18.1.2"), 8080, node_name="node-b"),
       Endpoint(ip_address("198.18.1.3"), 8080, node_name="node-b"))

# Every kind of chain a port can have: SVC, SVL, EXT, FW and SEPs.
PORTS = [
    _port(ServicePortName("ns1", "plain", "http", Protocol.TCP)),
    _port(ServicePortName("ns1", "sticky", "", Protocol.UDP), affinity_timeout=10800),
    _port(ServicePortName("ns2", "lb", "https", Protocol.SCTP), type=ServiceType.LOAD_BALANCER,
          node_port=30080, load_balancer_ips=(ip_address("198.19.128.1"),),
          load_balancer_source_ranges=(ip_network("198.18.100.0/24"),),
          external_policy_local=True, health_check_node_port=32000),
    _port(ServicePortName("ns2", "itp", "dns", Protocol.UDP), internal_policy_local=True,
          external_ips=(ip_address("198.19.64.1"),)),
]


@pytest.mark.parametrize("svc", PORTS, ids=lambda p: str(p.name))
def test_chain_names_and_shard_are_chain_name_and_shard_of(svc: ServicePort) -> None:
    rules = service_rules(svc, EPS, CTX)
    assert rules.shard == shard_of(svc.name)
    expected = {chain_name(kind, svc.name) for kind in ("SVC", "SVL", "EXT", "FW")}
    expected |= {chain_name("SEP", svc.name, ep.address) for ep in EPS}
    assert set(rules.nat_chains) <= expected
    seps = [c for c in rules.nat_chains if c.startswith("PYPROXY-SEP-")]
    assert seps == [chain_name("SEP", svc.name, ep.address) for ep in EPS]
    for table, chain in rules.shared:
        if table is Table.NAT:
            assert chain.endswith(f"-{shard_of(svc.name):02X}")


def test_comments_are_quoted_as_a_whole_even_when_the_name_needs_escaping() -> None:
    # Not a name the API server would let through, but nothing here stops a manifest.
    name = ServicePortName('we"ird', "it's", "a\\b", Protocol.TCP)
    svc = _port(name, affinity_timeout=60)
    rules = service_rules(svc, EPS, CTX)
    text = [r for rs in rules.nat_chains.values() for r in rs]
    text += [r for rs in rules.shared.values() for r in rs]
    comments = {m for r in text for m in re.findall(r'--comment ("(?:[^"\\]|\\.)*"|\S+)', r)}
    wanted = {quote(str(name)), quote(f"{name} cluster IP")}
    wanted |= {quote(f"{name} -> {ep.address}") for ep in EPS}
    assert comments == wanted


def test_ipv6_endpoints_have_full_masks_and_bracketed_addresses() -> None:
    svc = _port(ServicePortName("ns", "v6", "", Protocol.TCP), ip="fd00:200::10",
                affinity_timeout=60)
    ep = Endpoint(ip_address("fd00:1::1"), 8080)
    ctx = PlanContext(node=NODE, family=IPFamily.IPv6)
    sep = chain_name("SEP", svc.name, "[fd00:1::1]:8080")
    assert service_rules(svc, (ep,), ctx).nat_chains[sep] == (
        '-s fd00:1::1/128 -m comment --comment "ns/v6" -j PYPROXY-MARK-MASQ',
        f'-p tcp -m comment --comment "ns/v6" -m recent --set --name {sep} '
        "--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -m tcp "
        "-j DNAT --to-destination [fd00:1::1]:8080",
    )


def test_a_full_replan_after_changes_matches_a_fresh_plan() -> None:
    services = {p.name: p for p in PORTS}
    endpoints = {p.name: EPS for p in PORTS}
    planner = Planner(CTX)
    planner.plan(services, endpoints)
    services.pop(PORTS[0].name)
    endpoints[PORTS[1].name] = EPS[1:]
    again = planner.plan(services, endpoints)  # full: every port re-checked
    fresh = Planner(CTX).plan(services, endpoints)
    assert again.ruleset == fresh.ruleset
    assert again.touched is None
    assert dict(again.chains_by_service) == dict(fresh.chains_by_service)
    assert again.ruleset.groups == fresh.ruleset.groups
