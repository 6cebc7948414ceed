"""IPVS partial syncs against the kernel: a long-running pyproxy follows endpoint changes.

`run --once` always does a full sync; this drives the partial path (read back
only what changed, write set members blind) through a real agent.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.kernel import cluster
from tests.kernel.lab import PYPROXY
from tests.kernel.scenarios import PODS, pods_of


def write(directory: Path, objs: list[dict[str, Any]]) -> None:
    """Atomically, as a ConfigMap volume update would (no half-written directory)."""
    staging = directory.with_name(directory.name + "-staging")
    cluster.write(staging, objs)
    directory.mkdir(exist_ok=True)
    for f in staging.iterdir():
        os.replace(f, directory / f.name)


def test_endpoint_changes_land_as_partial_syncs(lab: Any, tmp_path: Path) -> None:
    manifests, log = tmp_path / "m", tmp_path / "pyproxy.log"
    write(manifests, cluster.objects())
    proc = lab.spawn("node", PYPROXY, "run", "--mode", "ipvs", "--iptables-backend", "legacy",
                     "--manifests", str(manifests), "--hostname-override", cluster.NODE,
                     "--cluster-cidr", "198.18.1.0/24", "--min-sync-period", "200ms", "-v",
                     stdout=subprocess.DEVNULL, stderr=log.open("w"))
    vip = cluster.CLUSTER_IPS["web"]

    def served(want: set[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            got = pods_of(lab.probe("pod1", "tcp", vip, 80, count=12, timeout=1.0))
            if got == want:
                return
            assert time.monotonic() < deadline, (got, log.read_text()[-3000:])
            assert proc.poll() is None, log.read_text()[-3000:]

    try:
        served(PODS)
        objs = cluster.objects()
        for obj in objs:
            if obj["kind"] == "EndpointSlice" and obj["metadata"]["name"] == "web-a":
                obj["endpoints"] = [cluster.endpoint("pod1"), cluster.endpoint("pod2")]
        write(manifests, objs)
        served({"pod1", "pod2"})
        write(manifests, cluster.objects())
        served(PODS)
        text = log.read_text()
        assert 'msg="ipvs sync" full=False' in text, text[-3000:]
        assert "Traceback" not in text and "sync failed" not in text, text[-3000:]
    finally:
        proc.terminate()
        proc.wait(10)
        lab.run("node", PYPROXY, "cleanup", check=False)
