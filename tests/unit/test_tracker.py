"""Unit tests for pyproxy.tracker.ChangeTracker: state, change sets and their collapse."""

from __future__ import annotations

import copy
import sys
from ipaddress import ip_address
from typing import Any

import pytest

from pyproxy.model import InvalidObject, IPFamily, Protocol, ServicePortName
from pyproxy.tracker import ChangeTracker

# --------------------------------------------------------------------------
# builders


def service(name: str = "web", namespace: str = "default", *, cluster_ip: str = "10.0.0.10",
            ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "ports": ports if ports is not None else [{"name": "http", "port": 80}],
    }
    body.update(spec)
    return {"kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": body}


def eps_slice(name: str, service_name: str | None = "web", *ips: str,
              namespace: str = "default", address_type: str = "IPv4",
              ports: list[dict[str, Any]] | None = None,
              node_name: str = "") -> dict[str, Any]:
    labels = {} if service_name is None else {"kubernetes.io/service-name": service_name}
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "addressType": address_type,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080,
                                                   "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], **({"nodeName": node_name} if node_name else {})}
                      for ip in ips],
    }


def spn(name: str = "web", port: str = "http", namespace: str = "default",
        protocol: Protocol = Protocol.TCP) -> ServicePortName:
    return ServicePortName(namespace, name, port, protocol)


WEB = ("default", "web")


class Recorder:
    def __init__(self) -> None:
        self.errors: list[InvalidObject] = []

    def __call__(self, err: InvalidObject) -> None:
        self.errors.append(err)


@pytest.fixture
def invalid() -> Recorder:
    return Recorder()


@pytest.fixture
def tracker(invalid: Recorder) -> ChangeTracker:
    return ChangeTracker("node-a", on_invalid=invalid)


def ips(tracker_snapshot_eps: Any) -> list[str]:
    return [str(e.ip) for e in tracker_snapshot_eps]


# --------------------------------------------------------------------------
# basic state


def test_empty_checkout(tracker: ChangeTracker) -> None:
    assert not tracker.pending
    snap = tracker.checkout()
    assert dict(snap.services) == {} and dict(snap.endpoints) == {}
    assert snap.changed == frozenset()


def test_service_and_slice(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.2", "10.1.0.1"))
    assert tracker.pending
    snap = tracker.checkout()
    assert not tracker.pending
    assert snap.changed == {WEB}
    assert list(snap.services) == [spn()]
    sp = snap.services[spn()]
    assert sp.cluster_ip == ip_address("10.0.0.10") and sp.port == 80
    assert [e.address for e in snap.endpoints[spn()]] == ["10.1.0.1:8080", "10.1.0.2:8080"]


def test_second_checkout_without_changes(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.checkout()
    snap = tracker.checkout()
    assert snap.changed == frozenset()
    assert list(snap.services) == [spn()]
    assert snap.endpoints[spn()] == ()


def test_endpoints_without_slices_are_empty(tracker: ChangeTracker) -> None:
    tracker.set_service(service(ports=[{"name": "http", "port": 80},
                                       {"name": "dns", "port": 53, "protocol": "UDP"}]))
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))  # only http/TCP
    snap = tracker.checkout()
    assert set(snap.services) == {spn(), spn(port="dns", protocol=Protocol.UDP)}
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]
    assert snap.endpoints[spn(port="dns", protocol=Protocol.UDP)] == ()


def test_slice_port_protocol_must_match(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1",
                                ports=[{"name": "http", "port": 8080, "protocol": "UDP"}]))
    assert tracker.checkout().endpoints[spn()] == ()


def test_unnamed_port(tracker: ChangeTracker) -> None:
    tracker.set_service(service(ports=[{"port": 80}]))
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1", ports=[{"name": "", "port": 80}]))
    snap = tracker.checkout()
    assert ips(snap.endpoints[spn(port="")]) == ["10.1.0.1"]


def test_slice_before_service(tracker: ChangeTracker) -> None:
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    snap = tracker.checkout()
    assert dict(snap.services) == {} and snap.changed == frozenset()
    tracker.set_service(service())
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]


