#!/usr/bin/env python3
"""pyproxy's benchmark: large synthetic clusters programmed into real kernels, against the floor.

Why it is built this way (see ../shared/TESTING.md, "Benchmarks are not tests"):

- The machines are shared and noisy, so absolute times mean little on their
  own. Every pyproxy figure is printed next to the *floor* measured in the same
  run: the bare ``iptables-<backend>-restore --noflush`` of exactly the payload
  pyproxy wrote (captured from its own restore calls), replayed in an equally
  fresh namespace, in the same order, so the table state each restore meets is
  the same. The ratio pyproxy/floor is what the targets of issue 5 are about.
- All kernel work happens in network namespaces created here and deleted
  afterwards. The bench re-executes itself as a *worker* inside each namespace
  (``ip netns exec NS python bench.py --worker KIND``, parameters as JSON on
  stdin, result as JSON on stdout), so pyproxy's own code spawns its
  iptables programs exactly as it does on a node.
- One fresh worker process per measurement group, so the peak RSS of one size
  is not inherited by the next and nothing is cached between groups.
- Targets are printed as PASS/MISS; a miss never fails the script.

The sections run in the order of SECTIONS; each returns table rows tagged with
the table (dataplane) they belong to.

The IPVS section runs where IPVS is: one boot of the User-mode Linux kernel
(scripts/uml.py), in which this script runs again (``--ipvs-guest DIR``, DIR on
the host's filesystem since the guest's /tmp is its own) and measures, each in a
fresh namespace of that kernel, ``ipvsadm --restore`` of the configuration
pyproxy will program, pyproxy's IPVS dataplane (full sync, endpoint changes,
idle resync) and the floor again. Only ratios within that one boot mean anything.

Run as root::

    .venv/bin/python scripts/bench.py --quick
    .venv/bin/python scripts/bench.py --backend nft --sizes 1000,5000,10000 --json out.json
    .venv/bin/python scripts/bench.py --only ipvs      # or --no-ipvs to leave it out
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import ipaddress
import itertools
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()

JSON = dict[str, Any]

# -- the synthetic cluster's addresses (all inside 198.18.0.0/15, TESTING.md) ----------------

NODE_NAME = "bench-node"
NODES = 20  # endpoints are spread over 20 nodes; node 0 is this one, so 1 in 20 is local
NODE_IP = "198.19.255.1"
POD_CIDR = "198.18.0.0/16"
_PODS = int(ipaddress.IPv4Address("198.18.0.0"))
POD_SLOTS = 60_000  # pod addresses 198.18.0.1 ...; replacements come from above them
ALT_SLOTS = 65_534 - POD_SLOTS
_CLUSTER_IPS = int(ipaddress.IPv4Address("198.19.0.0"))  # /18: 16,383 services
_EXTERNAL_IPS = int(ipaddress.IPv4Address("198.19.64.0"))
_LB_IPS = int(ipaddress.IPv4Address("198.19.128.0"))
MAX_SERVICES = 16_383
# The second range holds the node's address: kube-proxy's "allow from node" path.
SOURCE_RANGES = ("198.19.192.0/24", "198.19.255.0/24")
NODE_PORT_BASE, NODE_PORTS = 30000, 2000
HEALTH_CHECK_BASE, HEALTH_CHECKS = 32000, 700
SLICE_SIZE = 100  # the EndpointSlice controller's default maximum
SEQ_ANNOTATION = "bench.pyproxy.io/seq"

# One in every 100 services, by i % 100: mostly ClusterIP, then the rest of the semantics.
_KINDS: tuple[tuple[range, str], ...] = (
    (range(0, 70), "clusterip"),
    (range(70, 75), "two-ports"),
    (range(75, 80), "udp"),
    (range(80, 90), "nodeport"),
    (range(90, 93), "affinity"),
    (range(93, 94), "nodeport-local"),
    (range(94, 95), "nodeport-local-none"),  # eTP Local with no local endpoint: DROP rules
    (range(95, 97), "external-ip"),
    (range(97, 98), "lb-ranges"),
    (range(98, 99), "lb-local"),
    (range(99, 100), "lb"),
)
_NODE_PORT_KINDS = ("nodeport", "nodeport-local", "nodeport-local-none", "lb-ranges",
                    "lb-local", "lb")
_NODE_PORT_RANKS = {r: n for n, r in enumerate(
    r for rng, kind in _KINDS if kind in _NODE_PORT_KINDS for r in rng)}


def kind_of(i: int) -> str:
    """Which kind of Service number ``i`` is (the mix repeats every 100 services)."""
    r = i % 100
    for rng, kind in _KINDS:
        if r in rng:
            return kind
    raise AssertionError(r)


def _ip(base: int, offset: int) -> str:
    return str(ipaddress.IPv4Address(base + offset))


def pod_ip(slot: int) -> str:
    return _ip(_PODS, 1 + slot % POD_SLOTS)


def alt_ip(variant: int) -> str:
    """A replacement endpoint address, never one of the original pods'."""
    return _ip(_PODS, 1 + POD_SLOTS + variant % ALT_SLOTS)


def service_key(i: int) -> tuple[str, str]:
    return f"ns-{i // 50:03d}", f"svc-{i:05d}"


def service_object(i: int) -> JSON:
    """Service number ``i`` as the API serves it (defaults filled in, as the server does)."""
    if not 0 <= i < MAX_SERVICES:
        raise ValueError(f"service index {i} out of range (at most {MAX_SERVICES})")
    ns, name = service_key(i)
    kind = kind_of(i)
    block = i // 100
    ports: list[JSON] = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    if kind == "two-ports":
        ports.append({"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"})
    elif kind == "udp":
        ports = [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
    spec: JSON = {"type": "ClusterIP", "clusterIP": _ip(_CLUSTER_IPS, 1 + i),
                  "clusterIPs": [_ip(_CLUSTER_IPS, 1 + i)], "ipFamilies": ["IPv4"],
                  "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"}
    obj: JSON = {"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
                 "spec": spec, "status": {"loadBalancer": {}}}
    if kind in _NODE_PORT_KINDS:
        spec["type"] = "LoadBalancer" if kind.startswith("lb") else "NodePort"
        spec["externalTrafficPolicy"] = "Local" if "local" in kind else "Cluster"
        rank = _NODE_PORT_RANKS[i % 100]
        ports[0]["nodePort"] = NODE_PORT_BASE + (block * len(_NODE_PORT_RANKS) + rank) % NODE_PORTS
    if kind.startswith("lb"):
        spec["allocateLoadBalancerNodePorts"] = True
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": _ip(_LB_IPS, 1 + i),
                                                       "ipMode": "VIP"}]}}
    if kind == "lb-ranges":
        spec["loadBalancerSourceRanges"] = [SOURCE_RANGES[0]]
    if kind == "lb-local":
        spec["loadBalancerSourceRanges"] = list(SOURCE_RANGES)
        spec["healthCheckNodePort"] = HEALTH_CHECK_BASE + block % HEALTH_CHECKS
    if kind == "affinity":
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
    if kind == "external-ip":
        spec["externalIPs"] = [_ip(_EXTERNAL_IPS, 1 + i)]
    spec["ports"] = ports
    return obj


def _endpoint(i: int, j: int, n: int, address: str) -> JSON:
    kind = kind_of(i)
    node = (i + j) % NODES
    if kind in ("nodeport-local", "lb-local") and j == 0:
        node = 0
    elif kind == "nodeport-local-none":
        node = 1 + (i + j) % (NODES - 1)
    conditions: JSON = {"ready": True, "serving": True, "terminating": False}
    if j == n - 1 and n > 1 and i % 10 == 3:  # a pod still starting
        conditions = {"ready": False, "serving": False, "terminating": False}
    elif j == n - 1 and n > 1 and i % 10 == 7:  # a pod shutting down
        conditions = {"ready": False, "serving": True, "terminating": True}
    node_name = NODE_NAME if node == 0 else f"node-{node:02d}"
    return {"addresses": [address], "conditions": conditions, "nodeName": node_name,
            "zone": f"zone-{node % 3}",
            "targetRef": {"kind": "Pod", "namespace": service_key(i)[0],
                          "name": f"{service_key(i)[1]}-{j}"}}


