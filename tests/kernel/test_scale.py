"""Correctness holds at scale: 2,000 services, batched programming, a burst of changes.

A long-running pyproxy (manifests mode) programs a 2,000-service cluster in a
lab's node namespace on nf_tables, where a first programming this large is
split into one transaction per dispatch shard. A sample of services is then
checked with real traffic; a burst of changes (endpoints moved, services
added and deleted) lands as partial syncs and the sample is checked again.
The full semantics stay on: every service also has a NodePort, every tenth
session affinity, every seventh externalTrafficPolicy Local.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import cluster
from tests.kernel.lab import PYPROXY, needs_root, netlab
from tests.kernel.scenarios import NODE_IP, pods_of

pytestmark = [pytest.mark.kernel, needs_root]

SERVICES = 2000
BASE = int(ipaddress.ip_address("198.19.0.1"))
PODS = ("pod1", "pod2", "pod3")


def service(i: int, pods: tuple[str, ...] = PODS) -> list[dict[str, Any]]:
    name = f"s{i}"
    ip = str(ipaddress.ip_address(BASE + i))
    spec: dict[str, Any] = {
        "type": "NodePort", "clusterIP": ip, "clusterIPs": [ip],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                   "nodePort": 30000 + i}],
        "externalTrafficPolicy": "Local" if i % 7 == 0 else "Cluster",
    }
    if i % 10 == 0:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 300}}
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "scale"}, "spec": spec}
    eps = [cluster.endpoint(p) for p in pods]
    sl = cluster.endpoint_slice(name, eps)
    sl["metadata"]["namespace"] = "scale"
    return [svc, sl]


def objects(services: dict[int, tuple[str, ...]]) -> list[dict[str, Any]]:
    return [o for i in sorted(services) for o in service(i, services[i])]


class Agent:
    def __init__(self, lab: Any, manifests: Path, log: Path) -> None:
        self.lab, self.manifests, self.log = lab, manifests, log
        self.proc: subprocess.Popen[Any] | None = None

    def write(self, services: dict[int, tuple[str, ...]]) -> None:
        """Replace the manifests atomically, as a ConfigMap volume update would."""
        staging = self.manifests.with_name("staging")
        cluster.write(staging, objects(services))
        self.manifests.mkdir(exist_ok=True)
        for f in staging.iterdir():
            os.replace(f, self.manifests / f.name)

    def start(self) -> None:
        self.proc = self.lab.spawn(
            "node", PYPROXY, "run", "--manifests", str(self.manifests), "--hostname-override",
            cluster.NODE, "--cluster-cidr", "198.18.1.0/24", "--iptables-backend", "nft",
            "--min-sync-period", "200ms", "-v", stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"))

    def syncs(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines()
                if 'msg="iptables sync"' in line]

    def wait_syncs(self, count: int, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.syncs()
            if len(lines) >= count:
                return lines
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            time.sleep(0.2)
        raise AssertionError(f"only {len(self.syncs())} syncs after {timeout} s")

    def wait_quiet(self, seconds: float = 1.5, timeout: float = 60.0) -> None:
        """Until no sync has started for ``seconds``: the burst is fully applied."""
        deadline = time.monotonic() + timeout
        count, since = len(self.syncs()), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = len(self.syncs())
            if now != count:
                count, since = now, time.monotonic()
            elif time.monotonic() - since >= seconds:
                return
        raise AssertionError("pyproxy kept syncing")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        yield lab


def check(lab: Any, services: dict[int, tuple[str, ...]], sample: list[int]) -> None:
    for i in sample:
        ip = str(ipaddress.ip_address(BASE + i))
        want = set(services[i]) if i in services else set()
        got = pods_of(lab.probe("pod1", "tcp", ip, 80, count=12, timeout=1.0))
        if not want:
            assert got <= {"REFUSED", "TIMEOUT"}, (i, got)
            continue
        if i % 10 == 0:  # affinity: one pod, and one of the service's
            assert len(got) == 1 and got <= want, (i, got)
        else:
            assert got <= want and len(got) >= min(2, len(want)), (i, got, want)
        # NodePort from outside: eTP Local keeps to this node's endpoints (pod3 is remote).
        ext = pods_of(lab.probe("client", "tcp", NODE_IP, 30000 + i, count=8, timeout=1.0))
        local = want - {"pod3"} if i % 7 == 0 else want
        assert ext <= local | {"TIMEOUT", "REFUSED"} and (ext <= local or not local), (i, ext)


def test_two_thousand_services_batched_then_a_burst(lab: Any, tmp_path: Path) -> None:
    rng = random.Random(2000)
    services = {i: PODS for i in range(1, SERVICES + 1)}
    agent = Agent(lab, tmp_path / "manifests", tmp_path / "pyproxy.log")
    agent.write(services)
    agent.start()
    try:
        first = agent.wait_syncs(1, timeout=120)[0]
        transactions = int(re.search(r"transactions=(\d+)", first).group(1))  # type: ignore
        assert transactions > 1, f"a first programming this large must be batched: {first}"
        sample = rng.sample(sorted(services), 25) + [10, 14, 70]
        check(lab, services, sample)

        # A burst: endpoints move for 200 services, 50 go away, 50 new ones arrive.
        changed = rng.sample(sorted(services), 300)
        for i in changed[:200]:
            services[i] = tuple(sorted(rng.sample(PODS, rng.choice((1, 2)))))
        for i in changed[200:250]:
            del services[i]
        for i in range(SERVICES + 1, SERVICES + 51):
            services[i] = PODS
        before = len(agent.syncs())
        agent.write(services)
        lines = agent.wait_syncs(before + 1, timeout=60)
        assert "full=False" in lines[before], f"the burst should land as a partial sync: {lines}"
        agent.wait_quiet()
        sample = rng.sample(changed, 25) + rng.sample(range(SERVICES + 1, SERVICES + 51), 5)
        check(lab, services, sample)
        # And the kernel holds exactly what a fresh plan says (nothing half-programmed).
        out = lab.run("node", PYPROXY, "run", "--manifests", str(agent.manifests),
                      "--hostname-override", cluster.NODE, "--cluster-cidr", "198.18.1.0/24",
                      "--iptables-backend", "nft", "--once")
        assert "lines_written=0" in out.stderr, out.stderr
    finally:
        agent.stop()
        lab.run("node", PYPROXY, "cleanup", check=False)