def test_is_local_uses_node_name(invalid: Recorder) -> None:
    t = ChangeTracker("node-a", on_invalid=invalid)
    t.set_service(service())
    t.set_slice(eps_slice("web-1", "web", "10.1.0.1", node_name="node-a"))
    t.set_slice(eps_slice("web-2", "web", "10.1.0.2", node_name="node-b"))
    eps = t.checkout().endpoints[spn()]
    assert [(str(e.ip), e.is_local) for e in eps] == [("10.1.0.1", True), ("10.1.0.2", False)]


def test_several_slices_merge_and_dedupe(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1", "10.1.0.3"))
    tracker.set_slice(eps_slice("web-2", "web", "10.1.0.2", "10.1.0.3"))
    assert ips(tracker.checkout().endpoints[spn()]) == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]


def test_same_slice_name_in_other_namespace_is_distinct(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_service(service(namespace="other", cluster_ip="10.0.0.11"))
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.set_slice(eps_slice("web-1", "web", "10.2.0.1", namespace="other"))
    snap = tracker.checkout()
    assert snap.changed == {WEB, ("other", "web")}
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]
    assert ips(snap.endpoints[spn(namespace="other")]) == ["10.2.0.1"]
    tracker.delete_slice("other", "web-1")
    snap = tracker.checkout()
    assert snap.changed == {("other", "web")}
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]
    assert snap.endpoints[spn(namespace="other")] == ()


# --------------------------------------------------------------------------
# deletes


