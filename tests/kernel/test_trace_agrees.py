"""`pyproxy trace` agrees with real traffic, on every scenario of the iptables kernel tests.

For each probe of tests/kernel/scenarios.py (a source namespace, a
destination, a protocol), real connections are made in the mini-cluster and
the outcome recorded: which pods answered and whether each saw the client's
address or a masqueraded one, or REFUSED (a REJECT) or TIMEOUT (a DROP).
Then `pyproxy trace` is asked the same question twice: against the rules as
programmed in the node namespace (iptables-save of the backend under test)
and as planned from the manifests. Both must give the same verdict, the same
set of endpoints (for session affinity: the one pod that answered is one of
them) and the same masquerade decision per endpoint. Both backends.

`pyproxy plan --diff` is checked here too, against the same programmed node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner

from pyproxy.cli import main
from tests.kernel import cluster
from tests.kernel.lab import PYPROXY, needs_root, netlab
from tests.kernel.scenarios import (
    CLIENT_IP,
    GATEWAY,
    NODE_IP,
    REFUSED,
    TIMEOUT,
    Cluster,
)

pytestmark = [pytest.mark.kernel, needs_root]

SOURCES = {"node": NODE_IP, "client": CLIENT_IP, **cluster.POD_IPS}
POD_BY_IP = {ip: pod for pod, ip in cluster.POD_IPS.items()}
CIP = cluster.CLUSTER_IPS
NP = cluster.NODE_PORTS
PLAN_FLAGS = ("--hostname-override", cluster.NODE, "--cluster-cidr", "198.18.1.0/24")


@dataclass(frozen=True)
class Probe:
    """One row of the table: who sends what where, and the verdict the scenario expects."""

    scenario: str
    ns: str
    dst: str
    port: int
    verdict: str  # ACCEPT (some pod answers), REJECT (REFUSED), DROP (TIMEOUT)
    proto: str = "tcp"

    @property
    def src(self) -> str:
        return "127.0.0.1" if self.dst == "127.0.0.1" else SOURCES[self.ns]

    def __str__(self) -> str:
        return f"{self.scenario}: {self.proto} {self.ns} -> {self.dst}:{self.port}"


PROBES = [
    Probe("cluster IP from the node", "node", CIP["web"], 80, "ACCEPT"),
    Probe("cluster IP from a pod", "pod2", CIP["web"], 80, "ACCEPT"),
    Probe("hairpin", "pod1", CIP["web"], 80, "ACCEPT"),
    Probe("node port from outside", "client", NODE_IP, NP["web"], "ACCEPT"),
    Probe("node port on localhost", "node", "127.0.0.1", NP["web"], "ACCEPT"),
    Probe("external IP", "client", cluster.EXTERNAL_IP, 80, "ACCEPT"),
    Probe("load balancer IP", "client", cluster.LB_IPS["lb"], 80, "ACCEPT"),
    Probe("load balancer node port", "client", NODE_IP, NP["lb"], "ACCEPT"),
    Probe("source ranges refuse the client", "client", cluster.LB_IPS["lbranged"], 80, "DROP"),
    Probe("source ranges admit the client", "client", cluster.LB_IPS["lballowed"], 80,
          "ACCEPT"),
    Probe("no endpoints, from the node", "node", CIP["empty"], 80, "REJECT"),
    Probe("no endpoints, from a pod", "pod1", CIP["empty"], 80, "REJECT"),
    Probe("session affinity from pod1", "pod1", CIP["sticky"], 80, "ACCEPT"),
    Probe("session affinity from pod2", "pod2", CIP["sticky"], 80, "ACCEPT"),
    Probe("session affinity from the node", "node", CIP["sticky"], 80, "ACCEPT"),
    Probe("UDP service", "pod1", CIP["dns"], 53, "ACCEPT", proto="udp"),
    Probe("UDP service from the node", "node", CIP["dns"], 53, "ACCEPT", proto="udp"),
    Probe("not-ready endpoint", "node", CIP["notready"], 80, "ACCEPT"),
    Probe("terminating fallback", "node", CIP["terminating"], 80, "ACCEPT"),
    Probe("multi-port, first port", "node", CIP["multi"], 80, "ACCEPT"),
    Probe("multi-port, second port", "node", CIP["multi"], 81, "ACCEPT"),
    Probe("eTP Local from outside", "client", NODE_IP, NP["local"], "ACCEPT"),
    Probe("eTP Local from a pod", "pod2", CIP["local"], 80, "ACCEPT"),
    Probe("eTP Local without a local endpoint", "client", NODE_IP, NP["localnone"], "DROP"),
    Probe("eTP Local without a local endpoint, from a pod", "pod1", CIP["localnone"], 80,
          "ACCEPT"),
]


@dataclass(frozen=True)
class Outcome:
    verdict: str
    masquerade: dict[str, bool]  # pod -> masqueraded
    sticky: bool = False

    @property
    def pods(self) -> set[str]:
        return set(self.masquerade)


def observe(k: Cluster, probe: Probe) -> Outcome:
    """What real traffic does (60 connections, enough to reach each of 3 pods; a few
    when the scenario expects no answer)."""
    served = probe.verdict == "ACCEPT"
    replies = k.probe(probe.ns, probe.dst, probe.port, count=60 if served else 3,
                      proto=probe.proto, timeout=1.0 if served else 0.5)
    if set(replies) == {REFUSED}:
        return Outcome("REJECT", {})
    if set(replies) == {TIMEOUT}:
        return Outcome("DROP", {})
    masq: dict[str, bool] = {}
    for reply in replies:
        pod, _, peer = reply.partition(" ")
        assert pod in POD_BY_IP.values(), f"{probe}: unexpected reply {reply!r} in {replies}"
        seen = peer != probe.src
        assert masq.setdefault(pod, seen) == seen, f"{probe}: masquerade varies for {pod}"
        if seen:
            assert peer == GATEWAY, f"{probe}: masqueraded to {peer}"
    return Outcome("ACCEPT", masq)


def predicted(doc: dict[str, Any]) -> Outcome:
    masq = {POD_BY_IP[e["endpoint"].rsplit(":", 1)[0]]: e["masquerade"]
            for e in doc["endpoints"]}
    return Outcome(doc["verdict"], masq, doc["affinity"])


def agree(probe: Probe, real: Outcome, traced: Outcome, where: str) -> None:
    context = f"{probe} ({where}): traffic {real}, trace {traced}"
    assert traced.verdict == real.verdict, context
    if real.verdict != "ACCEPT":
        return
    if traced.sticky:
        assert len(real.pods) == 1 and real.pods <= traced.pods, context
    else:
        assert real.pods == traced.pods, context
    for pod in real.pods:
        assert traced.masquerade[pod] == real.masquerade[pod], context


def trace_args(probe: Probe) -> list[str]:
    return ["trace", "--json", "--src", probe.src, "--dst", f"{probe.dst}:{probe.port}",
            "--proto", probe.proto]


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """`pyproxy trace` run in-process sets up logging on the root logger; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module", params=["legacy", "nft"])
def k(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
      ) -> Iterator[Cluster]:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        c = Cluster(lab, request.param, tmp_path_factory.mktemp(f"trace-{request.param}"))
        c.sync()
        yield c