def slice_objects(i: int, endpoints: int, *, changes: Mapping[int, int] | None = None,
                  seq: int | None = None, only: int | None = None) -> list[JSON]:
    """Service ``i``'s EndpointSlices (100 endpoints each), as the controller writes them.

    ``changes`` maps endpoint ``j`` to a replacement address variant: a pod
    replaced by another, which is what "one endpoint changed" means here.
    ``seq`` is stamped into an annotation so a watcher can tell which write it
    got; ``only`` generates just that slice (the one a change touches).
    """
    ns, name = service_key(i)
    kind = kind_of(i)
    changes = changes or {}
    ports: list[JSON] = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    if kind == "two-ports":
        ports.append({"name": "https", "port": 8443, "protocol": "TCP"})
    elif kind == "udp":
        ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    out: list[JSON] = []
    for s, start in enumerate(range(0, max(endpoints, 1), SLICE_SIZE)):
        if only is not None and s != only:
            continue
        eps = []
        for j in range(start, min(start + SLICE_SIZE, endpoints)):
            address = alt_ip(changes[j]) if j in changes else pod_ip(i * endpoints + j)
            eps.append(_endpoint(i, j, endpoints, address))
        meta: JSON = {"name": f"{name}-{s:03d}", "namespace": ns,
                      "labels": {"kubernetes.io/service-name": name,
                                 "endpointslice.kubernetes.io/managed-by":
                                     "endpointslice-controller.k8s.io"}}
        if seq is not None:
            meta["annotations"] = {SEQ_ANNOTATION: str(seq)}
        out.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": meta, "addressType": "IPv4", "endpoints": eps,
                    "ports": ports})
    return out


def node_object() -> JSON:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": {"topology.kubernetes.io/zone": "zone-0",
                                                       "kubernetes.io/hostname": NODE_NAME}},
            "spec": {"podCIDR": "198.18.0.0/24", "podCIDRs": ["198.18.0.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP},
                                     {"type": "Hostname", "address": NODE_NAME}]}}


