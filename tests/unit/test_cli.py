"""`pyproxy trace`, `pyproxy plan --diff` and `pyproxy cleanup --kube-proxy`, without a kernel.

The kernel is faked where these commands read it (iptables-save through an
IPTables runner, the IPVS table through a stand-in for IPVSKernel), so what
is tested here is what they make of it. The same commands against a real
kernel: tests/kernel/test_trace_agrees.py (trace, plan --diff),
tests/kernel/test_migrate.py and tests/ipvs/test_migrate_ipvs.py (cleanup).
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pyproxy import cli
from pyproxy.iptables.plan import PlanContext, Planner
from pyproxy.iptables.restore import Backend, IPTables
from pyproxy.iptables.ruleset import Ruleset, Table, parse_save, parse_tables, render
from pyproxy.ipvs.diff import KernelRealServer, KernelSet, KernelState, KernelVirtualServer
from pyproxy.ipvs.plan import SET_TYPES, IPVSContext, IPVSPlan, SetEntry, VirtualServerKey
from pyproxy.ipvs.plan import plan as ipvs_plan
from pyproxy.migrate import (
    CleanupReport,
    cleanup_iptables,
    is_kube_proxy_chain,
    kube_proxy_node_ports,
    render_kube_proxy_cleanup,
)
from pyproxy.model import NodeInfo, Protocol
from pyproxy.tracker import ChangeTracker
from tests.kernel import cluster
from tests.kernel import kube_proxy as kp

NODE_IP = "198.18.100.1"
CLIENT_IP = "198.18.100.2"
FLAGS = ["--hostname-override", cluster.NODE, "--cluster-cidr", "198.18.1.0/24"]
NODE = NodeInfo(cluster.NODE, (ip_address(NODE_IP),), zone="zone-a")
CIDRS = (ip_network("198.18.1.0/24"),)


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """The commands set up logging on the root logger; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    cluster.write(tmp_path, cluster.objects())
    return tmp_path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


def trace_doc(*args: str) -> dict[str, Any]:
    result = invoke("trace", "--json", *args)
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def endpoints(doc: dict[str, Any]) -> dict[str, tuple[float | None, bool]]:
    return {e["endpoint"]: (e["probability"], e["masquerade"]) for e in doc["endpoints"]}


def snapshot() -> Any:
    objs = cluster.objects()
    tracker = ChangeTracker(cluster.NODE)
    tracker.replace([o for o in objs if o["kind"] == "Service"],
                    [o for o in objs if o["kind"] == "EndpointSlice"])
    return tracker.checkout()


def planned_ruleset() -> Ruleset:
    snap = snapshot()
    ctx = PlanContext(NODE, cluster_cidrs=CIDRS)
    return Planner(ctx).plan(snap.services, snap.endpoints).ruleset


def planned_ipvs() -> IPVSPlan:
    snap = snapshot()
    ctx = IPVSContext(NODE, cluster_cidrs=CIDRS, node_port_addresses=NODE.addresses)
    return ipvs_plan(snap.services, snap.endpoints, ctx)


def as_save(rs: Ruleset, extra: dict[str, list[str]] | None = None) -> str:
    """A ruleset as iptables-save would print it (jumps first in their built-in chains)."""
    out = []
    for table in (Table.FILTER, Table.NAT):
        out.append(f"*{table}")
        chains = {name: list(rules) for name, rules in rs.table(table).items()}
        for jump in reversed(rs.jumps):
            if jump.table is table:
                chains.setdefault(jump.chain, []).insert(0, jump.rule)
        for line in (extra or {}).get(str(table), []):
            chain, _, rule = line.partition(" ")
            chains.setdefault(chain, []).append(rule)
        out.extend(f":{name} - [0:0]" for name in chains)
        out.extend(f"-A {name} {rule}" for name, rules in chains.items() for rule in rules)
        out.append("COMMIT")
    return "\n".join(out) + "\n"