@pytest.mark.parametrize("probe", PROBES, ids=[p.scenario for p in PROBES])
def test_trace_agrees_with_traffic(k: Cluster, probe: Probe) -> None:
    real = observe(k, probe)
    assert real.verdict == probe.verdict, f"{probe}: traffic gave {real}"
    # As programmed: iptables-save in the node namespace, its interfaces' addresses.
    kernel = k.lab.run("node", PYPROXY, *trace_args(probe),
                       "--iptables-backend", k.backend)
    kernel_doc = json.loads(kernel.stdout)
    assert kernel_doc["rules"] == f"kernel (iptables-{k.backend})"
    agree(probe, real, predicted(kernel_doc), "as programmed")
    # As planned from the manifests: no kernel read at all.
    planned = CliRunner().invoke(main, [*trace_args(probe), "--manifests", str(k.manifests),
                                        *PLAN_FLAGS])
    assert planned.exit_code == 0, planned.output
    planned_doc = json.loads(planned.stdout)
    assert planned_doc["rules"] == "manifests"
    agree(probe, real, predicted(planned_doc), "as planned")
    if real.verdict != "ACCEPT":
        # The reason is the rule's comment, e.g. "t/empty:http has no endpoints".
        assert kernel_doc["reasons"] and planned_doc["reasons"] == kernel_doc["reasons"]