def test_delete_service(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.checkout()
    tracker.delete_service("default", "web")
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert dict(snap.services) == {} and dict(snap.endpoints) == {}


def test_delete_slice(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.set_slice(eps_slice("web-2", "web", "10.1.0.2"))
    tracker.checkout()
    tracker.delete_slice("default", "web-1")
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert ips(snap.endpoints[spn()]) == ["10.1.0.2"]
    tracker.delete_slice("default", "web-2")
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert snap.endpoints[spn()] == ()
    assert spn() in snap.services


def test_delete_unknown_is_a_no_op(tracker: ChangeTracker) -> None:
    tracker.delete_service("default", "nope")
    tracker.delete_slice("default", "nope")
    assert not tracker.pending
    assert tracker.checkout().changed == frozenset()


def test_delete_service_keeps_slices_for_its_return(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.checkout()
    tracker.delete_service("default", "web")
    tracker.checkout()
    tracker.set_service(service())
    assert ips(tracker.checkout().endpoints[spn()]) == ["10.1.0.1"]


def test_other_services_untouched(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_service(service("db", cluster_ip="10.0.0.20"))
    tracker.set_slice(eps_slice("db-1", "db", "10.1.0.9"))
    tracker.checkout()
    tracker.delete_service("default", "web")
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert list(snap.services) == [spn("db")]
    assert ips(snap.endpoints[spn("db")]) == ["10.1.0.9"]


# --------------------------------------------------------------------------
# change sets and their collapse


def test_service_change_reported(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.checkout()
    tracker.set_service(service(ports=[{"name": "http", "port": 81}]))
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert snap.services[spn()].port == 81


def test_reverted_service_change_not_reported(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.checkout()
    tracker.set_service(service(ports=[{"name": "http", "port": 81}]))
    tracker.set_service(service())
    snap = tracker.checkout()
    assert snap.changed == frozenset()
    assert snap.services[spn()].port == 80


def test_reverted_slice_change_not_reported(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.checkout()
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1", "10.1.0.2"))
    tracker.set_slice(eps_slice("web-2", "web", "10.1.0.3"))
    tracker.delete_slice("default", "web-2")
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    snap = tracker.checkout()
    assert snap.changed == frozenset()
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]


def test_reordered_ports_are_no_change(tracker: ChangeTracker) -> None:
    two = [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    tracker.set_service(service(ports=two))
    assert tracker.checkout().changed_ports == {spn(), spn(port="dns", protocol=Protocol.UDP)}
    tracker.set_service(service(ports=two[::-1]))  # the same ports, listed the other way
    snap = tracker.checkout()
    assert snap.changed == frozenset() and snap.changed_ports == frozenset()
    assert set(snap.services) == {spn(), spn(port="dns", protocol=Protocol.UDP)}


def test_state_keeps_one_copy_of_repeated_names(tracker: ChangeTracker) -> None:
    # Each object comes with its own strings (as from JSON); the model keeps one of each.
    tracker.set_service(service(namespace="".join(["de", "fault"])))
    for n in range(2):
        tracker.set_slice(eps_slice(f"web-{n}", "web", f"10.1.0.{n + 1}",
                                    namespace="".join(["de", "fault"]), node_name=f"node-{n}"))
    snap = tracker.checkout()
    a, b = snap.endpoints[spn()]
    assert a.node_name == "node-0" and a.node_name is sys.intern("node-0")
    assert snap.services[spn()].name.namespace is sys.intern("default")


def test_endpoint_moving_between_slices_not_reported(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1", "10.1.0.2"))
    tracker.checkout()
    tracker.set_slice(eps_slice("web-2", "web", "10.1.0.2"))
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    snap = tracker.checkout()
    assert snap.changed == frozenset()
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1", "10.1.0.2"]


def test_add_then_delete_before_checkout_not_reported(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.delete_service("default", "web")
    snap = tracker.checkout()
    assert snap.changed == frozenset()
    assert dict(snap.services) == {}


def test_delete_then_readd_before_checkout_not_reported(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.checkout()
    tracker.delete_service("default", "web")
    tracker.delete_slice("default", "web-1")
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.set_service(service())
    assert tracker.checkout().changed == frozenset()


def test_flap_after_a_reported_change(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.checkout()
    tracker.set_service(service(ports=[{"name": "http", "port": 81}]))
    assert tracker.checkout().changed == {WEB}
    # back to 80 and then to 81 again: equal to what was last handed out
    tracker.set_service(service())
    tracker.set_service(service(ports=[{"name": "http", "port": 81}]))
    assert tracker.checkout().changed == frozenset()


def test_irrelevant_change_not_pending(tracker: ChangeTracker) -> None:
    obj = service()
    tracker.set_service(obj)
    tracker.checkout()
    changed = copy.deepcopy(obj)
    changed["metadata"]["resourceVersion"] = "42"
    changed["metadata"]["labels"] = {"app": "web"}
    changed["spec"]["selector"] = {"app": "web"}
    tracker.set_service(changed)
    assert not tracker.pending
    assert tracker.checkout().changed == frozenset()


def test_endpoint_condition_change_reported(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    sl = eps_slice("web-1", "web", "10.1.0.1")
    tracker.set_slice(sl)
    tracker.checkout()
    sl = copy.deepcopy(sl)
    sl["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    tracker.set_slice(sl)
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    (ep,) = snap.endpoints[spn()]
    assert (ep.ready, ep.serving, ep.terminating) == (False, True, True)


def test_renamed_port_replaces_old_service_port(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.checkout()
    tracker.set_service(service(ports=[{"name": "web", "port": 80}]))
    snap = tracker.checkout()
    assert list(snap.services) == [spn(port="web")]
    assert list(snap.endpoints) == [spn(port="web")]


def test_snapshot_property_matches_last_checkout(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.checkout()
    tracker.set_service(service("db", cluster_ip="10.0.0.20"))  # pending, not checked out
    snap = tracker.snapshot
    assert list(snap.services) == [spn()]
    assert snap.changed == frozenset()
    assert tracker.pending


# --------------------------------------------------------------------------
# invalid objects


def test_invalid_service_reported_once_and_absent(tracker: ChangeTracker,
                                                  invalid: Recorder) -> None:
    tracker.set_service(service(ports=[{"name": "http", "port": 0}]))
    assert len(invalid.errors) == 1
    err = invalid.errors[0]
    assert (err.kind, err.key, err.field_path) == ("Service", "default/web",
                                                   "spec.ports[0].port")
    snap = tracker.checkout()
    assert dict(snap.services) == {} and snap.changed == frozenset()


def test_valid_service_turned_invalid_disappears(tracker: ChangeTracker,
                                                 invalid: Recorder) -> None:
    tracker.set_service(service())
    tracker.set_service(service("db", cluster_ip="10.0.0.20"))
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.checkout()
    tracker.set_service(service(sessionAffinity="Sticky"))
    assert [e.field_path for e in invalid.errors] == ["spec.sessionAffinity"]
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert list(snap.services) == [spn("db")]
    assert spn() not in snap.endpoints
    # fixed again: back with its endpoints
    tracker.set_service(service())
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]
    assert len(invalid.errors) == 1


def test_invalid_slice_reported_and_absent(tracker: ChangeTracker, invalid: Recorder) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.set_slice(eps_slice("web-2", "web", "10.1.0.2"))
    tracker.checkout()
    tracker.set_slice(eps_slice("web-2", "web", "10.1.0.2", "fd00::1"))  # family mismatch
    assert len(invalid.errors) == 1
    assert (invalid.errors[0].kind, invalid.errors[0].key) == ("EndpointSlice",
                                                               "default/web-2")
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]


@pytest.mark.parametrize("obj", [
    "junk", None, {"kind": "Service"}, {"metadata": {"name": "x"}},
    {"metadata": {"namespace": "default"}},
])
def test_objects_without_identity(tracker: ChangeTracker, invalid: Recorder, obj: Any) -> None:
    tracker.set_service(obj)
    tracker.set_slice(obj)
    assert len(invalid.errors) == 2
    assert not tracker.pending
    assert tracker.checkout().changed == frozenset()


def test_default_on_invalid_logs(caplog: pytest.LogCaptureFixture) -> None:
    t = ChangeTracker("node-a")
    with caplog.at_level("WARNING", logger="pyproxy.tracker"):
        t.set_service(service(ports=[]))
    (rec,) = caplog.records
    assert rec.object == "default/web"  # type: ignore[attr-defined]
    assert rec.field == "spec.ports"  # type: ignore[attr-defined]


def test_headless_and_external_name_are_absent(tracker: ChangeTracker,
                                               invalid: Recorder) -> None:
    tracker.set_service(service())
    tracker.checkout()
    tracker.set_service(service(cluster_ip="None", clusterIPs=["None"]))
    tracker.set_service(service("ext", cluster_ip="", type="ExternalName",
                                externalName="example.com"))
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert dict(snap.services) == {}
    assert invalid.errors == []


# --------------------------------------------------------------------------
# slices moving, label changes


def test_slice_moving_to_another_service(tracker: ChangeTracker) -> None:
    tracker.set_service(service("a", cluster_ip="10.0.0.1"))
    tracker.set_service(service("b", cluster_ip="10.0.0.2"))
    tracker.set_slice(eps_slice("s-1", "a", "10.1.0.1"))
    snap = tracker.checkout()
    assert ips(snap.endpoints[spn("a")]) == ["10.1.0.1"]
    tracker.set_slice(eps_slice("s-1", "b", "10.1.0.1"))
    snap = tracker.checkout()
    assert snap.changed == {("default", "a"), ("default", "b")}
    assert snap.endpoints[spn("a")] == ()
    assert ips(snap.endpoints[spn("b")]) == ["10.1.0.1"]
    # and deleting it afterwards touches only its new owner
    tracker.delete_slice("default", "s-1")
    snap = tracker.checkout()
    assert snap.changed == {("default", "b")}
    assert snap.endpoints[spn("b")] == ()


def test_slice_losing_its_label(tracker: ChangeTracker, invalid: Recorder) -> None:
    tracker.set_service(service())
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.checkout()
    tracker.set_slice(eps_slice("web-1", None, "10.1.0.1"))
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert snap.endpoints[spn()] == ()
    assert invalid.errors == []


# --------------------------------------------------------------------------
# replace


def test_replace_removes_absent_objects(tracker: ChangeTracker) -> None:
    tracker.set_service(service())
    tracker.set_service(service("db", cluster_ip="10.0.0.20"))
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.set_slice(eps_slice("web-2", "web", "10.1.0.2"))
    tracker.set_slice(eps_slice("db-1", "db", "10.1.0.9"))
    tracker.checkout()
    tracker.replace([service()], [eps_slice("web-2", "web", "10.1.0.2")])
    snap = tracker.checkout()
    assert snap.changed == {WEB, ("default", "db")}
    assert list(snap.services) == [spn()]
    assert ips(snap.endpoints[spn()]) == ["10.1.0.2"]


def test_replace_with_same_objects_reports_nothing(tracker: ChangeTracker) -> None:
    services = [service(), service("db", cluster_ip="10.0.0.20")]
    slices = [eps_slice("web-1", "web", "10.1.0.1"), eps_slice("db-1", "db", "10.1.0.9")]
    tracker.replace(services, slices)
    assert tracker.checkout().changed == {WEB, ("default", "db")}
    tracker.replace(copy.deepcopy(services), copy.deepcopy(slices))
    assert not tracker.pending
    assert tracker.checkout().changed == frozenset()


def test_replace_with_nothing_empties(tracker: ChangeTracker) -> None:
    tracker.replace([service()], [eps_slice("web-1", "web", "10.1.0.1")])
    tracker.checkout()
    tracker.replace([], [])
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert dict(snap.services) == {} and dict(snap.endpoints) == {}


def test_replace_drops_invalid_objects(tracker: ChangeTracker, invalid: Recorder) -> None:
    tracker.replace([service()], [eps_slice("web-1", "web", "10.1.0.1")])
    tracker.checkout()
    tracker.replace([service(ports=[{"name": "http", "port": 70000}])],
                    [eps_slice("web-1", "web", "10.1.0.1")])
    assert len(invalid.errors) == 1
    snap = tracker.checkout()
    assert snap.changed == {WEB} and dict(snap.services) == {}


def test_replace_services_leaves_slices(tracker: ChangeTracker) -> None:
    tracker.replace([service()], [eps_slice("web-1", "web", "10.1.0.1")])
    tracker.checkout()
    tracker.replace_services([service(), service("db", cluster_ip="10.0.0.20")])
    snap = tracker.checkout()
    assert snap.changed == {("default", "db")}
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]


def test_replace_slices_leaves_services(tracker: ChangeTracker) -> None:
    tracker.replace([service()], [eps_slice("web-1", "web", "10.1.0.1")])
    tracker.checkout()
    tracker.replace_slices([eps_slice("web-9", "web", "10.1.0.9")])
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert list(snap.services) == [spn()]
    assert ips(snap.endpoints[spn()]) == ["10.1.0.9"]


# --------------------------------------------------------------------------
# IP families


def test_ipv4_tracker_ignores_ipv6_slices(tracker: ChangeTracker,
                                          invalid: Recorder) -> None:
    tracker.set_service(service(clusterIPs=["10.0.0.10", "fd00::10"]))
    tracker.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    tracker.checkout()
    tracker.set_slice(eps_slice("web-v6", "web", "fd00::1", address_type="IPv6"))
    assert not tracker.pending
    snap = tracker.checkout()
    assert snap.changed == frozenset()
    assert ips(snap.endpoints[spn()]) == ["10.1.0.1"]
    assert invalid.errors == []


def test_ipv6_tracker(invalid: Recorder) -> None:
    t = ChangeTracker("node-a", IPFamily.IPv6, on_invalid=invalid)
    t.set_service(service(clusterIPs=["10.0.0.10", "fd00::10"]))
    t.set_service(service("v4only", cluster_ip="10.0.0.20"))
    t.set_slice(eps_slice("web-1", "web", "10.1.0.1"))
    t.set_slice(eps_slice("web-v6", "web", "fd00::1", address_type="IPv6"))
    t.set_slice(eps_slice("v4only-1", "v4only", "10.1.0.2"))
    snap = t.checkout()
    assert snap.changed == {WEB}  # the IPv4-only service has nothing for this family
    assert list(snap.services) == [spn()]
    assert snap.services[spn()].cluster_ip == ip_address("fd00::10")
    assert [e.address for e in snap.endpoints[spn()]] == ["[fd00::1]:8080"]


def test_change_in_other_family_only_not_reported(tracker: ChangeTracker) -> None:
    tracker.set_service(service(clusterIPs=["10.0.0.10", "fd00::10"]))
    tracker.checkout()
    tracker.set_service(service(clusterIPs=["10.0.0.10", "fd00::10"],
                                externalIPs=["2001:db8::1"]))
    assert tracker.checkout().changed == frozenset()
    tracker.set_service(service(clusterIPs=["10.0.0.10", "fd00::10"],
                                externalIPs=["2001:db8::1", "192.0.2.1"]))
    snap = tracker.checkout()
    assert snap.changed == {WEB}
    assert snap.services[spn()].external_ips == (ip_address("192.0.2.1"),)