@dataclass(frozen=True)
class Shape:
    """A synthetic cluster: ``services`` Services × ``endpoints`` endpoints each."""

    services: int
    endpoints: int

    @property
    def label(self) -> str:
        return f"{self.services:,} svc × {self.endpoints:,} ep"

    def services_objects(self) -> Iterator[JSON]:
        return (service_object(i) for i in range(self.services))

    def slice_objects(self) -> Iterator[JSON]:
        return (sl for i in range(self.services) for sl in slice_objects(i, self.endpoints))

    def one_endpoint_targets(self, k: int) -> list[int]:
        """``k`` plain TCP ClusterIP services spread over the cluster (i % 100 == 5)."""
        if self.services < 100:
            return [0] * k
        step = self.services // k
        return [(n * step) // 100 * 100 + 5 for n in range(k)]

    def many_targets(self, k: int, seed: int = 100) -> list[int]:
        """``k`` distinct services picked at random: every kind of the mix."""
        return sorted(random.Random(seed).sample(range(self.services), min(k, self.services)))


@dataclass
class Edits:
    """Endpoint replacements so far, per service: each edit changes exactly one endpoint."""

    shape: Shape
    by_service: dict[int, dict[int, int]] = field(default_factory=dict)
    _variants: Iterator[int] = field(default_factory=itertools.count)

    def change(self, i: int, j: int, seq: int | None = None) -> JSON:
        """Replace endpoint ``j`` of service ``i``; return the one slice that changed."""
        changes = self.by_service.setdefault(i, {})
        changes[j] = next(self._variants)
        return slice_objects(i, self.shape.endpoints, changes=changes, seq=seq,
                             only=j // SLICE_SIZE)[0]


# -- results: rows, formatting, targets (pure) -----------------------------------------------


@dataclass
class Row:
    """One line of a printed table; ``table`` says which table (dataplane) it goes to."""

    table: str
    group: str
    what: str
    value: str
    floor: str = ""
    ratio: str = ""
    target: str = ""
    result: str = ""


def fmt_s(seconds: float | None) -> str:
    """Durations in the unit that keeps three significant digits readable."""
    if seconds is None:
        return "–"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def ratio_of(value: float | None, floor: float | None) -> float | None:
    if value is None or floor is None or floor <= 0:
        return None
    return value / floor


def verdict(value: float | None, limit: float) -> str:
    """PASS/MISS against an upper bound; a missing measurement is neither."""
    if value is None:
        return "n/a"
    return "PASS" if value <= limit else "MISS"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), nearest-rank, as latency SLOs are usually read."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


_HEADER = ("size", "measurement", "pyproxy", "floor (bare tool)", "ratio", "target", "result")


def format_tables(rows: Sequence[Row]) -> str:
    """One markdown table per ``Row.table``, in the order tables first appear."""
    tables: dict[str, list[Row]] = {}
    for row in rows:
        tables.setdefault(row.table, []).append(row)
    out: list[str] = []
    for name, body in tables.items():
        out.append(f"### {name}")
        out.append("")
        out.append("| " + " | ".join(_HEADER) + " |")
        out.append("| " + " | ".join("---" for _ in _HEADER) + " |")
        for r in body:
            cells = (r.group, r.what, r.value, r.floor, r.ratio, r.target, r.result)
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


# -- kernel helpers, used by workers (inside a namespace) ------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Call:
    argv: list[str]
    seconds: float
    returncode: int
    lines: int


class RecordingRunner:
    """pyproxy's own iptables runners (restore._run and restore._read_lines), timing each
    program they spawn.

    Restore payloads are written to ``outdir`` so the floor can replay them
    byte for byte; the time spent writing them is counted in ``overhead`` and
    subtracted from pyproxy's figures, and the text is not kept in memory, so
    peak RSS stays pyproxy's own.
    """

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.calls: list[Call] = []
        self.files: list[str] = []
        self.overhead = 0.0
        self.label = "payload"
        self._n = itertools.count()

    def __call__(self, argv: Sequence[str], stdin: str | Iterable[str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        from pyproxy.iptables.restore import _run

        if stdin is None or "restore" not in argv[0]:
            t0 = time.perf_counter()
            proc = _run(argv, stdin, timeout)
            self.calls.append(Call(list(argv), time.perf_counter() - t0, proc.returncode, 0))
            return proc
        path = self.outdir / f"{self.label}-{next(self._n):03d}.txt"
        lines, copying = 0, 0.0

        def tee(pieces: Iterable[str]) -> Iterator[str]:
            # Pieces may be rendered as they are written (a streamed payload): copy each
            # to the file on its way to the tool, and count the copying as overhead.
            nonlocal lines, copying
            for piece in pieces:
                c0 = time.perf_counter()
                out.write(piece)
                lines += piece.count("\n")
                copying += time.perf_counter() - c0
                yield piece

        with path.open("w") as out:
            t0 = time.perf_counter()
            proc = _run(argv, tee([stdin] if isinstance(stdin, str) else stdin), timeout)
            t1 = time.perf_counter()
        self.calls.append(Call(list(argv), t1 - t0 - copying, proc.returncode, lines))
        self.files.append(str(path))
        self.overhead += copying + time.perf_counter() - t1
        return proc

    def lines(self, argv: Sequence[str]) -> Iterator[str]:
        """restore._read_lines (IPTables.line_reader), timed while it waits for lines.

        The reader parses as the program prints, so only the time spent inside
        the reader counts as the program's, not the parsing in between.
        """
        from pyproxy.iptables.restore import _read_lines

        reader = _read_lines(argv)
        seconds, count = 0.0, 0
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    line = next(reader)
                except StopIteration:
                    break
                finally:
                    seconds += time.perf_counter() - t0
                count += 1
                yield line
        finally:
            reader.close()
            self.calls.append(Call(list(argv), seconds, 0, count))

    def mark(self, label: str) -> tuple[int, int, float]:
        """Start a step: later calls and files belong to ``label``."""
        self.label = label
        return len(self.calls), len(self.files), self.overhead

    def since(self, mark: tuple[int, int, float]) -> JSON:
        calls = self.calls[mark[0]:]
        return {
            "restore_s": sum(c.seconds for c in calls if "restore" in c.argv[0]),
            "save_s": sum(c.seconds for c in calls if "save" in c.argv[0]),
            "restores": sum(1 for c in calls if "restore" in c.argv[0]),
            "files": self.files[mark[1]:],
            "overhead_s": self.overhead - mark[2],
        }


class GCTimer:
    """Time spent in Python's cyclic garbage collector (a pause that grows with the heap)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full_collections = 0
        self._started = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.full_collections += info.get("generation") == 2


def _tool(backend: str, verb: str) -> str:
    return f"iptables-{backend}-{verb}"


def _restore_argv(backend: str) -> list[str]:
    # Exactly what pyproxy.iptables.restore.IPTables.restore runs.
    return [_tool(backend, "restore"), "--noflush", "--wait=5"]


def _timed(argv: Sequence[str], stdin: str | None = None,
           timeout: float | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return time.perf_counter() - t0, proc


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- workers (each runs inside its own fresh namespace) --------------------------------------


def worker_scale(p: JSON) -> JSON:
    """pyproxy's real path on one synthetic cluster: model, full sync, changes, resync."""
    from pyproxy.iptables.generation import read_generation
    from pyproxy.iptables.plan import PlanContext
    from pyproxy.iptables.restore import Backend, IPTables
    from pyproxy.iptables.ruleset import Ruleset, Table, render
    from pyproxy.iptables.sync import IPTablesDataplane
    from pyproxy.model import parse_node
    from pyproxy.tracker import ChangeTracker

    shape = Shape(p["services"], p["endpoints"])
    backend = str(p["backend"])
    outdir = Path(p["outdir"])
    runner = RecordingRunner(outdir)
    gc_timer = GCTimer()
    res: JSON = {"rss_baseline_mb": peak_rss_mb()}

    # Model: API dicts -> tracker -> snapshot (the dicts are generated lazily, as a list
    # streams in, so the peak RSS below is pyproxy's state, not the generator's).
    t0 = time.perf_counter()
    tracker = ChangeTracker(NODE_NAME)
    tracker.replace(shape.services_objects(), shape.slice_objects())
    snapshot = tracker.checkout()
    res["model_build_s"] = time.perf_counter() - t0
    res["service_ports"] = len(snapshot.services)

    ctx = PlanContext(node=parse_node(node_object()),
                      cluster_cidrs=(ipaddress.ip_network(POD_CIDR),))
    # The recording runner is not restore._run, so the nf_tables generation reader
    # (the resync's fast path) and the line reader a full sync reads the kernel with
    # are passed explicitly, as the agent gets them by default.
    dataplane = IPTablesDataplane(
        IPTables(Backend(backend), runner=runner, generation_reader=read_generation,
                 line_reader=runner.lines), ctx)

    def step(label: str, full: bool, objs: Sequence[JSON] = ()) -> JSON:
        """One sync, timed from the tracker taking the changed objects to rules applied."""
        mark = runner.mark(label)
        gc0 = gc_timer.seconds
        t0 = time.perf_counter()
        for obj in objs:
            tracker.set_slice(obj)
        snap = tracker.checkout()
        t1 = time.perf_counter()
        result = dataplane.sync(snap, full=full)
        t2 = time.perf_counter()
        rec = runner.since(mark)
        overhead = rec.pop("overhead_s")
        out: JSON = {
            "tracker_s": t1 - t0,
            "sync_s": t2 - t1 - overhead,
            "total_s": t2 - t0 - overhead,
            "plan_s": result.plan_seconds,
            "apply_s": result.apply_seconds - overhead,
            "lines": result.lines_written,
            "transactions": result.transactions,
            "kernel_read": result.kernel_read,
            "changed_ports": len(snap.changed_ports),
            "gc_s": gc_timer.seconds - gc0,
            "rss_peak_mb": peak_rss_mb(),  # the high-water mark so far
            **rec,
        }
        out["other_s"] = out["sync_s"] - out["plan_s"] - out["apply_s"]  # conntrack cleanup
        out["python_s"] = out["total_s"] - out["restore_s"] - out["save_s"]
        return out

    _log(f"{backend} {shape.label}: full sync")
    res["full"] = step("full", True)
    counts = dataplane.rule_counts()
    res["nat_rules"], res["filter_rules"] = counts[Table.NAT], counts[Table.FILTER]
    assert dataplane.applied is not None
    res["nat_chains"] = len(dataplane.applied.table(Table.NAT))

    edits = Edits(shape)
    res["one_endpoint"] = []
    _log(f"{backend} {shape.label}: one endpoint changed, {p['changes']} times")
    for k, i in enumerate(shape.one_endpoint_targets(int(p["changes"]))):
        obj = edits.change(i, k % shape.endpoints)
        res["one_endpoint"].append(step(f"one-{k}", False, [obj]))

    if p.get("many"):
        targets = shape.many_targets(int(p["many"]))
        objs = [edits.change(i, 0) for i in targets]
        _log(f"{backend} {shape.label}: {len(targets)} services changed")
        res["many"] = step("many", False, objs)
        res["many"]["services"] = len(targets)

    _log(f"{backend} {shape.label}: periodic full resync, nothing changed")
    res["resync"] = step("resync", True)
    if backend == "nft":
        # Another program's commit (here an unrelated IPv6 chain) moves the nf_tables
        # generation, so the next resync cannot skip reading the kernel: its slow path.
        _log(f"{backend} {shape.label}: periodic full resync after another program's commit")
        subprocess.run(["ip6tables-nft", "-t", "filter", "-N", "BENCH-SOMEONE-ELSE"], check=True)
        res["resync_foreign"] = step("resync-foreign", True)
    res["rss_peak_mb"] = peak_rss_mb()

    # For nf_tables, the payload as one transaction (kube-proxy's way), for context only.
    if backend == "nft":
        single = outdir / "single.txt"
        assert dataplane.applied is not None
        with single.open("w") as out:
            out.writelines(render(dataplane.applied, Ruleset()).pieces)
        res["single_file"] = str(single)
    return res


def worker_floor(p: JSON) -> JSON:
    """Replay payloads with the bare restore tool, in order, timing each; then time saves."""
    backend = str(p["backend"])
    argv = _restore_argv(backend)
    timeout = p.get("timeout")
    out: JSON = {"groups": {}}
    for group in p["groups"]:
        times: list[float] = []
        for path in group["files"]:
            text = Path(path).read_text()
            try:
                seconds, proc = _timed(argv, text, timeout)
            except subprocess.TimeoutExpired:
                out["groups"][group["name"]] = None
                out.setdefault("timed_out", []).append(group["name"])
                break
            if proc.returncode != 0:
                raise RuntimeError(f"floor restore of {path} failed: {proc.stderr.strip()}")
            times.append(seconds)
        else:
            out["groups"][group["name"]] = times
    if p.get("saves"):
        nat = [_timed([_tool(backend, "save"), "-t", "nat"])[0] for _ in range(3)]
        both = []
        for _ in range(3):
            both.append(sum(_timed([_tool(backend, "save"), "-t", t])[0]
                            for t in ("filter", "nat")))
        out["save_nat_s"] = median(nat)
        out["save_both_s"] = median(both)
        out["save_all_s"] = median([_timed([_tool(backend, "save")])[0] for _ in range(3)])
    if backend == "nft" and p.get("saves"):
        # What one small commit costs with the services reachable from the built-in chains
        # and with them unhooked (this namespace is the floor's own, thrown away after):
        # any commit adding a jump or an xt match makes the kernel re-validate every
        # rule reachable from a built-in chain, wherever the new rule goes.
        probe = "*nat\n:BENCH-PROBE - [0:0]\n-A BENCH-PROBE -m comment --comment probe\nCOMMIT\n"
        out["hooked_commit_s"] = median([_timed(argv, probe)[0] for _ in range(5)])
        nat = _timed([_tool(backend, "save"), "-t", "nat"])[1].stdout
        hooks = [line[3:] for line in nat.splitlines()
                 if line.startswith(("-A PREROUTING ", "-A OUTPUT ")) and "PYPROXY" in line]
        unhook = "*nat\n" + "".join(f"-D {h}\n" for h in hooks) + "COMMIT\n"
        if _timed(argv, unhook)[1].returncode == 0:
            out["unhooked_commit_s"] = median([_timed(argv, probe)[0] for _ in range(5)])
    return out


class _LatencyObserver:
    """A SyncObserver recording each successful sync's start and end."""

    def __init__(self) -> None:
        self.syncs: list[tuple[float, float, bool, int]] = []  # started, finished, full, lines
        self.first_ports = 0  # service ports the first sync programmed
        self.cond = threading.Condition()

    def change_queued(self, at: float) -> None:
        return None

    def sync_failed(self, error: BaseException, *, full: bool) -> None:
        _log(f"sync failed (full={full}): {error}")

    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None:
        with self.cond:
            if not self.syncs:
                self.first_ports = len(result.plan.chains_by_service)
            self.syncs.append((started, finished, full, int(result.lines_written)))
            self.cond.notify_all()


def first_sync_after(syncs: Sequence[tuple[float, float, bool, int]],
                     received: float) -> tuple[float, float, bool, int] | None:
    """The sync that programmed a change the tracker took at ``received``.

    The informer feeds the tracker under the reconciler's lock and a sync takes
    its start time and snapshot under the same lock, so a change is in the
    first sync that started after it was received.
    """
    for sync in syncs:
        if sync[0] >= received:
            return sync
    return None


def waited_on_full(syncs: Sequence[tuple[float, float, bool, int]], wrote: float,
                   applied_by: tuple[float, float, bool, int]) -> bool:
    """Whether a full sync ran between a change's write and the sync that applied it."""
    return any(s[2] and s[1] > wrote and s[0] <= applied_by[0] for s in syncs)


def _serve_api(shape: Shape, kubeconfig: Path, conn: Any) -> None:
    """The tests' API server holding ``shape``, in its own process until told to stop."""
    from tests.api.server import FakeKubeAPI

    api = FakeKubeAPI().start()
    t0 = time.perf_counter()
    api.create(node_object())
    for obj in shape.services_objects():
        api.create(obj)
    for obj in shape.slice_objects():
        api.create(obj)
    _log(f"latency: API server holds {shape.label} ({time.perf_counter() - t0:.1f} s to load)")
    api.write_kubeconfig(kubeconfig)
    conn.send(peak_rss_mb())
    conn.recv()
    api.stop()


def worker_latency(p: JSON) -> JSON:
    """pyproxy's Agent against the tests' API server; timed changes written through the API.

    The API server runs in a forked process of its own, so this process's peak
    RSS is the agent's (with its Kubernetes client), as on a node.
    """
    import multiprocessing

    sys.path.insert(0, str(ROOT))
    from kubernetes import client as k8s

    from pyproxy.agent import Agent, plan_context
    from pyproxy.config import load_config
    from pyproxy.iptables.restore import Backend, IPTables
    from pyproxy.iptables.sync import IPTablesDataplane
    from pyproxy.model import parse_node
    from pyproxy.sources import kube

    shape = Shape(p["services"], p["endpoints"])
    rate, duration = float(p["rate"]), float(p["seconds"])

    with tempfile.TemporaryDirectory(prefix="pyproxy-bench-") as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        fork = multiprocessing.get_context("fork")  # before any thread of ours exists
        conn, child_conn = fork.Pipe()
        server = fork.Process(target=_serve_api, args=(shape, kubeconfig, child_conn),
                              name="api-server", daemon=True)
        server.start()
        api_rss_mb = conn.recv()
        discovery = k8s.DiscoveryV1Api(kube.api_client(str(kubeconfig)))
        config, _ = load_config(None, {
            "min_sync_period": f"{p['min_sync_period']}s", "sync_period": f"{p['sync_period']}s",
            "hostname_override": NODE_NAME, "cluster_cidr": POD_CIDR})
        node = parse_node(node_object())
        dataplane = IPTablesDataplane(IPTables(Backend(p["backend"])), plan_context(config, node))
        agent = Agent(config, NODE_NAME, dataplane)
        observer = _LatencyObserver()
        agent.reconciler.observers.append(observer)

        received: dict[int, float] = {}
        set_slice = agent.tracker.set_slice

        def set_slice_seen(obj: Any) -> None:
            # Runs under the reconciler's lock (the informer's handler takes it).
            seq = ((obj.get("metadata") or {}).get("annotations") or {}).get(SEQ_ANNOTATION)
            set_slice(obj)
            if seq is not None:
                received.setdefault(int(seq), agent.reconciler.clock())

        agent.tracker.set_slice = set_slice_seen  # type: ignore[method-assign]
        informers = agent.informers(kube.api_client(str(kubeconfig)))
        started = time.monotonic()
        runner = threading.Thread(target=agent.run, args=(informers,), name="agent", daemon=True)
        runner.start()
        want_ports = sum(len(service_object(i)["spec"]["ports"]) for i in range(shape.services))
        deadline = started + float(p["initial_timeout"])
        with observer.cond:
            while not any(s[2] for s in observer.syncs) and time.monotonic() < deadline:
                observer.cond.wait(1.0)
        initial = observer.syncs[0] if observer.syncs else None
        ports_programmed = observer.first_ports
        if initial is None:
            raise RuntimeError("the agent never completed its first sync")
        _log(f"latency: first sync done {initial[1] - started:.1f} s after start "
             f"({ports_programmed}/{want_ports} service ports); changing {rate:g}/s "
             f"for {duration:g} s")

        rng = random.Random(int(p.get("seed", 5)))
        edits = Edits(shape)
        writes: list[float] = []
        begin = time.monotonic() + 0.5
        for k in range(int(rate * duration)):
            due = begin + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            i = rng.randrange(shape.services)
            sl = edits.change(i, k % shape.endpoints, seq=k)
            writes.append(time.monotonic())
            meta = sl["metadata"]  # no resourceVersion: an unconditional update
            discovery.replace_namespaced_endpoint_slice(meta["name"], meta["namespace"], sl)
        window_end = time.monotonic()
        deadline = window_end + float(p["drain_timeout"])
        with observer.cond:
            while time.monotonic() < deadline:
                with agent.reconciler.lock:  # the informer thread writes `received` under it
                    seen, last = len(received), max(received.values(), default=0.0)
                if seen >= len(writes) and any(s[0] >= last for s in observer.syncs):
                    break
                observer.cond.wait(0.5)
        agent.stop.set()
        agent.close()
        conn.send("stop")
        server.join(10)
        syncs = list(observer.syncs)

    latencies: list[float] = []
    partial_only: list[float] = []  # changes no periodic full resync held up
    unapplied = 0
    for k, wrote in enumerate(writes):
        got = received.get(k)
        sync = first_sync_after(syncs, got) if got is not None else None
        if sync is None:
            unapplied += 1
            continue
        latencies.append(sync[1] - wrote)
        if not waited_on_full(syncs, wrote, sync):
            partial_only.append(sync[1] - wrote)
    in_window = [s for s in syncs[1:] if begin <= s[0] <= window_end]
    partial = [s[1] - s[0] for s in in_window if not s[2]]
    return {
        "initial_s": initial[1] - started,
        "ports_programmed": ports_programmed,
        "ports_wanted": want_ports,
        "writes": len(writes),
        "unapplied": unapplied,
        "latencies": latencies,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies, default=None),
        "partial_only": len(partial_only),
        "partial_only_p99_s": percentile(partial_only, 99),
        "syncs_in_window": len(in_window),
        "full_syncs_in_window": sum(1 for s in in_window if s[2]),
        "full_sync_s": [s[1] - s[0] for s in in_window if s[2]],
        "partial_sync_median_s": median(partial),
        "partial_sync_max_s": max(partial, default=None),
        "rss_peak_mb": peak_rss_mb(),
        "api_server_rss_mb": api_rss_mb,
    }


# -- IPVS (inside User-mode Linux: the host kernel has no IPVS; see TESTING.md) ---------------

# The mix's kinds that `ipvsadm --restore` expresses as they are: TCP/UDP ClusterIP (with
# persistence for affinity) and NodePort services. External IPs and LoadBalancers are left out.
IPVS_KINDS = frozenset({"clusterip", "two-ports", "udp", "nodeport", "affinity",
                        "nodeport-local", "nodeport-local-none"})
IPVS_ENDPOINTS = 3
IPVS_NODE_DEV = "bench-node0"  # the node's own interface in each IPVS namespace
IPVS_HANDFUL = 10  # "one change costs a handful of netlink messages"
IPVS_FLOORS_AFTER = 2  # floor runs after pyproxy's (one runs before): the median is used
IPVS_MAX_SERVICES = 15_000  # of the mix's first 16,383, about 94 % are of IPVS_KINDS
_IPVSADM_HEADER = "# IPVS virtual and real servers"


def ipvs_service_indices(n: int) -> list[int]:
    """The first ``n`` services of the synthetic mix whose kind is in IPVS_KINDS."""
    out: list[int] = []
    for i in range(MAX_SERVICES):
        if len(out) == n:
            return out
        if kind_of(i) in IPVS_KINDS:
            out.append(i)
    raise ValueError(f"at most {len(out)} IPVS services in the synthetic mix")


def ipvs_change_targets(indices: Sequence[int], k: int) -> list[int]:
    """``k`` plain TCP ClusterIP services (i % 100 == 5) spread over ``indices``."""
    plain = [i for i in indices if i % 100 == 5] or [i for i in indices
                                                      if kind_of(i) == "clusterip"]
    return [plain[n * len(plain) // k] for n in range(k)] if plain else []


def ipvsadm_part(description: str) -> str:
    """The ``ipvsadm --restore`` lines of ``pyproxy.ipvs.plan.describe``'s output."""
    lines = description.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(_IPVSADM_HEADER)) + 1
    end = next((n for n in range(start, len(lines)) if lines[n].startswith("#")), len(lines))
    return "".join(line + "\n" for line in lines[start:end] if line.strip())


def ipvsadm_lines(text: str) -> list[str]:
    """``ipvsadm -Sn`` (or --restore input) lines, whitespace-normalised and sorted."""
    return sorted(" ".join(line.split()) for line in text.splitlines() if line.strip())


def _ipvs_netns_setup() -> None:
    """The node's address on an interface of its own: NodePorts listen there, and IPVS
    takes masquerading real servers only once the namespace has a local address."""
    for argv in (["ip", "link", "add", IPVS_NODE_DEV, "type", "dummy"],
                 ["ip", "addr", "add", f"{NODE_IP}/24", "dev", IPVS_NODE_DEV],
                 ["ip", "link", "set", IPVS_NODE_DEV, "up"]):
        subprocess.run(argv, check=True, capture_output=True, text=True)


def _ipvsadm_save() -> str:
    proc = subprocess.run(["ipvsadm", "-Sn"], capture_output=True, text=True, check=True)
    return proc.stdout


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ipvs_expected_restore(services: int) -> str:
    """What pyproxy will program for ``services`` (node port address: NODE_IP), as ipvsadm
    --restore input: the floor's payload, computed before pyproxy runs (pure)."""
    from pyproxy.ipvs.plan import IPVSContext, describe, plan
    from pyproxy.model import parse_node
    from pyproxy.tracker import ChangeTracker

    indices = ipvs_service_indices(services)
    tracker = ChangeTracker(NODE_NAME)
    tracker.replace((service_object(i) for i in indices),
                    (sl for i in indices for sl in slice_objects(i, IPVS_ENDPOINTS)))
    snap = tracker.checkout()
    ctx = IPVSContext(node=parse_node(node_object()),
                      cluster_cidrs=(ipaddress.ip_network(POD_CIDR),),
                      node_port_addresses=(ipaddress.ip_address(NODE_IP),))
    return ipvsadm_part(describe(plan(snap.services, snap.endpoints, ctx)))


def worker_ipvs(p: JSON) -> JSON:
    """pyproxy's IPVS dataplane on one synthetic cluster: full sync, changes, idle resync."""
    from pyproxy.iptables.restore import Backend, IPTables
    from pyproxy.ipvs.diff import (
        AddressOperation,
        IPVSOperation,
        KernelState,
        Operation,
        Scope,
        SetOperation,
    )
    from pyproxy.ipvs.genl import Counters, NetlinkError
    from pyproxy.ipvs.netlink import IPVSKernel
    from pyproxy.ipvs.plan import IPVSContext, describe
    from pyproxy.ipvs.sync import IPVSDataplane
    from pyproxy.model import parse_node
    from pyproxy.tracker import ChangeTracker

    class TimedKernel(IPVSKernel):
        """IPVSKernel that times its sends per socket (and its reads) and counts messages."""

        def __init__(self) -> None:
            super().__init__()
            self.stats: dict[str, JSON] = {}
            self.read_s = 0.0

        def _send(self, run: Sequence[Operation]) -> list[tuple[Operation, NetlinkError]]:
            first = run[0]
            kind = ("ipvs" if isinstance(first, IPVSOperation) else
                    "ipset" if isinstance(first, SetOperation) else
                    "rtnl" if isinstance(first, AddressOperation) else "other")
            before = self.counters
            t0 = time.perf_counter()
            try:
                return super()._send(run)
            finally:
                seconds = time.perf_counter() - t0
                cost = self.counters - before
                s = self.stats.setdefault(kind, {"seconds": 0.0, "operations": 0,
                                                 "messages": 0, "sends": 0, "recvs": 0})
                s["seconds"] += seconds
                s["operations"] += len(run)
                s["messages"] += cost.messages
                s["sends"] += cost.sends
                s["recvs"] += cost.recvs

        def read(self, scope: Scope | None = None) -> KernelState:
            t0 = time.perf_counter()
            try:
                return super().read(scope)
            finally:
                self.read_s += time.perf_counter() - t0

    def counts(c: Counters) -> JSON:
        return {"messages": c.messages, "sends": c.sends, "recvs": c.recvs}

    _ipvs_netns_setup()
    indices = ipvs_service_indices(int(p["services"]))
    shape = Shape(len(indices), IPVS_ENDPOINTS)
    outdir = Path(tempfile.mkdtemp(prefix="pyproxy-bench-ipvs-"))
    runner = RecordingRunner(outdir)
    res: JSON = {"rss_baseline_mb": peak_rss_mb()}

    t0 = time.perf_counter()
    tracker = ChangeTracker(NODE_NAME)
    tracker.replace((service_object(i) for i in indices),
                    (sl for i in indices for sl in slice_objects(i, IPVS_ENDPOINTS)))
    snapshot = tracker.checkout()
    res["model_build_s"] = time.perf_counter() - t0
    res["service_ports"] = len(snapshot.services)

    kernel = TimedKernel()
    ctx = IPVSContext(node=parse_node(node_object()),
                      cluster_cidrs=(ipaddress.ip_network(POD_CIDR),))
    dataplane = IPVSDataplane(IPTables(Backend("legacy"), runner=runner), kernel, ctx)

    def step(label: str, full: bool, objs: Sequence[JSON] = ()) -> tuple[JSON, Any]:
        mark = runner.mark(label)
        kernel.stats, kernel.read_s = {}, 0.0
        before = kernel.counters
        t0 = time.perf_counter()
        for obj in objs:
            tracker.set_slice(obj)
        snap = tracker.checkout()
        t1 = time.perf_counter()
        result = dataplane.sync(snap, full=full)
        t2 = time.perf_counter()
        rec = runner.since(mark)
        overhead = rec.pop("overhead_s")
        rec.pop("files")
        calls = runner.calls[mark[0]:]
        out: JSON = {
            "tracker_s": t1 - t0,
            "sync_s": t2 - t1 - overhead,
            "total_s": t2 - t0 - overhead,
            "plan_s": result.plan_seconds,
            "apply_s": result.apply_seconds - overhead,
            "read_s": kernel.read_s,
            "operations": result.operations,
            "iptables_lines": result.lines_written - result.operations,
            "iptables_calls": len(calls),
            "kernel": dict(kernel.stats),
            **counts(kernel.counters - before),
            **rec,
        }
        out["prepare_s"] = out["sync_s"] - out["plan_s"] - out["apply_s"]
        return out, result

    _log(f"ipvs {shape.label}: full sync")
    res["full"], result = step("full", True)
    p_ = result.plan
    res["virtual_servers"] = len(p_.virtual_servers)
    res["real_servers"] = sum(len(vs.real_servers) for vs in p_.virtual_servers.values())
    res["addresses"] = len(p_.addresses)
    res["set_members"] = sum(len(m) for m in p_.ipsets.values())
    res["sets"] = sum(1 for m in p_.ipsets.values() if m)
    restore = ipvsadm_part(describe(p_))
    res["restore_sha"] = _sha(restore)
    res["restore_lines"] = restore.count("\n")
    res["kernel_matches_plan"] = ipvsadm_lines(_ipvsadm_save()) == ipvsadm_lines(restore)

    edits = Edits(shape)
    res["changes"] = []
    targets = ipvs_change_targets(indices, int(p["changes"]))
    _log(f"ipvs {shape.label}: one endpoint changed, {len(targets)} times")
    for k, i in enumerate(targets):
        try:
            out, _ = step(f"one-{k}", False, [edits.change(i, k % IPVS_ENDPOINTS)])
        except Exception as err:  # reported in the table; the dataplane's next sync is full
            _log(f"ipvs: partial sync failed: {err!r}")
            res["change_error"] = f"{type(err).__name__}: {err}"
            break
        res["changes"].append(out)

    _log(f"ipvs {shape.label}: periodic full resync, nothing changed")
    res["resync"], _ = step("resync", True)
    res["rss_peak_mb"] = peak_rss_mb()
    kernel.close()
    shutil.rmtree(outdir, ignore_errors=True)
    return res


def worker_ipvs_floor(p: JSON) -> JSON:
    """The floor: ``ipvsadm --restore`` of the same virtual and real servers, timed."""
    _ipvs_netns_setup()
    text = str(p["text"])
    seconds, proc = _timed(["ipvsadm", "--restore"], text)
    if proc.returncode != 0:
        raise RuntimeError(f"ipvsadm --restore failed: {proc.stderr.strip()[-2000:]}")
    out: JSON = {"seconds": seconds, "lines": text.count("\n")}
    if p.get("check"):
        out["matches"] = ipvsadm_lines(_ipvsadm_save()) == ipvsadm_lines(text)
    return out


WORKERS: dict[str, Callable[[JSON], JSON]] = {
    "scale": worker_scale,
    "floor": worker_floor,
    "latency": worker_latency,
    "ipvs": worker_ipvs,
    "ipvs-floor": worker_ipvs_floor,
}


def worker_main(kind: str) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    params = json.loads(sys.stdin.read())
    result = WORKERS[kind](params)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


# -- the driver (root namespace: makes namespaces, runs workers, prints) ---------------------


@dataclass(frozen=True)
class Options:
    quick: bool
    backends: tuple[str, ...]
    sizes: tuple[int, ...]
    endpoints: int
    big_endpoints: int
    changes: int
    many: int
    latency_services: int
    latency_seconds: float
    latency_rate: float
    min_sync_period: float
    sync_period: float
    single_floor_timeout: float
    workdir: Path
    ipvs_services: int = 1000
    ipvs_timeout: float = 1800.0  # the whole User-mode Linux run, boot included


BACKEND_NAMES = {"legacy": "iptables, legacy backend", "nft": "iptables, nf_tables backend"}


@dataclass
class Bench:
    """Namespaces and workers, with everything they measured kept for --json."""

    opts: Options
    raw: list[JSON] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @contextlib.contextmanager
    def netns(self) -> Iterator[str]:
        """A fresh namespace with loopback up, deleted afterwards whatever happens."""
        name = f"ppbench-{os.getpid()}-{next(self._ids)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
            yield name
        finally:
            subprocess.run(["ip", "netns", "delete", name], check=False)

    def worker(self, kind: str, params: JSON, timeout: float = 3600) -> JSON:
        """Run one worker in a fresh namespace of its own."""
        with self.netns() as ns:
            argv = ["ip", "netns", "exec", ns, sys.executable, str(SCRIPT), "--worker", kind]
            proc = subprocess.run(argv, input=json.dumps(params), stdout=subprocess.PIPE,
                                  text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} worker failed (exit {proc.returncode})")
        result: JSON = json.loads(proc.stdout.strip().splitlines()[-1])
        self.raw.append({"worker": kind, "params": params, "result": result})
        return result


def _scale_rows(table: str, group: str, backend: str, r: JSON, fl: JSON,
                single: float | None, opts: Options, targets: bool) -> list[Row]:
    """Rows for one size: pyproxy's figures with the floor and the targets next to them.

    ``targets`` is False for shapes issue 5 sets no targets for (one big Service):
    their figures are printed for information, with peak RSS still checked.
    """
    nft = backend == "nft"

    def check(target: str, result: str) -> tuple[str, str]:
        return (target, result) if targets else ("", "")

    def checked(what: str, value: str, target: str, result: str) -> Row:
        target, result = check(target, result)
        return Row(table, group, what, value, target=target, result=result)

    floor_full = sum(fl["groups"].get("full") or []) or None
    full = r["full"]
    rows = [
        Row(table, group, "model build (API dicts → tracker → snapshot)",
            fmt_s(r["model_build_s"])),
        checked("plan, full (cold planner)", fmt_s(full["plan_s"]), "≤ 0.5 s",
                verdict(full["plan_s"], 0.5)),
        Row(table, group, f"apply, full ({full['transactions']} transaction(s), "
            f"{full['lines']:,} lines)", fmt_s(full["apply_s"])),
    ]
    total = full["sync_s"]
    ratio = ratio_of(total, floor_full)
    if nft:
        target, result = check("≤ 8 s", verdict(total, 8.0))
    else:
        target, result = check("≤ 1.3× floor", verdict(ratio, 1.3))
    rows.append(Row(table, group, f"full sync total (plan + apply + conntrack "
                    f"{fmt_s(full['other_s'])}; gc {fmt_s(full['gc_s'])})", fmt_s(total),
                    fmt_s(floor_full), fmt_ratio(ratio), target, result))
    first = r["model_build_s"] + total
    rows.append(Row(table, group, "first programming incl. model build", fmt_s(first),
                    fmt_s(floor_full), fmt_ratio(ratio_of(first, floor_full))))
    if nft:
        stopped = f"> {opts.single_floor_timeout:.0f} s (stopped)"
        rows.append(Row(table, group, "context: the same rules restored as ONE transaction "
                        "(kube-proxy's way); ratio = full sync / it", "",
                        fmt_s(single) if single is not None else stopped,
                        fmt_ratio(ratio_of(total, single))))

    ones = r["one_endpoint"]
    if ones:
        one = median([o["total_s"] for o in ones])
        floor_ones = [sum(t) for t in (fl["groups"].get(f"one-{k}") for k in range(len(ones)))
                      if t]
        floor_one = median(floor_ones)
        ratio = ratio_of(one, floor_one)
        if nft:
            target, result = check("≤ 50 ms", verdict(one, 0.050))
        else:
            target, result = check("≤ 1.3× floor", verdict(ratio, 1.3))
        lines = int(median([o["lines"] for o in ones]) or 0)
        rows.append(Row(table, group, f"one endpoint changed, partial sync (median of "
                        f"{len(ones)}, {lines:,} lines)", fmt_s(one), fmt_s(floor_one),
                        fmt_ratio(ratio), target, result))
        py = median([o["python_s"] for o in ones])
        parts = (f"tracker {fmt_s(median([o['tracker_s'] for o in ones]))}, "
                 f"plan {fmt_s(median([o['plan_s'] for o in ones]))}, "
                 f"conntrack {fmt_s(median([o['other_s'] for o in ones]))}, "
                 f"gc {fmt_s(median([o['gc_s'] for o in ones]))}")
        rows.append(checked(f"  of which Python ({parts}, render)", fmt_s(py), "≤ 5 ms",
                            verdict(py, 0.005)))
    many = r.get("many")
    if many:
        floor_many = sum(fl["groups"].get("many") or []) or None
        rows.append(Row(table, group, f"{many['services']} services changed, partial sync "
                        f"({many['lines']:,} lines)", fmt_s(many["total_s"]), fmt_s(floor_many),
                        fmt_ratio(ratio_of(many["total_s"], floor_many))))
    rs = r["resync"]
    wrote = f"{rs['lines']} lines written"
    if nft:
        target, result = check("≤ 3 s, writes nothing",
                               "PASS" if rs["total_s"] <= 3.0 and rs["lines"] == 0 else "MISS")
    else:
        target, result = check("writes nothing", "PASS" if rs["lines"] == 0 else "MISS")
    read = f"kernel read: {'yes' if rs.get('kernel_read', True) else 'no, generation unchanged'}"
    rows.append(Row(table, group, f"periodic full resync, nothing changed ({read}; {wrote}; "
                    f"save {fmt_s(rs['save_s'])}, plan {fmt_s(rs['plan_s'])}); floor = save "
                    "of both tables", fmt_s(rs["total_s"]), fmt_s(fl.get("save_both_s")),
                    fmt_ratio(ratio_of(rs["total_s"], fl.get("save_both_s"))), target, result))
    rf = r.get("resync_foreign")
    if rf:
        rows.append(Row(
            table, group, f"periodic full resync after another program's commit (kernel read: "
            f"{'yes' if rf['kernel_read'] else 'no'}; {rf['lines']} lines written; save "
            f"{fmt_s(rf['save_s'])}); floor = save of both tables", fmt_s(rf["total_s"]),
            fmt_s(fl.get("save_both_s")), fmt_ratio(ratio_of(rf["total_s"], fl.get("save_both_s"))),
            *check("≤ 3 s, writes nothing",
                   "PASS" if rf["total_s"] <= 3.0 and rf["lines"] == 0 else "MISS")))
    if fl.get("unhooked_commit_s") is not None:
        rows.append(Row(table, group, "context: a one-rule commit (xt comment match, new chain), "
                        "with the services reachable / unhooked from PREROUTING and OUTPUT: "
                        "the kernel re-validates every reachable rule on such a commit", "",
                        f"{fmt_s(fl['hooked_commit_s'])} / {fmt_s(fl['unhooked_commit_s'])}"))
    rows.append(Row(table, group, f"context: iptables-{backend}-save -t nat "
                    f"({r['nat_rules']:,} nat rules, {r['nat_chains']:,} chains)", "",
                    fmt_s(fl.get("save_nat_s"))))
    rows.append(Row(table, group, f"context: iptables-{backend}-save, every table in one call",
                    "", fmt_s(fl.get("save_all_s"))))
    rows.append(Row(table, group, f"peak RSS (fresh process; {r['rss_baseline_mb']:.0f} MB "
                    f"after imports, {full['rss_peak_mb']:.0f} MB after the full sync)",
                    f"{r['rss_peak_mb']:.0f} MB",
                    target="≤ 200 MB", result=verdict(r["rss_peak_mb"], 200)))
    return rows


def _measure_shape(bench: Bench, backend: str, shape: Shape, many: int,
                   label: str) -> tuple[JSON, JSON, float | None]:
    """pyproxy on ``shape`` in one namespace, then the floor in fresh ones."""
    opts = bench.opts
    outdir = opts.workdir / f"{backend}-{label}"
    outdir.mkdir(parents=True, exist_ok=True)
    r = bench.worker("scale", {"backend": backend, "services": shape.services,
                               "endpoints": shape.endpoints, "changes": opts.changes,
                               "many": many, "outdir": str(outdir)})
    groups = [{"name": "full", "files": r["full"]["files"]}]
    groups += [{"name": f"one-{k}", "files": o["files"]}
               for k, o in enumerate(r["one_endpoint"])]
    if r.get("many"):
        groups.append({"name": "many", "files": r["many"]["files"]})
    _log(f"{backend} {shape.label}: floor (bare {_tool(backend, 'restore')} of the same payloads)")
    fl = bench.worker("floor", {"backend": backend, "groups": groups, "saves": True})
    single = None
    if r.get("single_file"):
        _log(f"{backend} {shape.label}: floor as one transaction "
             f"(stopped after {opts.single_floor_timeout:.0f} s)")
        one = bench.worker("floor", {"backend": backend, "timeout": opts.single_floor_timeout,
                                     "groups": [{"name": "single",
                                                 "files": [r["single_file"]]}]})
        times = one["groups"].get("single")
        single = sum(times) if times else None
    shutil.rmtree(outdir, ignore_errors=True)
    return r, fl, single


def section_iptables_scale(bench: Bench) -> list[Row]:
    """Per backend and size: full programming, changes and resync against the bare restore."""
    rows: list[Row] = []
    opts = bench.opts
    for backend in opts.backends:
        for size in opts.sizes:
            shape = Shape(size, opts.endpoints)
            r, fl, single = _measure_shape(bench, backend, shape, opts.many, f"s{size}")
            rows += _scale_rows(BACKEND_NAMES[backend], shape.label, backend, r, fl, single,
                                opts, targets=True)
    return rows


def section_iptables_big_service(bench: Bench) -> list[Row]:
    """One Service with many endpoints: the other way a cluster gets large."""
    rows: list[Row] = []
    opts = bench.opts
    for backend in opts.backends:
        shape = Shape(1, opts.big_endpoints)
        r, fl, single = _measure_shape(bench, backend, shape, 0, "big")
        rows += _scale_rows(BACKEND_NAMES[backend], shape.label, backend, r, fl, single, opts,
                            targets=False)
    return rows


def section_latency(bench: Bench) -> list[Row]:
    """Network programming latency: API write → the sync that applied it, through the Agent."""
    rows: list[Row] = []
    opts = bench.opts
    for backend in opts.backends:
        shape = Shape(opts.latency_services, opts.endpoints)
        _log(f"{backend}: network programming latency at {shape.label}")
        r = bench.worker("latency", {
            "backend": backend, "services": shape.services, "endpoints": shape.endpoints,
            "rate": opts.latency_rate, "seconds": opts.latency_seconds,
            "min_sync_period": opts.min_sync_period, "sync_period": opts.sync_period,
            "initial_timeout": 600, "drain_timeout": 30})
        table = BACKEND_NAMES[backend]
        group = f"latency, {shape.label}"
        limit = opts.min_sync_period + 0.2
        rows.append(Row(table, group, "initial programming through the API (list → synced)",
                        fmt_s(r["initial_s"])))
        fulls = ", ".join(fmt_s(s) for s in r["full_sync_s"]) or "none"
        rows.append(Row(table, group, f"{r['writes']} endpoint changes at "
                        f"{opts.latency_rate:g}/s, minSyncPeriod {opts.min_sync_period:g} s: p50",
                        fmt_s(r["p50_s"])))
        rows.append(Row(table, group, f"  p99 (max {fmt_s(r['max_s'])}; {r['unapplied']} never "
                        f"applied; {r['syncs_in_window']} syncs, periodic full: {fulls}; "
                        f"partial median {fmt_s(r['partial_sync_median_s'])})",
                        fmt_s(r["p99_s"]), target=f"≤ {limit:g} s",
                        result=verdict(r["p99_s"], limit) if not r["unapplied"] else "MISS"))
        rows.append(Row(table, group, f"  p99 of the {r['partial_only']} changes no periodic "
                        "full resync held up", fmt_s(r["partial_only_p99_s"])))
        api_rss = r.get("api_server_rss_mb")
        rows.append(Row(table, group, "peak RSS of the agent's process (informers, Kubernetes "
                        "client, tracker, planner, applier; the API server runs in its own"
                        + (f", {api_rss:.0f} MB)" if api_rss else ")"),
                        f"{r['rss_peak_mb']:.0f} MB", target="≤ 200 MB",
                        result=verdict(r["rss_peak_mb"], 200)))
    return rows


IPVS_TABLE = "IPVS (User-mode Linux kernel, one boot)"
BENCH_TMP = ROOT / ".bench-tmp"  # on the host's filesystem: the guest's /tmp is its own tmpfs


def ipvs_guest(bench: Bench, p: JSON) -> JSON:
    """Inside User-mode Linux: the floor, pyproxy, the floor again; each in a fresh namespace.

    The floor's payload is computed before pyproxy runs, and pyproxy's own plan
    is checked to be the same configuration; the floor runs before and after
    pyproxy so that drift in this (shared) machine shows, and its median is used.
    """
    services = int(p["services"])
    text = ipvs_expected_restore(services)
    res: JSON = {"restore_sha": _sha(text), "restore_lines": text.count("\n"), "floors": []}
    res["versions"] = {"kernel": platform.release(), "ipvsadm": _version(["ipvsadm", "-v"])}
    _log(f"ipvs: floor, ipvsadm --restore of {text.count(chr(10)):,} lines")
    res["floors"].append(bench.worker("ipvs-floor", {"text": text, "check": True}))
    _log(f"ipvs: pyproxy, {services:,} services × {IPVS_ENDPOINTS} endpoints")
    res["pyproxy"] = bench.worker("ipvs", {"services": services, "changes": p["changes"]})
    for _ in range(IPVS_FLOORS_AFTER):
        _log("ipvs: floor again")
        res["floors"].append(bench.worker("ipvs-floor", {"text": text}))
    return res


def ipvs_guest_main(args: argparse.Namespace) -> int:
    """``--ipvs-guest DIR``: read DIR/params.json, measure, write DIR/result.json."""
    exchange = Path(args.ipvs_guest)
    params: JSON = json.loads((exchange / "params.json").read_text())
    try:
        with tempfile.TemporaryDirectory(prefix="pyproxy-bench-") as tmp:
            bench = Bench(options(args, Path(tmp)))
            result = ipvs_guest(bench, params)
        for entry in bench.raw:  # the floor's payload is big, and the same every time
            if "text" in entry["params"]:
                entry["params"]["text"] = f"sha256:{_sha(entry['params']['text'])}"
        result["raw"] = bench.raw
    except Exception as err:  # reported on the host, with the guest's output
        import traceback

        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    (exchange / "result.json").write_text(json.dumps(result))
    return 0 if "error" not in result else 1


def ipvs_rows(res: JSON, services: int, wall_s: float) -> list[Row]:
    """The IPVS table: pyproxy's figures with ``ipvsadm --restore`` of the same servers."""
    t = IPVS_TABLE
    py = res["pyproxy"]
    group = f"{services:,} svc × {IPVS_ENDPOINTS} ep (TCP/UDP ClusterIP + NodePort)"
    floors = [f["seconds"] for f in res["floors"]]
    floor = median(floors)
    full = py["full"]
    kernel = full["kernel"]
    zero: JSON = {"seconds": 0.0, "operations": 0, "messages": 0, "sends": 0}
    ipvs, ipset, rtnl = (kernel.get(k, zero) for k in ("ipvs", "ipset", "rtnl"))

    def row(what: str, value: str, fl: str = "", ratio: str = "", target: str = "",
            result: str = "") -> Row:
        return Row(t, group, what, value, fl, ratio, target, result)

    ratio = ratio_of(ipvs["seconds"], floor)
    rows = [
        row("model build (API dicts → tracker → snapshot)", fmt_s(py["model_build_s"])),
        row(f"plan, full ({py['service_ports']:,} service ports)", fmt_s(full["plan_s"])),
        row(f"full programming: virtual + real servers ({py['virtual_servers']:,} + "
            f"{py['real_servers']:,}; encode, send, acks: {ipvs['messages']:,} netlink "
            f"messages in {ipvs['sends']} sends)", fmt_s(ipvs["seconds"]), fmt_s(floor),
            fmt_ratio(ratio), "≤ 1.0× floor", verdict(ratio, 1.0)),
        row(f"first full sync, everything ({full['operations']:,} operations; "
            f"{full['messages']:,} netlink messages in {full['sends']} sends)",
            fmt_s(full["sync_s"]), fmt_s(floor), fmt_ratio(ratio_of(full["sync_s"], floor))),
        row("  of which: sysctls, dummy interface, timeouts, node addresses",
            fmt_s(full["prepare_s"])),
        row("  of which: reading the kernel's state back (empty namespace)",
            fmt_s(full["read_s"])),
        row(f"  of which: {py['addresses']:,} addresses on the dummy interface "
            f"({rtnl['messages']:,} messages in {rtnl['sends']} sends)", fmt_s(rtnl["seconds"])),
        row(f"  of which: {py['set_members']:,} members of {py['sets']} ipsets "
            f"({ipset['messages']:,} messages in {ipset['sends']} sends)",
            fmt_s(ipset["seconds"])),
        row(f"  of which: iptables-legacy-save + restore ({full['iptables_lines']} lines)",
            fmt_s(full["save_s"] + full["restore_s"])),
    ]
    changes = py["changes"]
    if changes:
        ops = int(median([c["operations"] for c in changes]) or 0)
        lines = int(median([c["iptables_lines"] for c in changes]) or 0)
        msgs = median([c["messages"] for c in changes])
        sends = int(median([c["sends"] for c in changes]) or 0)
        worst = max(c["messages"] for c in changes)
        rows.append(row(f"one endpoint changed, partial sync (median of {len(changes)}; "
                        f"{ops} operations, {lines} iptables lines)",
                        fmt_s(median([c["total_s"] for c in changes]))))
        rows.append(row(f"  netlink messages for it (median; {sends} sends; max "
                        f"{worst}; a full resync here takes {py['resync']['messages']:,})",
                        f"{msgs:g}", target=f"a handful (≤ {IPVS_HANDFUL})",
                        result="PASS" if worst <= IPVS_HANDFUL else "MISS"))
    if py.get("change_error"):
        rows.append(row(f"one endpoint changed, partial sync: FAILED at change "
                        f"{len(changes) + 1} ({py['change_error']})", "failed",
                        target="works", result="MISS"))
    rs = py["resync"]
    idle = rs["operations"] == 0 and rs["iptables_lines"] == 0
    rows.append(row(f"periodic full resync, nothing changed ({rs['operations']} operations, "
                    f"{rs['iptables_lines']} iptables lines; {rs['messages']:,} netlink messages "
                    f"in {rs['sends']:,} sends)", fmt_s(rs["total_s"]),
                    target="0 operations", result="PASS" if idle else "MISS"))
    same = (py["restore_sha"] == res["restore_sha"] and py["kernel_matches_plan"]
            and res["floors"][0].get("matches") is True)
    rows.append(row(f"check: pyproxy's kernel and the floor's hold the same "
                    f"{res['restore_lines']:,} virtual/real server lines (ipvsadm -Sn)",
                    "identical" if same else "DIFFERENT",
                    target="identical", result="PASS" if same else "MISS"))
    rows.append(row("context: each ipvsadm --restore, in a fresh namespace (the first before "
                    "pyproxy, the others after)", "", ", ".join(fmt_s(s) for s in floors)))
    rows.append(row(f"peak RSS (fresh process; {py['rss_baseline_mb']:.0f} MB after imports)",
                    f"{py['rss_peak_mb']:.0f} MB"))
    v = res.get("versions", {})
    rows.append(row(f"context: one boot of linux.uml {v.get('kernel', '?')} ({wall_s:.0f} s in all;"
                    " system calls cost more there than on the host, so compare only within "
                    f"this table); {v.get('ipvsadm', '?')}", ""))
    return rows


def section_ipvs(bench: Bench) -> list[Row]:
    """IPVS inside User-mode Linux: pyproxy against ``ipvsadm --restore``, one boot."""
    opts = bench.opts
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    from uml import UmlError, run_in_uml

    BENCH_TMP.mkdir(exist_ok=True)
    exchange = Path(tempfile.mkdtemp(prefix="ipvs-", dir=BENCH_TMP))
    params: JSON = {"services": opts.ipvs_services, "changes": opts.changes}
    try:
        (exchange / "params.json").write_text(json.dumps(params))
        argv = [sys.executable, str(SCRIPT), "--ipvs-guest", str(exchange)]
        if opts.quick:
            argv.append("--quick")
        _log(f"ipvs: booting User-mode Linux for {opts.ipvs_services:,} services")
        started = time.monotonic()
        try:
            code, output = run_in_uml(argv, timeout=opts.ipvs_timeout, mem="1024M")
        except UmlError as err:
            _log(f"ipvs: skipped: {err}")
            return [Row(IPVS_TABLE, "–", f"not measured: {err}", "n/a")]
        wall = time.monotonic() - started
        for line in output.splitlines():
            if line.startswith("[bench "):
                print(line, file=sys.stderr)
        result_file = exchange / "result.json"
        res: JSON = json.loads(result_file.read_text()) if result_file.exists() else {}
        if code != 0 or "pyproxy" not in res:
            detail = output[-6000:] + (res.get("traceback") or "")
            raise RuntimeError(f"IPVS run in User-mode Linux failed (exit {code}):\n{detail}")
    finally:
        shutil.rmtree(exchange, ignore_errors=True)
        with contextlib.suppress(OSError):
            BENCH_TMP.rmdir()  # only if empty
    bench.raw.append({"worker": "ipvs (User-mode Linux)", "params": params, "result": res})
    return ipvs_rows(res, opts.ipvs_services, wall)


# The sections, in order. "ipvs" runs inside the User-mode Linux kernel (one boot), against
# `ipvsadm --restore` of the same configuration in the same boot.
SECTIONS: list[tuple[str, Callable[[Bench], list[Row]]]] = [
    ("iptables scale", section_iptables_scale),
    ("iptables, one big service", section_iptables_big_service),
    ("network programming latency", section_latency),
    ("ipvs", section_ipvs),
]


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except OSError as err:
        return f"unavailable ({err})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "?"


def machine_info() -> JSON:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iptables": _version(["iptables-legacy", "--version"]) + "; "
        + _version(["iptables-nft", "--version"]),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="1,000 services only, fewer changes, short latency run (< 2 min)")
    ap.add_argument("--backend", choices=("legacy", "nft", "both"), default="both")
    ap.add_argument("--sizes", default=None, help="services per cluster, comma-separated "
                    "(default 1000,5000,10000; 1000 with --quick)")
    ap.add_argument("--endpoints", type=int, default=5, help="endpoints per service")
    ap.add_argument("--latency-seconds", type=float, default=None,
                    help="how long to keep changing services (default 30; 10 with --quick)")
    ap.add_argument("--latency-rate", type=float, default=5.0, help="changes per second")
    ap.add_argument("--skip", default="", help="sections to skip, comma-separated: "
                    + ", ".join(name for name, _ in SECTIONS))
    ap.add_argument("--only", default="", help="run only these sections, comma-separated; a "
                    "word matches every section whose name starts with it (e.g. ipvs, iptables)")
    ap.add_argument("--ipvs", action=argparse.BooleanOptionalAction, default=True,
                    help="the IPVS section, in User-mode Linux (--no-ipvs: as --skip ipvs)")
    ap.add_argument("--ipvs-services", type=int, default=None,
                    help="services in the IPVS cluster (default 1000; 200 with --quick)")
    ap.add_argument("--json", dest="json_file", default=None, help="write raw results here")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--ipvs-guest", metavar="DIR", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def options(args: argparse.Namespace, workdir: Path) -> Options:
    sizes = tuple(int(s) for s in (args.sizes or ("1000" if args.quick else "1000,5000,10000"))
                  .split(","))
    if any(not 0 < s <= MAX_SERVICES for s in sizes):
        raise SystemExit(f"--sizes: each size must be 1..{MAX_SERVICES}")
    ipvs_services = args.ipvs_services or (200 if args.quick else 1000)
    if not 0 < ipvs_services <= IPVS_MAX_SERVICES:
        raise SystemExit(f"--ipvs-services must be 1..{IPVS_MAX_SERVICES}")
    return Options(
        quick=args.quick,
        backends=("legacy", "nft") if args.backend == "both" else (args.backend,),
        sizes=sizes,
        endpoints=args.endpoints,
        big_endpoints=1000 if args.quick else 10_000,
        changes=3 if args.quick else 5,
        many=100,
        latency_services=1000 if args.quick else max(sizes),
        latency_seconds=args.latency_seconds or (10.0 if args.quick else 30.0),
        latency_rate=args.latency_rate,
        min_sync_period=1.0,
        sync_period=30.0,
        single_floor_timeout=30.0 if args.quick else 120.0,
        workdir=workdir,
        ipvs_services=ipvs_services,
        ipvs_timeout=600.0 if args.quick else 1800.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench.py needs root (it creates network namespaces)")
    if args.ipvs_guest:
        return ipvs_guest_main(args)
    skip = selected_out(args)
    started, load_start = time.monotonic(), _load()
    info = machine_info()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pyproxy-bench-") as tmp:
        opts = options(args, Path(tmp))
        bench = Bench(opts)
        for name, section in SECTIONS:
            if name in skip:
                continue
            _log(f"section: {name}")
            rows += section(bench)
    elapsed = time.monotonic() - started
    load_end = _load()
    print(render_report(info, opts, rows, load_start, load_end, elapsed))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps({
            "machine": info, "options": {k: str(v) for k, v in asdict(opts).items()},
            "load_start": load_start, "load_end": load_end, "elapsed_s": elapsed,
            "rows": [asdict(r) for r in rows], "raw": bench.raw}, indent=1))
    return 0


def selected_out(args: argparse.Namespace) -> set[str]:
    """The names of the sections not to run, from --skip, --only and --no-ipvs."""
    names = [name for name, _ in SECTIONS]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if not args.ipvs:
        skip.add("ipvs")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if only:
        unknown = [w for w in only if not any(n.startswith(w) for n in names)]
        if unknown:
            raise SystemExit(f"--only: no section starts with {', '.join(unknown)} "
                             f"(sections: {'; '.join(names)})")
        skip |= {n for n in names if not any(n.startswith(w) for w in only)}
    return skip


def render_report(info: JSON, opts: Options, rows: Sequence[Row], load_start: str,
                  load_end: str, elapsed: float) -> str:
    head = [
        f"## pyproxy benchmark{' (--quick)' if opts.quick else ''}",
        "",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gb']} GiB, "
        f"kernel {info['kernel']}, Python {info['python']}",
        f"- iptables: {info['iptables']}",
        f"- load average (1/5/15 min): {load_start} at start, {load_end} at end; "
        f"run took {elapsed:.0f} s",
        "- floor: the bare restore tool replaying pyproxy's own payloads in a fresh namespace, "
        "same order; ratio = pyproxy / floor. Targets are issue 5's (at 10,000 services × 5 "
        "endpoints where absolute); a MISS does not fail the run.",
        "",
    ]
    return "\n".join(head) + format_tables(rows)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
