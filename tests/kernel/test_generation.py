"""A periodic resync on nf_tables reads the kernel only when someone else committed.

The dataplane runs in the lab's node namespace (the driver below is this
module run with ``python -m`` there) against the real nf_tables backend. It counts
the iptables-save calls it makes: after its own writes, a full resync must
prove the kernel unchanged by the generation id and not read it; after any
foreign commit (a flushed service chain, a rule in an unrelated IPv6 table)
the next full resync must read the kernel, and repair what it finds.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import cluster
from tests.kernel.lab import ROOT, needs_root, netlab

pytestmark = [pytest.mark.kernel, needs_root]


def drive() -> list[dict[str, Any]]:
    """The scenario, run in the node namespace; one record per sync."""
    from pyproxy.iptables.generation import read_generation
    from pyproxy.iptables.plan import PlanContext
    from pyproxy.iptables.restore import Backend, IPTables, _run
    from pyproxy.iptables.ruleset import Table, parse_save
    from pyproxy.iptables.sync import IPTablesDataplane
    from pyproxy.model import parse_node
    from pyproxy.tracker import ChangeTracker

    saves: list[str] = []
    meanwhile: list[list[str]] = []  # commits another program makes just before a restore

    def runner(argv: list[str], stdin: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if argv[0].endswith("-save"):
            saves.append(argv[0])
        if argv[0].endswith("-restore"):
            while meanwhile:
                iptables(*meanwhile.pop())
        return _run(argv, stdin, timeout)

    objs = cluster.objects()
    tracker = ChangeTracker(cluster.NODE)
    tracker.replace([o for o in objs if o["kind"] == "Service"],
                    [o for o in objs if o["kind"] == "EndpointSlice"])
    ctx = PlanContext(node=parse_node(cluster.node()),
                      cluster_cidrs=(ipaddress.ip_network("198.18.1.0/24"),))
    ipt = IPTables(Backend.NFT, runner=runner, generation_reader=read_generation)
    dataplane = IPTablesDataplane(ipt, ctx)
    records: list[dict[str, Any]] = []

    def sync(step: str, full: bool) -> None:
        before = len(saves)
        result = dataplane.sync(tracker.checkout(), full=full)
        kernel = parse_save(_run(["iptables-nft-save"]).stdout)
        assert dataplane.applied is not None
        records.append({
            "step": step, "saves": len(saves) - before, "kernel_read": result.kernel_read,
            "lines": result.lines_written,
            # what pyproxy owns in the kernel now equals what it planned
            "converged": all(kernel.table(t).get(c) == rules
                             for t in (Table.FILTER, Table.NAT)
                             for c, rules in dataplane.applied.table(t).items()),
        })

    def iptables(*argv: str) -> None:
        subprocess.run(list(argv), check=True, capture_output=True)

    sync("first", True)
    sync("resync", True)
    web = next(o for o in objs if o["kind"] == "EndpointSlice"
               and o["metadata"]["labels"]["kubernetes.io/service-name"] == "web")
    web["endpoints"] = web["endpoints"][:1]
    tracker.set_slice(web)
    sync("partial", False)
    sync("resync after partial", True)
    assert dataplane.applied is not None
    svc = next(c for c in dataplane.applied.table(Table.NAT) if c.startswith("PYPROXY-SVC-"))
    iptables("iptables-nft", "-t", "nat", "-F", svc)
    sync("resync after a chain was flushed", True)
    sync("resync after the repair", True)
    iptables("ip6tables-nft", "-t", "filter", "-N", "SOMEONE-ELSE")
    sync("resync after an unrelated ip6tables commit", True)
    sync("resync once more", True)
    # a commit that lands during pyproxy's own write: the count of commits betrays it
    meanwhile.append(["ip6tables-nft", "-t", "filter", "-N", "SOMEONE-ELSE-2"])
    web["endpoints"] = web["endpoints"][:0]
    tracker.set_slice(web)
    sync("partial racing another writer", False)
    sync("resync after the race", True)
    return records


def test_resync_reads_the_kernel_only_after_foreign_commits(tmp_path: Path) -> None:
    with netlab.Lab() as lab:
        out = lab.run("node", sys.executable, "-m", __name__, timeout=120, cwd=ROOT).stdout
    records = {r["step"]: r for r in json.loads(out)}
    assert all(r["converged"] for r in records.values()), records
    read = {step: (r["kernel_read"], r["saves"]) for step, r in records.items()}
    assert read == {
        "first": (True, 1),
        "resync": (False, 0),
        "partial": (False, 0),
        "resync after partial": (False, 0),
        "resync after a chain was flushed": (True, 1),
        "resync after the repair": (False, 0),
        "resync after an unrelated ip6tables commit": (True, 1),
        "resync once more": (False, 0),
        "partial racing another writer": (False, 0),
        "resync after the race": (True, 1),
    }, records
    assert records["resync"]["lines"] == 0
    assert records["partial"]["lines"] > 0
    assert records["resync after a chain was flushed"]["lines"] > 0  # the chain was rewritten
    assert records["resync after an unrelated ip6tables commit"]["lines"] == 0


if __name__ == "__main__":
    print(json.dumps(drive()))
