"""Smoke tests for scripts/bench.py's pure helpers: the synthetic cluster and the tables.

The benchmark itself needs root and minutes; these check, without a kernel, that the
clusters it builds are valid API objects exercising every kind of Service it claims
to, and that its report is a well-formed table. A bench that silently measured
malformed (skipped) objects would report flattering numbers.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from pyproxy.model import InvalidObject, parse_endpoint_slice, parse_service
from pyproxy.tracker import ChangeTracker

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    if "pyproxy_bench" in sys.modules:
        return sys.modules["pyproxy_bench"]
    spec = importlib.util.spec_from_file_location("pyproxy_bench", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyproxy_bench"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


bench = _load()
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")


def test_the_mix_has_every_kind_and_every_object_is_valid() -> None:
    shape = bench.Shape(300, 5)
    kinds = Counter(bench.kind_of(i) for i in range(shape.services))
    assert set(kinds) == {kind for _, kind in bench._KINDS}
    assert kinds["clusterip"] > shape.services // 2  # mostly plain ClusterIP
    for obj in shape.services_objects():
        svc = parse_service(obj)
        assert svc is not None
        for port in svc.ports:
            assert port.cluster_ip in BENCH_NET
            assert all(ip in BENCH_NET for ip in port.external_ips + port.load_balancer_ips)
    for obj in shape.slice_objects():
        sl = parse_endpoint_slice(obj)
        assert sl is not None and len(sl.endpoints) == 5
        assert all(ep.ip in BENCH_NET for ep in sl.endpoints)


def test_the_semantics_the_bench_claims_are_there() -> None:
    services = [parse_service(bench.service_object(i)) for i in range(100)]
    ports = [p for svc in services if svc is not None for p in svc.ports]
    assert any(p.affinity_timeout for p in ports)
    assert any(p.external_policy_local for p in ports)
    assert any(p.external_ips for p in ports)
    assert any(p.load_balancer_source_ranges for p in ports)
    assert any(p.health_check_node_port for p in ports)
    assert any(p.protocol == "UDP" for p in ports)


def test_addresses_and_node_ports_are_unique_at_the_largest_size() -> None:
    objs = [bench.service_object(i) for i in range(10_000)]
    cluster_ips = [o["spec"]["clusterIP"] for o in objs]
    assert len(set(cluster_ips)) == len(cluster_ips)
    node_ports = [p["nodePort"] for o in objs for p in o["spec"]["ports"] if "nodePort" in p]
    assert len(set(node_ports)) == len(node_ports)
    assert all(30000 <= n <= 32767 for n in node_ports)
    with pytest.raises(ValueError):
        bench.service_object(bench.MAX_SERVICES)


def test_the_tracker_takes_the_whole_cluster() -> None:
    invalid: list[InvalidObject] = []
    shape = bench.Shape(200, 5)
    tracker = ChangeTracker(bench.NODE_NAME, on_invalid=invalid.append)
    tracker.replace(shape.services_objects(), shape.slice_objects())
    snap = tracker.checkout()
    assert not invalid
    two_port = sum(1 for i in range(200) if bench.kind_of(i) == "two-ports")
    assert len(snap.services) == 200 + two_port
    local = [ep for eps in snap.endpoints.values() for ep in eps if ep.is_local]
    assert local  # some endpoints are on the bench's node: eTP Local has something to pick


def test_an_edit_changes_exactly_one_endpoint_and_edits_accumulate() -> None:
    shape = bench.Shape(1, 250)
    slices = bench.slice_objects(0, 250)
    assert [len(s["endpoints"]) for s in slices] == [100, 100, 50]
    edits = bench.Edits(shape)
    first = edits.change(0, 120)
    assert first["metadata"]["name"] == slices[1]["metadata"]["name"]
    before = [e["addresses"][0] for e in slices[1]["endpoints"]]
    after = [e["addresses"][0] for e in first["endpoints"]]
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1
    second = edits.change(0, 121, seq=7)
    after2 = [e["addresses"][0] for e in second["endpoints"]]
    assert sum(a != b for a, b in zip(before, after2, strict=True)) == 2  # 120 stays replaced
    assert second["metadata"]["annotations"] == {bench.SEQ_ANNOTATION: "7"}


def test_change_targets_are_distinct_and_in_range() -> None:
    shape = bench.Shape(10_000, 5)
    ones = shape.one_endpoint_targets(5)
    assert len(set(ones)) == 5 and all(bench.kind_of(i) == "clusterip" for i in ones)
    many = shape.many_targets(100)
    assert len(set(many)) == 100 and all(0 <= i < 10_000 for i in many)


def test_number_formatting_and_verdicts() -> None:
    assert bench.fmt_s(0.0004) == "400 µs"
    assert bench.fmt_s(0.0123) == "12.3 ms"
    assert bench.fmt_s(2.5) == "2.50 s"
    assert bench.fmt_s(None) == "–"
    assert bench.fmt_ratio(bench.ratio_of(1.3, 1.0)) == "1.30×"
    assert bench.ratio_of(1.0, 0.0) is None
    assert bench.verdict(1.0, 1.0) == "PASS"
    assert bench.verdict(1.01, 1.0) == "MISS"
    assert bench.verdict(None, 1.0) == "n/a"


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([], 50) is None


def test_a_change_is_credited_to_the_first_sync_that_started_after_it() -> None:
    syncs = [(1.0, 1.5, True, 10), (2.0, 2.1, False, 3), (3.0, 3.2, False, 3)]
    assert bench.first_sync_after(syncs, 1.2) == syncs[1]
    assert bench.first_sync_after(syncs, 2.0) == syncs[1]
    assert bench.first_sync_after(syncs, 3.5) is None


def test_one_markdown_table_per_dataplane() -> None:
    rows = [
        bench.Row("iptables, legacy backend", "1,000 svc", "full sync", "1.00 s", "0.90 s",
                  "1.11×", "≤ 1.3× floor", "PASS"),
        bench.Row("iptables, nf_tables backend", "1,000 svc", "a|b", "2.00 s"),
        bench.Row("iptables, legacy backend", "5,000 svc", "full sync", "3.00 s"),
    ]
    text = bench.format_tables(rows)
    lines = text.splitlines()
    assert lines.count("### iptables, legacy backend") == 1
    assert lines.count("### iptables, nf_tables backend") == 1
    table_lines = [line for line in lines if line.startswith("|")]
    assert all(line.count(" | ") == 6 or "\\|" in line for line in table_lines)
    assert "| 1,000 svc | full sync | 1.00 s | 0.90 s | 1.11× | ≤ 1.3× floor | PASS |" in lines
    assert "a\\|b" in text
    legacy = text.index("### iptables, legacy backend")
    assert text.index("5,000 svc") > legacy  # rows stay with their table, in order


def test_a_full_sync_between_write_and_apply_is_noticed() -> None:
    full = (2.0, 5.0, True, 0)
    late = (5.0, 5.2, False, 3)
    early = (1.0, 1.1, False, 3)
    assert bench.waited_on_full([early, full, late], 1.5, late)
    assert not bench.waited_on_full([early, full, late], 1.5 - 1.0, early)
    assert not bench.waited_on_full([full, late, (6.0, 6.1, False, 1)], 5.5, (6.0, 6.1, False, 1))


# -- the IPVS section's pure parts ---------------------------------------------------------


def test_ipvs_services_are_what_ipvsadm_expresses_and_changes_hit_plain_cluster_ips() -> None:
    indices = bench.ipvs_service_indices(1000)
    assert len(indices) == len(set(indices)) == 1000
    assert {bench.kind_of(i) for i in indices} == bench.IPVS_KINDS
    targets = bench.ipvs_change_targets(indices, 5)
    assert len(set(targets)) == 5
    assert all(i in indices and bench.kind_of(i) == "clusterip" for i in targets)
    with pytest.raises(ValueError):
        bench.ipvs_service_indices(bench.MAX_SERVICES)


def test_the_floor_payload_is_describes_ipvsadm_part_of_the_same_plan() -> None:
    text = bench.ipvs_expected_restore(100)
    lines = text.splitlines()
    assert lines and all(line.startswith(("-A ", "-a ")) for line in lines)
    assert not any("#" in line for line in lines)  # ipvsadm --restore takes no comments
    node_ports = [line for line in lines if line.startswith("-A") and bench.NODE_IP in line]
    assert node_ports  # NodePorts listen on the node's address
    assert any(" -p 10800" in line for line in lines)  # affinity: persistence
    assert any(line.startswith("-A -u ") for line in lines)
    assert bench.ipvsadm_lines("-A  -t 1.2.3.4:80 -s rr \n\n-a -t x") == [
        "-A -t 1.2.3.4:80 -s rr", "-a -t x"]
    part = bench.ipvsadm_part("# IPVS virtual and real servers (x)\n-A a\n-a b\n# next\nzz\n")
    assert part == "-A a\n-a b\n"


def test_only_and_no_ipvs_select_sections() -> None:
    names = {name for name, _ in bench.SECTIONS}
    assert "ipvs" in names
    assert bench.selected_out(bench.parse_args(["--only", "ipvs"])) == names - {"ipvs"}
    assert bench.selected_out(bench.parse_args(["--no-ipvs"])) == {"ipvs"}
    iptables_only = bench.selected_out(bench.parse_args(["--only", "iptables"]))
    assert "ipvs" in iptables_only and "iptables scale" not in iptables_only
    with pytest.raises(SystemExit):
        bench.selected_out(bench.parse_args(["--only", "nosuch"]))


def _ipvs_result(change_messages: int, resync_ops: int) -> dict[str, object]:
    kernel = {k: {"seconds": 0.02, "operations": 10, "messages": 10, "sends": 1, "recvs": 1}
              for k in ("ipvs", "ipset", "rtnl")}
    full = {"sync_s": 0.6, "plan_s": 0.02, "prepare_s": 0.03, "read_s": 0.01, "operations": 30,
            "messages": 30, "sends": 3, "kernel": kernel, "iptables_lines": 35, "save_s": 0.2,
            "restore_s": 0.3}
    change = {"total_s": 0.04, "operations": 4, "iptables_lines": 0,
              "messages": change_messages, "sends": 5}
    resync = {"total_s": 0.5, "operations": resync_ops, "iptables_lines": 0, "messages": 260,
              "sends": 260}
    return {"restore_sha": "s", "restore_lines": 880, "versions": {},
            "floors": [{"seconds": 0.2, "matches": True}, {"seconds": 0.1}, {"seconds": 0.3}],
            "pyproxy": {"model_build_s": 0.05, "service_ports": 210, "full": full,
                        "virtual_servers": 234, "real_servers": 646, "addresses": 200,
                        "set_members": 1026, "sets": 5, "changes": [change] * 3,
                        "resync": resync, "restore_sha": "s", "kernel_matches_plan": True,
                        "rss_baseline_mb": 40.0, "rss_peak_mb": 46.0}}


def test_ipvs_rows_compare_with_the_median_floor_and_check_the_targets() -> None:
    rows = bench.ipvs_rows(_ipvs_result(6, 0), 200, 9.0)
    assert {r.table for r in rows} == {bench.IPVS_TABLE}
    by_target = {r.target: r for r in rows if r.target}
    full = by_target["≤ 1.0× floor"]
    assert (full.value, full.floor, full.ratio, full.result) == ("20.0 ms", "200.0 ms",
                                                                 "0.10×", "PASS")
    assert by_target["a handful (≤ 10)"].result == "PASS"
    assert by_target["0 operations"].result == "PASS"
    assert by_target["identical"].result == "PASS"
    assert "| 200 svc × 3 ep" in bench.format_tables(rows)
    worse = bench.ipvs_rows(_ipvs_result(40, 3), 200, 9.0)
    results = {r.target: r.result for r in worse if r.target}
    assert results["a handful (≤ 10)"] == results["0 operations"] == "MISS"
    failed = _ipvs_result(6, 0)
    py = failed["pyproxy"]
    assert isinstance(py, dict)
    py["changes"], py["change_error"] = [], "KeyError: 'PYPROXY-LOOP-BACK'"
    broken = [r for r in bench.ipvs_rows(failed, 200, 9.0) if "FAILED" in r.what]
    assert len(broken) == 1 and broken[0].result == "MISS" and "KeyError" in broken[0].what
