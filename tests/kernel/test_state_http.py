"""`/state` over HTTP from a running `pyproxy run` (manifests mode) in a network namespace.

The agent runs in the lab's node namespace with its default metrics address
(127.0.0.1:10249); the page is fetched from inside that namespace, next to
/metrics. A manifest change shows up in the page after the next sync.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import cluster
from tests.kernel.lab import PYPROXY, needs_root, netlab

pytestmark = [pytest.mark.kernel, needs_root]

FETCH = """
import sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:10249" + sys.argv[1], timeout=5) as r:
    sys.stdout.write(r.headers.get("Content-Type") + "\\n" + r.read().decode())
"""


class Agent:
    def __init__(self, lab: Any, manifests: Path, log: Path) -> None:
        self.lab = lab
        self.log = log.open("w")
        self.proc = lab.spawn("node", PYPROXY, "run", "--manifests", str(manifests),
                              "--hostname-override", cluster.NODE,
                              "--cluster-cidr", "198.18.1.0/24",
                              "--iptables-backend", "legacy", "--min-sync-period", "0s",
                              stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str) -> tuple[str, str]:
        out = self.lab.run("node", sys.executable, "-c", FETCH, path, check=False)
        if out.returncode != 0:
            raise ConnectionError(out.stderr[-300:])
        content_type, _, body = out.stdout.partition("\n")
        return content_type, body

    def state(self, until: Any = lambda doc: doc["lastSync"] is not None,
              timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-2000:]
            try:
                last = json.loads(self.get("/state")[1])
                if until(last):
                    return dict(last)
            except ConnectionError as err:
                last = err
            time.sleep(0.2)
        raise AssertionError(f"/state never got there: {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        cluster.write(tmp_path / "manifests", cluster.objects())
        a = Agent(lab, tmp_path / "manifests", tmp_path / "pyproxy.log")
        try:
            yield a
        finally:
            a.stop()
            lab.run("node", PYPROXY, "cleanup", check=False)


def by_service(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["service"]: entry for entry in doc["servicePorts"]}


def test_state_served_next_to_metrics(agent: Agent) -> None:
    doc = agent.state()
    content_type, _ = agent.get("/state")
    assert content_type.startswith("application/json")
    assert agent.get("/metrics")[1].count("kubeproxy_sync_proxy_rules") > 0
    assert doc["node"] == cluster.NODE and doc["mode"] == "iptables"
    assert doc["lastSync"]["full"] is True and doc["lastFullSync"] is not None
    ports = by_service(doc)
    web = ports["t/web:http/TCP"]
    assert web["addresses"] == {"clusterIP": "198.18.200.10:80", "nodePort": 30080}
    assert [e["address"] for e in web["endpoints"]["inUse"]] == [
        "198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8080"]
    assert any(c.startswith("PYPROXY-SVC-") for c in web["chains"])
    notready = ports["t/notready:http/TCP"]
    assert [(e["address"], e["reason"]) for e in notready["endpoints"]["notInUse"]] == [
        ("198.18.1.2:8080", "not ready")]
    local = ports["t/local:http/TCP"]
    remote = next(e for e in local["endpoints"]["inUse"] if e["address"] == "198.18.1.3:8080")
    assert remote["notForExternal"] == "not local (externalTrafficPolicy: Local)"
    assert ports["t/empty:http/TCP"]["status"] == "no endpoints: connections are rejected"


def test_state_follows_a_manifest_change(agent: Agent) -> None:
    first = agent.state()
    objs = cluster.objects()
    for obj in objs:
        if obj["kind"] == "EndpointSlice" and obj["metadata"]["name"] == "web-a":
            obj["endpoints"] = [cluster.endpoint("pod1"),
                                cluster.endpoint("pod2", ready=False, serving=True,
                                                 terminating=True)]
    cluster.write(Path(agent.proc.args[agent.proc.args.index("--manifests") + 1]), objs)

    def changed(doc: dict[str, Any]) -> bool:
        web = by_service(doc)["t/web:http/TCP"]
        return len(web["endpoints"]["inUse"]) == 1

    doc = agent.state(until=changed)
    assert doc["lastSync"]["unix"] > first["lastSync"]["unix"]
    web = by_service(doc)["t/web:http/TCP"]
    assert [(e["address"], e["reason"]) for e in web["endpoints"]["notInUse"]] == [
        ("198.18.1.2:8080", "terminating (used only as fallback, while no endpoint is ready)")]