class FakeIPTables:
    """Answers iptables-save with fixed text per tool; records restores."""

    def __init__(self, saves: dict[str, str]) -> None:
        self.saves = saves
        self.restored: list[tuple[str, str]] = []

    def __call__(self, argv: Sequence[str], stdin: str | Sequence[str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
        tool = argv[0]
        if tool.endswith("-restore"):  # a restore's input comes in pieces (IPTables.restore)
            self.restored.append((tool, "".join(stdin or "")))
            return subprocess.CompletedProcess(list(argv), 0, "", "")
        text = self.saves.get(tool.removesuffix("-save"))
        if text is None:
            return subprocess.CompletedProcess(list(argv), 1, "", f"{tool}: not here")
        if "-t" in argv:
            wanted = argv[argv.index("-t") + 1]
            text = "".join(section for section in _sections(text)
                           if section.startswith(f"*{wanted}\n"))
        return subprocess.CompletedProcess(list(argv), 0, text, "")


def _sections(text: str) -> list[str]:
    out, current = [], []
    for line in text.splitlines(keepends=True):
        current.append(line)
        if line.strip() == "COMMIT":
            out.append("".join(current))
            current = []
    return out


@pytest.fixture
def kernel_iptables(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What `iptables-legacy-save` prints, settable by the test; addresses of the node."""
    saves: dict[str, str] = {}
    fake = FakeIPTables(saves)
    monkeypatch.setattr(cli, "_iptables", lambda backend: IPTables(Backend.LEGACY, runner=fake))
    monkeypatch.setattr(cli, "namespace_addresses",
                        lambda: ["127.0.0.1", NODE_IP, "198.18.0.1"])
    return saves


class FakeIPVSKernel:
    """Stands in for IPVSKernel in the CLI: a fixed KernelState."""

    state = KernelState()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.node_port_addresses: list[str] = []

    def __enter__(self) -> FakeIPVSKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def local_addresses(self) -> list[str]:
        return ["127.0.0.1", NODE_IP]

    def set_node_port_addresses(self, addresses: Any) -> None:
        self.node_port_addresses = list(addresses)

    def read(self) -> KernelState:
        return self.state


def kernel_state_of(p: IPVSPlan) -> KernelState:
    return KernelState(
        {k: KernelVirtualServer(k, vs.scheduler, vs.persistence_timeout,
                                tuple(KernelRealServer(r.address, r.port, r.weight)
                                      for r in vs.real_servers))
         for k, vs in p.virtual_servers.items()},
        set(p.addresses),
        {str(name): KernelSet(str(SET_TYPES[name]), False, frozenset(members))
         for name, members in p.ipsets.items()})


# -- trace, as planned from manifests --------------------------------------------------------


def test_trace_text_output(manifests: Path) -> None:
    result = invoke("trace", "--manifests", str(manifests), *FLAGS, "--src", CLIENT_IP,
                    "--dst", f"{NODE_IP}:{cluster.NODE_PORTS['web']}")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        f"packet:     tcp {CLIENT_IP} -> {NODE_IP}:30080 (arriving from outside the node)",
        "rules:      manifests",
        "verdict:    ACCEPT",
        "endpoints:  198.18.1.1:8080, 198.18.1.2:8080, 198.18.1.3:8080",
        "masquerade: yes",
    ]
    assert "  198.18.1.1:8080          p=0.333  masquerade" in lines
    assert "  nat/PYPROXY-NODEPORTS" in lines


def test_trace_json_per_endpoint_masquerade_for_a_hairpin(manifests: Path) -> None:
    doc = trace_doc("--manifests", str(manifests), *FLAGS, "--src", "198.18.1.1",
                    "--dst", f"{cluster.CLUSTER_IPS['web']}:80")
    assert doc["packet"] == {"src": "198.18.1.1", "dst": "198.18.200.10", "port": 80,
                             "protocol": "tcp", "fromNode": False}
    got = endpoints(doc)
    assert {e: m for e, (_, m) in got.items()} == {
        "198.18.1.1:8080": True, "198.18.1.2:8080": False, "198.18.1.3:8080": False}
    assert sum(p for p, _ in got.values() if p is not None) == pytest.approx(1.0, abs=1e-5)


def test_trace_rejected_and_dropped_name_the_rule(manifests: Path) -> None:
    doc = trace_doc("--manifests", str(manifests), *FLAGS, "--src", NODE_IP,
                    "--dst", f"{cluster.CLUSTER_IPS['empty']}:80")
    assert doc["packet"]["fromNode"] is True  # the source is the node's own address
    assert doc["verdict"] == "REJECT" and doc["endpoints"] == []
    assert doc["reasons"] == ["filter/PYPROXY-SERVICES#1 [t/empty:http has no endpoints]"]
    doc = trace_doc("--manifests", str(manifests), *FLAGS, "--src", CLIENT_IP,
                    "--dst", f"{NODE_IP}:{cluster.NODE_PORTS['localnone']}")
    assert doc["verdict"] == "DROP"
    assert "[t/localnone:http has no local endpoints]" in doc["reasons"][0]


def test_trace_session_affinity_and_udp(manifests: Path) -> None:
    doc = trace_doc("--manifests", str(manifests), *FLAGS, "--src", "198.18.1.2",
                    "--dst", f"{cluster.CLUSTER_IPS['sticky']}:80")
    assert doc["affinity"] is True and len(doc["endpoints"]) == 3
    doc = trace_doc("--manifests", str(manifests), *FLAGS, "--src", "198.18.1.2",
                    "--dst", f"{cluster.CLUSTER_IPS['dns']}:53", "--proto", "udp")
    assert sorted(endpoints(doc)) == ["198.18.1.1:5353", "198.18.1.2:5353", "198.18.1.3:5353"]
    doc = trace_doc("--manifests", str(manifests), *FLAGS, "--src", "198.18.1.2",
                    "--dst", f"{cluster.CLUSTER_IPS['dns']}:53")  # tcp: not a service port
    assert doc["verdict"] == "ACCEPT" and doc["endpoints"] == []


@pytest.mark.parametrize("dst, message", [
    ("198.18.200.10", "expected IP:PORT"),
    ("198.18.200.10:http", "expected IP:PORT"),
    ("[fd00::1]:80", "mixes address families"),
])
def test_trace_bad_destination(manifests: Path, dst: str, message: str) -> None:
    result = invoke("trace", "--manifests", str(manifests), *FLAGS, "--src", CLIENT_IP,
                    "--dst", dst)
    assert result.exit_code == 2 and message in result.output


# -- trace, IPVS mode ----------------------------------------------------------------------------


def ipvs_trace(manifests: Path, src: str, dst: str, *more: str) -> dict[str, Any]:
    return trace_doc("--manifests", str(manifests), *FLAGS, "--mode", "ipvs", "--src", src,
                     "--dst", dst, *more)


def test_ipvs_trace_virtual_server_and_masquerade_from_ipsets(manifests: Path) -> None:
    web = f"{cluster.CLUSTER_IPS['web']}:80"
    doc = ipvs_trace(manifests, NODE_IP, web)  # the node is off the cluster CIDR
    assert doc["chains"][:2] == ["nat/OUTPUT", "nat/PYPROXY-SERVICES"]
    assert "ipvs/tcp/198.18.200.10:80" in doc["chains"]
    assert endpoints(doc) == {f"198.18.1.{i}:8080": (pytest.approx(1 / 3), True)
                              for i in (1, 2, 3)}
    doc = ipvs_trace(manifests, "198.18.1.2", web)  # a pod: kept, except its own hairpin
    assert {e: m for e, (_, m) in endpoints(doc).items()} == {
        "198.18.1.1:8080": False, "198.18.1.2:8080": True, "198.18.1.3:8080": False}
    assert any("scheduler rr, 3 real server(s)" in n for n in doc["notes"])


def test_ipvs_trace_node_ports_and_policies(manifests: Path) -> None:
    doc = ipvs_trace(manifests, CLIENT_IP, f"{NODE_IP}:{cluster.NODE_PORTS['web']}")
    assert doc["masquerade"] is True and len(doc["endpoints"]) == 3
    doc = ipvs_trace(manifests, CLIENT_IP, f"{NODE_IP}:{cluster.NODE_PORTS['local']}")
    assert endpoints(doc) == {"198.18.1.1:8080": (1.0, False)}  # eTP Local: source kept
    doc = ipvs_trace(manifests, CLIENT_IP, f"{NODE_IP}:{cluster.NODE_PORTS['localnone']}")
    assert doc["verdict"] == "REJECT"
    assert "has no real server" in doc["reasons"][0]
    doc = ipvs_trace(manifests, CLIENT_IP, f"{cluster.CLUSTER_IPS['empty']}:80")
    assert doc["verdict"] == "REJECT"
    assert "[service has no endpoints]" in doc["reasons"][0]
    doc = ipvs_trace(manifests, CLIENT_IP, f"{cluster.LB_IPS['lbranged']}:80")
    assert doc["verdict"] == "DROP" and "[loadBalancerSourceRanges]" in doc["reasons"][0]
    doc = ipvs_trace(manifests, CLIENT_IP, f"{cluster.LB_IPS['lballowed']}:80")
    assert doc["verdict"] == "ACCEPT" and len(doc["endpoints"]) == 3
    doc = ipvs_trace(manifests, "198.18.1.1", f"{cluster.CLUSTER_IPS['sticky']}:80")
    assert doc["affinity"] is True


# -- trace, as programmed in the kernel ------------------------------------------------------------


def test_trace_reads_the_kernel_and_follows_only_pyproxys_rules(
        kernel_iptables: dict[str, str]) -> None:
    # Someone else's rule the tracer cannot model must not get in the way.
    foreign = {"filter": ["FORWARD -m physdev --physdev-is-bridged -j ACCEPT"],
               "nat": ["PREROUTING -m addrtype --dst-type LOCAL -j DOCKER", "DOCKER -j RETURN"]}
    kernel_iptables["iptables-legacy"] = as_save(planned_ruleset(), foreign)
    doc = trace_doc("--src", CLIENT_IP, "--dst", f"{NODE_IP}:{cluster.NODE_PORTS['web']}")
    assert doc["rules"] == "kernel (iptables-legacy)"
    assert len(doc["endpoints"]) == 3 and doc["masquerade"] is True
    assert "nat/DOCKER" not in doc["chains"]


def test_trace_reads_the_ipvs_table(kernel_iptables: dict[str, str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    p = planned_ipvs()
    kernel_iptables["iptables-legacy"] = as_save(p.ruleset)
    monkeypatch.setattr(FakeIPVSKernel, "state", kernel_state_of(p))
    monkeypatch.setattr(cli, "IPVSKernel", FakeIPVSKernel)
    monkeypatch.setattr(cli, "namespace_addresses",
                        lambda: ["127.0.0.1", NODE_IP, *sorted(p.addresses)])
    doc = trace_doc("--mode", "ipvs", "--src", CLIENT_IP,
                    "--dst", f"{NODE_IP}:{cluster.NODE_PORTS['web']}")
    assert doc["rules"] == "kernel (iptables-legacy, IPVS)"
    assert "ipvs/tcp/198.18.100.1:30080" in doc["chains"]
    assert len(doc["endpoints"]) == 3 and doc["masquerade"] is True


# -- plan --diff ----------------------------------------------------------------------------------


def test_plan_diff_empty_when_the_kernel_holds_the_plan(
        manifests: Path, kernel_iptables: dict[str, str]) -> None:
    kernel_iptables["iptables-legacy"] = as_save(planned_ruleset())
    result = invoke("plan", "--diff", "--manifests", str(manifests), *FLAGS)
    assert result.exit_code == 0 and result.stdout == ""


def test_plan_diff_shows_chains_and_rules(manifests: Path,
                                         kernel_iptables: dict[str, str]) -> None:
    rs = planned_ruleset()
    nat = rs.table(Table.NAT)
    svc = next(name for name in nat if name.startswith("PYPROXY-SVC-"))
    nat[svc] = nat[svc][:-1]  # the kernel lacks the last rule of one chain
    nat["PYPROXY-SEP-GONEGONEGONEGONE"] = ("-j DNAT --to-destination 198.18.1.9:80",)
    kernel_iptables["iptables-legacy"] = as_save(rs, {"nat": [
        'PREROUTING -m comment --comment "pyproxy old portal" -j PYPROXY-OLD'],
        "filter": []})
    result = invoke("plan", "--diff", "--manifests", str(manifests), *FLAGS)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    want = planned_ruleset().table(Table.NAT)[svc][-1]
    i = lines.index(f"--- nat/{svc}")
    assert lines[i + 1] == f"+ -A {svc} {want}"
    i = lines.index("--- nat/PYPROXY-SEP-GONEGONEGONEGONE (deleted chain)")
    assert lines[i + 1] == "- -A PYPROXY-SEP-GONEGONEGONEGONE -j DNAT --to-destination " \
                           "198.18.1.9:80"
    assert '- -A PREROUTING -m comment --comment "pyproxy old portal" -j PYPROXY-OLD' in lines
    assert not [line for line in lines if line[:2] not in ("--", "+ ", "- ")]


def test_plan_diff_ipvs_lists_operations_then_iptables(
        manifests: Path, kernel_iptables: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "IPVSKernel", FakeIPVSKernel)
    p = planned_ipvs()
    monkeypatch.setattr(FakeIPVSKernel, "state", kernel_state_of(p))
    kernel_iptables["iptables-legacy"] = as_save(p.ruleset)
    result = invoke("plan", "--diff", "--mode", "ipvs", "--manifests", str(manifests), *FLAGS)
    assert result.exit_code == 0 and result.stdout == "", result.output
    # One real server too many, one virtual server missing, one set member missing.
    web = VirtualServerKey(Protocol.TCP, cluster.CLUSTER_IPS["web"], 80)
    dns = VirtualServerKey(Protocol.UDP, cluster.CLUSTER_IPS["dns"], 53)
    state = kernel_state_of(p)
    vs = state.virtual_servers[web]
    state.virtual_servers[web] = replace(vs, real_servers=(
        *vs.real_servers, KernelRealServer("198.18.1.9", 8080, 1)))
    del state.virtual_servers[dns]
    cluster_ips = state.ipsets["PYPROXY-CLUSTER-IP"]
    state.ipsets["PYPROXY-CLUSTER-IP"] = replace(cluster_ips, members=frozenset(
        e for e in cluster_ips.members if e.ip != cluster.CLUSTER_IPS["dns"]))
    monkeypatch.setattr(FakeIPVSKernel, "state", state)
    result = invoke("plan", "--diff", "--mode", "ipvs", "--manifests", str(manifests), *FLAGS)
    lines = result.stdout.splitlines()
    assert "+ ipset PYPROXY-CLUSTER-IP 198.18.200.53,udp:53" in lines
    assert "+ virtual server udp/198.18.200.53:53 scheduler rr" in lines
    assert "+ real server udp/198.18.200.53:53 -> 198.18.1.1:5353 weight 1" in lines
    assert "- real server tcp/198.18.200.10:80 -> 198.18.1.9:8080" in lines


def test_plan_without_diff_still_prints_the_payload(manifests: Path) -> None:
    result = invoke("plan", "--manifests", str(manifests), *FLAGS)
    assert result.exit_code == 0
    assert result.stdout == render(planned_ruleset(), Ruleset(), only=None).text


# -- cleanup --kube-proxy ---------------------------------------------------------------------


def test_kube_proxy_chains_exclude_the_kubelets() -> None:
    for name in ("KUBE-SERVICES", "KUBE-SVC-OOTBAKQILXSJ5SN2", "KUBE-SEP-X", "KUBE-EXT-X",
                 "KUBE-SVL-X", "KUBE-FW-X", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
                 "KUBE-FORWARD", "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY",
                 "KUBE-EXTERNAL-SERVICES", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER",
                 "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER", "KUBE-SOURCE-RANGES-FIREWALL"):
        assert is_kube_proxy_chain(name), name
    for name in ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP", "KUBE-MARK-MASQ",
                 "KUBE-IPTABLES-HINT", "PYPROXY-SERVICES", "DOCKER", "INPUT"):
        assert not is_kube_proxy_chain(name), name


def test_render_kube_proxy_cleanup() -> None:
    text = kp.IPTABLES_MODE + kp.FOREIGN + as_save(planned_ruleset())
    payload = render_kube_proxy_cleanup(parse_tables(text))
    lines = payload.lines
    # One transaction per table, mangle included (kube-proxy's canary lives there too).
    assert [line for line in lines if line.startswith("*")] == ["*filter", "*mangle", "*nat"]
    mangle = lines[lines.index("*mangle"):lines.index("*nat")]
    assert mangle == ["*mangle", ":KUBE-PROXY-CANARY - [0:0]", "-X KUBE-PROXY-CANARY",
                      "COMMIT"]
    assert "-D INPUT -j KUBE-FIREWALL" not in lines  # the kubelet's
    assert ('-D PREROUTING -m comment --comment "kubernetes service portals" '
            "-j KUBE-SERVICES") in lines
    assert not [line for line in lines if "PYPROXY" in line or "DOCKER" in line]
    deleted = {line[3:] for line in lines if line.startswith("-X ")}
    assert f"KUBE-SVC-{kp.SVC_WEB}" in deleted and "KUBE-MARK-MASQ" not in deleted
    # Chains are flushed (declared) before the jumps go, and deleted after.
    nat = lines[lines.index("*nat"):]
    first_delete = next(i for i, line in enumerate(nat) if line.startswith("-D "))
    assert all(line.startswith(":") for line in nat[1:first_delete])
    assert render_kube_proxy_cleanup(parse_tables(kp.FOREIGN)).lines == []


def test_cleanup_iptables_every_backend_that_works() -> None:
    fake = FakeIPTables({"iptables-nft": kp.IPTABLES_MODE, "ip6tables-nft": kp.IPTABLES_MODE_V6,
                         "iptables-legacy": kp.FOREIGN})
    tools = {f"{'ip6' if v6 else 'ip'}tables-{b}": IPTables(b, ipv6=v6, runner=fake)
             for b in Backend for v6 in (False, True)}
    report = CleanupReport()
    cleanup_iptables(report, tools)
    assert sorted(report.iptables_lines) == ["ip6tables-nft", "iptables-nft"]
    assert [tool for tool, _ in fake.restored] == ["iptables-nft-restore",
                                                  "ip6tables-nft-restore"]
    assert fake.restored[0][1] == render_kube_proxy_cleanup(parse_tables(kp.IPTABLES_MODE)).text
    assert report.errors == []


def test_kube_proxy_node_ports_leave_pyproxys_alone() -> None:
    def key(port: int, proto: Protocol = Protocol.TCP, addr: str = NODE_IP) -> VirtualServerKey:
        return VirtualServerKey(proto, addr, port)

    candidates = [key(30080), key(31080), key(30081, Protocol.UDP),
                  key(30090, Protocol.SCTP), key(30091, Protocol.SCTP)]
    ours = {
        "PYPROXY-NODE-PORT-TCP": KernelSet("bitmap:port", False,
                                           frozenset({SetEntry(port=30080)})),
        "PYPROXY-NODE-PORT-SCTP": KernelSet("hash:ip,port", False,
                                            frozenset({SetEntry(NODE_IP, "sctp", 30090)})),
    }
    assert kube_proxy_node_ports(candidates, set(), ours) == sorted([
        key(30081, Protocol.UDP), key(30091, Protocol.SCTP), key(31080)])
    # pyproxy not in IPVS mode (no sets): every NodePort virtual server is kube-proxy's
    assert len(kube_proxy_node_ports(candidates, set(), {})) == len(candidates)
    # on kube-ipvs0: decided by the address, not as a node port
    assert kube_proxy_node_ports([key(31080, addr="198.18.210.10")], {"198.18.210.10"},
                                 {}) == []


def test_cleanup_kube_proxy_command_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    report = CleanupReport({"iptables-nft": 42}, [VirtualServerKey(Protocol.TCP,
                                                                   "198.18.210.10", 80)],
                           ["KUBE-CLUSTER-IP"], dummy_removed=True)
    monkeypatch.setattr(cli, "cleanup_kube_proxy", lambda: report)
    result = invoke("cleanup", "--kube-proxy")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "iptables-nft: removed kube-proxy's chains and jumps (42 restore lines)",
        "ipvs: removed virtual server tcp/198.18.210.10:80",
        "ipset: destroyed KUBE-CLUSTER-IP",
        "link: deleted kube-ipvs0",
    ]
    report.errors.append("IPVS: Device or resource busy")
    result = invoke("cleanup", "--kube-proxy")
    assert result.exit_code == 1 and "error: IPVS: Device or resource busy" in result.output


def test_parse_save_ignores_mangle_that_parse_tables_keeps() -> None:
    assert "mangle" in parse_tables(kp.IPTABLES_MODE)
    assert set(parse_save(kp.IPTABLES_MODE).chains) == {Table.FILTER, Table.NAT}
