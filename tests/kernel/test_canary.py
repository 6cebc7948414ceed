"""Rules flushed by someone else come back without waiting for the periodic resync.

kube-proxy keeps a canary chain for this; so does pyproxy (PYPROXY-CANARY). A
long-running pyproxy with a syncPeriod far longer than the test must notice a
`iptables -F; iptables -X` (what a firewalld reload does) within seconds.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.kernel import cluster
from tests.kernel.lab import PYPROXY, needs_root, netlab
from tests.kernel.scenarios import NODE_IP, PODS, pods_of

pytestmark = [pytest.mark.kernel, needs_root]


def test_flushed_tables_are_repaired_within_seconds(tmp_path: Path) -> None:
    with netlab.Lab() as lab:
        lab.start_echo_all()
        cluster.write(tmp_path / "m", cluster.objects())
        log = (tmp_path / "pyproxy.log").open("w")
        proc = lab.spawn("node", PYPROXY, "run", "--manifests", str(tmp_path / "m"),
                         "--hostname-override", cluster.NODE, "--cluster-cidr",
                         "198.18.1.0/24", "--iptables-backend", "nft", "--sync-period", "10m",
                         stdout=subprocess.DEVNULL, stderr=log)
        try:
            web = (NODE_IP, cluster.NODE_PORTS["web"])
            deadline = time.monotonic() + 20
            while pods_of(lab.probe("client", "tcp", *web, count=3, timeout=0.5)) != PODS:
                assert time.monotonic() < deadline, (tmp_path / "pyproxy.log").read_text()
            for table in ("nat", "filter"):
                lab.run("node", "iptables-nft", "-t", table, "-F")
                lab.run("node", "iptables-nft", "-t", table, "-X")
            assert "PYPROXY" not in lab.run("node", "iptables-nft-save").stdout
            flushed = time.monotonic()
            while pods_of(lab.probe("client", "tcp", *web, count=3, timeout=0.5)) != PODS:
                assert time.monotonic() - flushed < 15, (tmp_path / "pyproxy.log").read_text()
            assert "canary chain is gone" in (tmp_path / "pyproxy.log").read_text()
        finally:
            proc.terminate()
            proc.wait(10)
            lab.run("node", PYPROXY, "cleanup", check=False)