def test_trace_text_output_names_the_rejecting_rule(k: Cluster) -> None:
    out = k.lab.run("node", PYPROXY, "trace", "--src", NODE_IP,
                    "--dst", f"{CIP['empty']}:80", "--iptables-backend", k.backend).stdout
    lines = out.splitlines()
    assert lines[0] == f"packet:     tcp {NODE_IP} -> {CIP['empty']}:80 (from this node)"
    assert "verdict:    REJECT" in lines
    assert any("[t/empty:http has no endpoints]" in line for line in lines)


# -- plan --diff -------------------------------------------------------------------------------


def plan_diff(k: Cluster) -> str:
    result = k.lab.run("node", PYPROXY, "plan", "--diff", "--manifests",
                       str(k.manifests), *PLAN_FLAGS, "--iptables-backend", k.backend)
    return result.stdout


def test_plan_diff_is_empty_when_in_sync(k: Cluster) -> None:
    assert plan_diff(k) == ""


def test_plan_diff_shows_drift_and_the_sync_that_repairs_it(k: Cluster) -> None:
    ipt = f"iptables-{k.backend}"
    jump = ["-m", "comment", "--comment", "pyproxy service portals", "-j", "PYPROXY-SERVICES"]
    k.lab.run("node", ipt, "-t", "nat", "-D", "PREROUTING", *jump)
    k.lab.run("node", ipt, "-t", "filter", "-A", "PYPROXY-FORWARD", "-s", "198.18.250.9/32",
              "-j", "DROP")
    try:
        diff = plan_diff(k).splitlines()
        assert "--- nat/PREROUTING" in diff
        assert ('+ -A PREROUTING -m comment --comment "pyproxy service portals" '
                "-j PYPROXY-SERVICES") in diff
        assert "--- filter/PYPROXY-FORWARD" in diff
        assert "- -A PYPROXY-FORWARD -s 198.18.250.9/32 -j DROP" in diff
        assert len(diff) == 4, diff
    finally:
        k.sync()
    assert plan_diff(k) == ""


def test_plan_diff_shows_what_a_manifest_change_would_do(k: Cluster) -> None:
    objs = cluster.objects()
    for obj in objs:
        if obj["kind"] == "EndpointSlice" and obj["metadata"]["name"] == "notready-a":
            obj["endpoints"] = [cluster.endpoint("pod1"), cluster.endpoint("pod2")]
    cluster.write(k.manifests, objs)
    try:
        diff = plan_diff(k).splitlines()
        new_sep = [line for line in diff if line.startswith("--- nat/PYPROXY-SEP-")]
        assert new_sep and all(line.endswith("(new chain)") for line in new_sep), diff
        assert "+ -A " in "\n".join(diff) and "DNAT --to-destination 198.18.1.2:8080" in \
            "\n".join(diff)
        # Nothing was written: traffic still reaches pod1 only.
        replies = k.probe("node", CIP["notready"], 80, count=10)
        assert {r.split()[0] for r in replies} == {"pod1"}
    finally:
        cluster.write(k.manifests, cluster.objects())
    assert plan_diff(k) == ""
