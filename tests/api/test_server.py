"""Prove FakeKubeAPI against the real ``kubernetes`` client (37.0.2, urllib3 2.8.0).

Why: the fake is only worth anything if the official client, configured through an ordinary
kubeconfig, sees exactly what it would see from a real apiserver: paging, resourceVersion
rules, watch streams, bookmarks, 410s, selectors, and the transport faults pyproxy must survive.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.api.server import FakeKubeAPI, SelectorError, parse_label_selector

KUBE_PROXY_SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"


@dataclass
class Kube:
    api: FakeKubeAPI
    client: client.ApiClient
    v1: client.CoreV1Api
    disc: client.DiscoveryV1Api
    kubeconfig: Path


def _connect(api: FakeKubeAPI, tmp_path: Path) -> Kube:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    cfg = client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    api_client = client.ApiClient(cfg)
    return Kube(api, api_client, client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client),
                kubeconfig)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    with FakeKubeAPI(bookmark_interval=0.2, bookmark_before_timeout=0.1,
                     future_rv_wait=0.2) as api:
        k = _connect(api, tmp_path)
        yield k
        k.client.close()


def svc(name: str, ns: str = "default", labels: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80}])
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if labels is not None:
        meta["labels"] = labels
    return {"kind": "Service", "apiVersion": "v1", "metadata": meta, "spec": spec}


def raw(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a client function and return the decoded JSON body, untouched by the models."""
    resp = fn(*args, _preload_content=False, **kwargs)
    return json.loads(resp.data)


def status_of(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


def gets(api: FakeKubeAPI, needle: str) -> list[str]:
    return [p for m, p in api.requests if m == "GET" and needle in p]


# ---- discovery and plumbing ----------------------------------------------------------------


def test_discovery_answers_the_client(kube: Kube) -> None:
    assert client.VersionApi(kube.client).get_code().git_version.startswith("v1.")
    assert client.CoreApi(kube.client).get_api_versions().versions == ["v1"]
    groups = {g.name for g in client.ApisApi(kube.client).get_api_versions().groups}
    assert {"discovery.k8s.io", "events.k8s.io"} <= groups
    core = {r.name for r in kube.v1.get_api_resources().resources}
    assert {"services", "nodes", "configmaps", "events"} <= core
    assert [r.name for r in kube.disc.get_api_resources().resources] == ["endpointslices"]
    paths = [p for _, p in kube.api.requests]
    assert {"/version/", "/api/", "/apis/"} <= set(paths)  # the client adds trailing slashes


def test_require_auth_checks_the_kubeconfig_token(tmp_path: Path) -> None:
    with FakeKubeAPI(require_auth=True) as api:
        k = _connect(api, tmp_path)
        assert k.v1.list_node().items == []
        pool = urllib3.PoolManager()
        resp = pool.request("GET", api.url + "/api/v1/nodes")
        assert resp.status == 401
        assert json.loads(resp.data)["reason"] == "Unauthorized"


def test_unknown_paths_and_missing_objects_are_404_status(kube: Kube) -> None:
    with pytest.raises(ApiException) as e:
        kube.v1.read_node("nope")
    assert e.value.status == 404
    body = status_of(e.value)
    assert body["kind"] == "Status" and body["reason"] == "NotFound"
    assert body["message"] == 'nodes "nope" not found'
    with pytest.raises(ApiException) as e:
        kube.disc.read_namespaced_endpoint_slice("x", "default")
    assert status_of(e.value)["message"] == 'endpointslices.discovery.k8s.io "x" not found'
    resp = urllib3.PoolManager().request("GET", kube.api.url + "/api/v1/pods")
    assert resp.status == 404 and json.loads(resp.data)["reason"] == "NotFound"


# ---- LIST ----------------------------------------------------------------------------------


def test_paginated_list_pages_share_one_snapshot(kube: Kube) -> None:
    for ns, name in [("b", "s1"), ("a", "s2"), ("a", "s1"), ("c", "s0"), ("b", "s0")]:
        kube.api.create(svc(name, ns))
    names: list[str] = []
    rvs: set[str] = set()
    remaining: list[int | None] = []
    token = None
    page = 0
    while True:
        resp = kube.v1.list_service_for_all_namespaces(limit=2, _continue=token)
        names += [f"{s.metadata.namespace}/{s.metadata.name}" for s in resp.items]
        rvs.add(resp.metadata.resource_version)
        remaining.append(resp.metadata.remaining_item_count)
        token = resp.metadata._continue
        if page == 0:  # writes after the first page must not leak into later pages
            kube.api.create(svc("zz", "c"))
            kube.api.delete("Service", "c", "s0")
        page += 1
        if not token:
            break
    assert names == ["a/s1", "a/s2", "b/s0", "b/s1", "c/s0"]
    assert len(rvs) == 1 and remaining == [3, 1, None]
    # The next full list is a new snapshot, at the current global revision.
    now = kube.v1.list_service_for_all_namespaces()
    assert now.metadata.resource_version == kube.api.resource_version != rvs.pop()
    assert [s.metadata.name for s in now.items if s.metadata.namespace == "c"] == ["zz"]


def test_list_shape_items_without_kind_and_global_rv(kube: Kube) -> None:
    empty = raw(kube.disc.list_endpoint_slice_for_all_namespaces)
    assert empty["items"] == [] and empty["kind"] == "EndpointSliceList"
    kube.api.create(svc("a"))
    node = kube.api.create({"kind": "Node", "metadata": {"name": "n1"}})
    body = raw(kube.v1.list_service_for_all_namespaces)
    assert body["kind"] == "ServiceList" and body["apiVersion"] == "v1"
    assert "kind" not in body["items"][0] and "apiVersion" not in body["items"][0]
    # The list RV is the global revision (the Node write), not the newest item's RV.
    assert body["metadata"]["resourceVersion"] == node["metadata"]["resourceVersion"]
    assert body["items"][0]["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"]
    one = raw(kube.v1.read_namespaced_service, "a", "default")
    assert one["kind"] == "Service" and one["apiVersion"] == "v1"


def test_expired_continue_is_410_with_an_inconsistent_token(tmp_path: Path) -> None:
    with FakeKubeAPI(continue_ttl=0.2) as api:
        k = _connect(api, tmp_path)
        for i in range(4):
            api.create(svc(f"s{i}"))
        first = k.v1.list_service_for_all_namespaces(limit=2)
        time.sleep(0.3)
        with pytest.raises(ApiException) as e:
            k.v1.list_service_for_all_namespaces(limit=2, _continue=first.metadata._continue)
        assert e.value.status == 410
        body = status_of(e.value)
        assert body["reason"] == "Expired" and body["metadata"]["continue"]
        rest = k.v1.list_service_for_all_namespaces(limit=2, _continue=body["metadata"]["continue"])
        assert [s.metadata.name for s in rest.items] == ["s2", "s3"]


def test_compact_expires_continue_tokens(kube: Kube) -> None:
    for i in range(3):
        kube.api.create(svc(f"s{i}"))
    first = kube.v1.list_service_for_all_namespaces(limit=1)
    kube.api.compact()
    with pytest.raises(ApiException) as e:
        kube.v1.list_service_for_all_namespaces(limit=1, _continue=first.metadata._continue)
    assert e.value.status == 410 and status_of(e.value)["reason"] == "Expired"


def test_resource_version_match_table(kube: Kube) -> None:
    api, v1 = kube.api, kube.v1
    api.create(svc("a", clusterIP="198.19.1.1"))
    api.create(svc("b", clusterIP="198.19.1.2"))
    old_rv = api.resource_version
    api.update(svc("a", clusterIP="198.19.1.1", ports=[{"port": 81}]))
    api.delete("Service", "default", "b")
    api.create(svc("c", clusterIP="198.19.1.3"))

    def names(resp: Any) -> list[str]:
        return [s.metadata.name for s in resp.items]

    # Exact RV: the state as of old_rv, reported at old_rv.
    exact = v1.list_service_for_all_namespaces(resource_version=old_rv,
                                               resource_version_match="Exact")
    assert names(exact) == ["a", "b"] and exact.metadata.resource_version == old_rv
    assert exact.items[0].spec.ports[0].port == 80
    # limit with RV=N (no match) is also exact, and pages continue that snapshot.
    paged = v1.list_service_for_all_namespaces(resource_version=old_rv, limit=1)
    assert names(paged) == ["a"] and paged.metadata.resource_version == old_rv
    more = v1.list_service_for_all_namespaces(limit=1, _continue=paged.metadata._continue)
    assert names(more) == ["b"] and more.metadata.resource_version == old_rv
    # NotOlderThan and "no limit, RV=N" serve the latest state.
    for kw in ({"resource_version_match": "NotOlderThan"}, {}):
        latest = v1.list_service_for_all_namespaces(resource_version=old_rv, **kw)
        assert names(latest) == ["a", "c"]
        assert latest.metadata.resource_version == api.resource_version
    # RV=0 may ignore limit: a full list, no continue token.
    zero = v1.list_service_for_all_namespaces(resource_version="0", limit=1)
    assert names(zero) == ["a", "c"] and not zero.metadata._continue
    # Invalid combinations: the real apiserver answers 422 Invalid for ListOptions
    # validation, and 400 for a resourceVersion together with continue.
    for kw in (
        {"resource_version_match": "Exact"},
        {"resource_version_match": "Exact", "resource_version": "0"},
        {"resource_version_match": "NotOlderThan"},
        {"resource_version_match": "Bogus", "resource_version": old_rv},
    ):
        with pytest.raises(ApiException) as e:
            v1.list_service_for_all_namespaces(**kw)
        assert e.value.status == 422 and status_of(e.value)["reason"] == "Invalid", kw
    with pytest.raises(ApiException) as e:
        v1.list_service_for_all_namespaces(limit=1, resource_version=old_rv,
                                           _continue=paged.metadata._continue)
    assert e.value.status == 400 and status_of(e.value)["reason"] == "BadRequest"
    # A compacted exact RV is gone; a future one times out with 504.
    api.compact()
    with pytest.raises(ApiException) as e:
        v1.list_service_for_all_namespaces(resource_version=old_rv, limit=5)
    assert e.value.status == 410 and status_of(e.value)["reason"] == "Expired"
    future = str(int(api.resource_version) + 100)
    with pytest.raises(ApiException) as e:
        v1.list_service_for_all_namespaces(resource_version=future)
    assert e.value.status == 504 and status_of(e.value)["reason"] == "Timeout"


# ---- selectors -----------------------------------------------------------------------------


def test_kube_proxy_label_selector_filters_lists(kube: Kube) -> None:
    kube.api.create(svc("plain1"))
    kube.api.create(svc("plain2"))
    kube.api.create(svc("headless", labels={"service.kubernetes.io/headless": ""}))
    kube.api.create(svc("other", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    resp = kube.v1.list_service_for_all_namespaces(label_selector=KUBE_PROXY_SELECTOR, limit=1)
    names: list[str] = [s.metadata.name for s in resp.items]
    assert resp.metadata.remaining_item_count is None  # omitted when a selector is used
    while resp.metadata._continue:
        resp = kube.v1.list_service_for_all_namespaces(
            label_selector=KUBE_PROXY_SELECTOR, limit=1, _continue=resp.metadata._continue)
        names += [s.metadata.name for s in resp.items]
    assert names == ["plain1", "plain2"]
    assert gets(kube.api, "labelSelector=%21service.kubernetes.io/headless%2C%21service")


def test_label_selector_grammar() -> None:
    labels = {"app": "web", "tier": "1", "env": "prod"}
    cases = {
        "": True, "app": True, "!app": False, "missing": False, "!missing": True,
        "app=web": True, "app==web": True, "app!=web": False, "missing!=x": True,
        "app in (web, db)": True, "app notin (web,db)": False, "missing notin (a)": True,
        "missing in (a)": False, "tier>0": True, "tier<1": False,
        "app=web,env=prod": True, "app=web, env=dev": False, "env=": False,
    }
    for text, want in cases.items():
        assert parse_label_selector(text).matches(labels) is want, text
    assert parse_label_selector("k=").matches({"k": ""})
    for bad in ("app in ()", "=x", "app,", "a b", "app in (a", "!app=x", "bad key!"):
        with pytest.raises(SelectorError):
            parse_label_selector(bad)


def test_selector_and_field_selector_errors_are_400(kube: Kube) -> None:
    for kw in ({"label_selector": "app in ()"}, {"field_selector": "spec.clusterIP=1.2.3.4"}):
        with pytest.raises(ApiException) as e:
            kube.v1.list_service_for_all_namespaces(**kw)
        assert e.value.status == 400 and status_of(e.value)["reason"] == "BadRequest"
    with pytest.raises(ApiException) as e:
        kube.v1.list_node(field_selector="metadata.namespace=x")
    assert status_of(e.value)["message"] == "field label not supported: metadata.namespace"


def test_field_selectors_nodes_and_configmaps(kube: Kube) -> None:
    kube.api.create({"kind": "Node", "metadata": {"name": "n1"},
                     "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]}})
    kube.api.create({"kind": "Node", "metadata": {"name": "n2"}})
    kube.api.create({"kind": "ConfigMap", "metadata": {"name": "kube-proxy",
                     "namespace": "kube-system"}, "data": {"config.conf": "mode: ''"}})
    kube.api.create({"kind": "ConfigMap",
                     "metadata": {"name": "other", "namespace": "kube-system"}})
    assert kube.v1.read_node("n1").status.addresses[0].address == "198.18.0.1"
    nodes = kube.v1.list_node(field_selector="metadata.name=n1")
    assert [n.metadata.name for n in nodes.items] == ["n1"]
    assert [n.metadata.name for n in kube.v1.list_node(field_selector="metadata.name!=n1").items
            ] == ["n2"]
    cms = kube.v1.list_namespaced_config_map("kube-system",
                                             field_selector="metadata.name=kube-proxy")
    assert [c.metadata.name for c in cms.items] == ["kube-proxy"]
    cm = kube.v1.read_namespaced_config_map("kube-proxy", "kube-system")
    assert cm.data == {"config.conf": "mode: ''"}
    kube.api.create(svc("x", "ns1"))
    kube.api.create(svc("y", "ns2"))
    assert [s.metadata.name for s in kube.v1.list_namespaced_service("ns2").items] == ["y"]
    got = kube.v1.list_service_for_all_namespaces(field_selector="metadata.namespace=ns1")
    assert [s.metadata.name for s in got.items] == ["x"]


# ---- WATCH ---------------------------------------------------------------------------------


def test_watch_from_list_rv_sees_changes_in_order(kube: Kube) -> None:
    api = kube.api
    api.create(svc("before"))
    rv = kube.v1.list_service_for_all_namespaces().metadata.resource_version
    api.create(svc("a", clusterIP="198.19.2.1"))  # replayed from history
    w = watch.Watch()
    seen: list[tuple[str, str, int]] = []
    finals: list[dict[str, Any]] = []
    for ev in w.stream(kube.v1.list_service_for_all_namespaces, resource_version=rv,
                       timeout_seconds=5, _request_timeout=10):
        obj = ev["raw_object"]
        assert obj["kind"] == "Service" and obj["apiVersion"] == "v1"
        seen.append((ev["type"], obj["metadata"]["name"], int(obj["metadata"]["resourceVersion"])))
        if len(seen) == 1:  # live changes while the stream is open
            api.update(svc("a", clusterIP="198.19.2.1", ports=[{"port": 8080}]))
            api.delete("Service", "default", "a")
        if ev["type"] == "DELETED":
            finals.append(obj)
            w.stop()
    assert [(t, n) for t, n, _ in seen] == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    rvs = [r for _, _, r in seen]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3
    assert str(rvs[-1]) == api.resource_version  # DELETED carries the deletion's RV
    assert finals[0]["spec"]["ports"][0]["port"] == 8080  # ... and the final state
    assert w.resource_version == api.resource_version


def test_watch_without_rv_sends_synthetic_added_and_times_out_cleanly(kube: Kube) -> None:
    kube.api.create(svc("a"))
    kube.api.create(svc("b"))
    start = time.monotonic()
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        kube.v1.list_service_for_all_namespaces, timeout_seconds=1)]
    elapsed = time.monotonic() - start
    assert events == [("ADDED", "a"), ("ADDED", "b")]
    assert 0.9 <= elapsed < 3  # the server ended the stream at timeoutSeconds, no error


def test_too_old_rv_with_timeout_raises_410(kube: Kube) -> None:
    kube.api.create(svc("a"))
    old = kube.v1.list_service_for_all_namespaces().metadata.resource_version
    kube.api.create(svc("b"))
    kube.api.compact()
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(kube.v1.list_service_for_all_namespaces,
                                      resource_version=old, timeout_seconds=5):
            pass
    assert e.value.status == 410
    assert f"too old resource version: {old} ({kube.api.resource_version})" in e.value.reason
    assert len(gets(kube.api, "watch=true")) == 1


def test_too_old_rv_without_timeout_retries_once_with_the_same_rv(tmp_path: Path) -> None:
    with FakeKubeAPI(history_size=2) as api:
        k = _connect(api, tmp_path)
        api.create(svc("a"))
        old = api.resource_version
        for i in range(3):  # overflow the bounded history
            api.create(svc(f"s{i}"))
        with pytest.raises(ApiException) as e:
            for _ in watch.Watch().stream(k.v1.list_service_for_all_namespaces,
                                          resource_version=old):
                pass
        assert e.value.status == 410
        watches = gets(api, "watch=true")
        assert len(watches) == 2 and all(f"resourceVersion={old}" in p for p in watches)


def test_bookmarks_advance_the_resource_version(kube: Kube) -> None:
    rv = kube.v1.list_service_for_all_namespaces().metadata.resource_version
    w = watch.Watch()
    marks: list[dict[str, Any]] = []
    node_rv = ""
    for ev in w.stream(kube.v1.list_service_for_all_namespaces, resource_version=rv,
                       allow_watch_bookmarks=True, timeout_seconds=3, _request_timeout=5):
        assert ev["type"] == "BOOKMARK"
        marks.append(ev["raw_object"])
        if len(marks) == 1:  # a write to another kind moves the global RV
            node_rv = kube.api.create({"kind": "Node", "metadata": {"name": "n"}})[
                "metadata"]["resourceVersion"]
        elif marks[-1]["metadata"]["resourceVersion"] == node_rv:
            w.stop()
    assert marks[-1] == {"kind": "Service", "apiVersion": "v1",
                         "metadata": {"resourceVersion": node_rv},
                         "spec": {}, "status": {"loadBalancer": {}}}
    assert w.resource_version == node_rv
    # Without allowWatchBookmarks there are none.
    assert list(watch.Watch().stream(kube.v1.list_service_for_all_namespaces,
                                     resource_version=node_rv, timeout_seconds=1)) == []


def test_endpointslice_bookmark_shape_and_pre_timeout_bookmark(tmp_path: Path) -> None:
    with FakeKubeAPI(bookmark_interval=60, bookmark_before_timeout=0.5) as api:
        k = _connect(api, tmp_path)
        start = time.monotonic()
        events = list(watch.Watch().stream(
            k.disc.list_endpoint_slice_for_all_namespaces, resource_version=api.resource_version,
            allow_watch_bookmarks=True, timeout_seconds=1))
        assert [e["type"] for e in events] == ["BOOKMARK"]  # only the one before the timeout
        assert events[0]["raw_object"] == {
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": api.resource_version},
            "addressType": "", "endpoints": None, "ports": None}
        assert time.monotonic() - start >= 0.9


def test_selector_transitions_live(kube: Kube) -> None:
    api = kube.api
    api.create(svc("a"))
    rv = api.resource_version

    def writer() -> None:
        assert api.wait_for_watches(1, "Service")
        api.update(svc("a", labels={"service.kubernetes.io/headless": ""}))
        api.update(svc("a", labels={"service.kubernetes.io/headless": "", "x": "y"}))  # unseen
        api.update(svc("a"))

    thread = threading.Thread(target=writer)
    thread.start()
    w = watch.Watch()
    seen: list[tuple[str, dict[str, Any]]] = []
    for ev in w.stream(kube.v1.list_service_for_all_namespaces, resource_version=rv,
                       label_selector=KUBE_PROXY_SELECTOR, timeout_seconds=5):
        seen.append((ev["type"], ev["raw_object"]))
        if len(seen) == 2:
            w.stop()
    thread.join(5)
    assert [t for t, _ in seen] == ["DELETED", "ADDED"]
    assert "labels" not in seen[0][1]["metadata"]  # DELETED shows the old content


def test_selector_transitions_deterministic(kube: Kube) -> None:
    api = kube.api
    api.create(svc("a", labels={"keep": "1"}))
    rv = api.resource_version
    # After rv: a becomes headless (stops matching), then is un-headlessed (matches again),
    # then an unrelated headless Service is created (never matches).
    api.update(svc("a", labels={"keep": "1", "service.kubernetes.io/headless": ""}))
    stop_rv = api.resource_version
    api.update(svc("a", labels={"keep": "2"}))
    add_rv = api.resource_version
    api.create(svc("h", labels={"service.kubernetes.io/headless": ""}))
    api.update(svc("a", labels={"keep": "3"}))
    w = watch.Watch()
    seen: list[tuple[str, dict[str, Any]]] = []
    for ev in w.stream(kube.v1.list_service_for_all_namespaces, resource_version=rv,
                       label_selector=KUBE_PROXY_SELECTOR, timeout_seconds=5):
        seen.append((ev["type"], ev["raw_object"]))
        if len(seen) == 3:
            w.stop()
    assert [t for t, _ in seen] == ["DELETED", "ADDED", "MODIFIED"]
    deleted = seen[0][1]
    assert deleted["metadata"]["labels"] == {"keep": "1"}  # old content ...
    assert deleted["metadata"]["resourceVersion"] == stop_rv  # ... with the new RV
    assert seen[1][1]["metadata"]["resourceVersion"] == add_rv
    assert seen[2][1]["metadata"]["labels"] == {"keep": "3"}


def test_namespaced_watch_only_sees_its_namespace(kube: Kube) -> None:
    rv = kube.api.resource_version
    kube.api.create(svc("x", "ns1"))
    kube.api.create(svc("y", "ns2"))
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        kube.v1.list_namespaced_service, "ns2", resource_version=rv, timeout_seconds=1)]
    assert events == [("ADDED", "y")]


def test_send_initial_events_ends_with_annotated_bookmark(kube: Kube) -> None:
    kube.api.create(svc("a"))
    w = watch.Watch()
    seen = []
    for ev in w.stream(kube.v1.list_service_for_all_namespaces, send_initial_events=True,
                       resource_version_match="NotOlderThan", allow_watch_bookmarks=True,
                       timeout_seconds=5):
        seen.append(ev)
        if ev["type"] == "BOOKMARK":
            w.stop()
    assert [e["type"] for e in seen] == ["ADDED", "BOOKMARK"]
    mark = seen[1]["raw_object"]["metadata"]
    assert mark["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert mark["resourceVersion"] == kube.api.resource_version
    with pytest.raises(ApiException) as e:  # sendInitialEvents needs NotOlderThan
        next(iter(watch.Watch().stream(kube.v1.list_service_for_all_namespaces,
                                       send_initial_events=True, timeout_seconds=1)))
    assert e.value.status == 422


# ---- transport faults ----------------------------------------------------------------------


def test_429_with_retry_after_is_retried_by_urllib3(kube: Kube) -> None:
    api = kube.api
    api.fail_next(3, 429, retry_after=0, path_contains="/api/v1/services")
    assert kube.v1.list_service_for_all_namespaces().items == []
    assert len(gets(api, "/api/v1/services")) == 4  # three 429s, then success
    api.clear_requests()
    api.fail_next(4, 429, retry_after=0, path_contains="/api/v1/services")
    with pytest.raises(ApiException) as e:
        kube.v1.list_service_for_all_namespaces()
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "0"
    assert status_of(e.value)["reason"] == "TooManyRequests"
    assert len(gets(api, "/api/v1/services")) == 4


@pytest.mark.parametrize("code,retry_after", [(429, None), (500, None), (503, None), (500, 0)])
def test_other_failures_raise_at_once(kube: Kube, code: int, retry_after: float | None) -> None:
    kube.api.fail_next(1, code, retry_after=retry_after)
    with pytest.raises(ApiException) as e:
        kube.v1.list_node()
    assert e.value.status == code
    assert len(gets(kube.api, "/api/v1/nodes")) == 1
    assert kube.v1.list_node().items == []  # the fault was used up


def test_fractional_retry_after_is_an_invalid_header_for_urllib3(kube: Kube) -> None:
    kube.api.fail_next(1, 429, retry_after=0.5)
    with pytest.raises(urllib3.exceptions.InvalidHeader):
        kube.v1.list_node()


def test_fail_next_on_the_watch_request(kube: Kube) -> None:
    kube.api.fail_next(1, 403, path_contains="watch=true")
    assert kube.v1.list_node().items == []  # not a watch: untouched
    with pytest.raises(ApiException) as e:
        next(iter(watch.Watch().stream(kube.v1.list_node, timeout_seconds=1)))
    assert e.value.status == 403


def test_cut_streams_surfaces_as_protocol_error(kube: Kube) -> None:
    kube.api.create(svc("a"))
    seen = []
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for ev in watch.Watch().stream(kube.v1.list_service_for_all_namespaces,
                                       timeout_seconds=10, _request_timeout=5):
            seen.append(ev["type"])
            assert kube.api.cut_streams() == 1
    assert seen == ["ADDED"]
    assert kube.v1.list_service_for_all_namespaces().items  # the server itself is fine


def test_hang_next_read_timeout_is_retried_by_urllib3(kube: Kube) -> None:
    kube.api.hang_next(1, 1.0)
    start = time.monotonic()
    assert kube.v1.list_node(_request_timeout=(1, 0.3)).items == []
    assert time.monotonic() - start < 1.0
    assert len(gets(kube.api, "/api/v1/nodes")) == 2
    kube.api.hang_next(4, 1.0)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as e:
        kube.v1.list_node(_request_timeout=(1, 0.2))
    assert isinstance(e.value.reason, urllib3.exceptions.ReadTimeoutError)


def test_go_down_and_come_up_on_the_same_port(kube: Kube) -> None:
    api = kube.api
    api.create(svc("a"))
    url, rv = api.url, api.resource_version
    stream = watch.Watch().stream(kube.v1.list_service_for_all_namespaces,
                                  timeout_seconds=10, _request_timeout=5)
    assert next(stream)["type"] == "ADDED"
    api.go_down()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(stream)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as e:
        kube.v1.list_service_for_all_namespaces()
    assert isinstance(e.value.reason, urllib3.exceptions.NewConnectionError)
    api.create(svc("b"))  # state changes while down are kept
    api.come_up()
    assert api.url == url
    resp = kube.v1.list_service_for_all_namespaces()
    assert [s.metadata.name for s in resp.items] == ["a", "b"]
    assert int(resp.metadata.resource_version) == int(rv) + 1


# ---- objects -------------------------------------------------------------------------------


def test_service_defaulting_like_the_apiserver(kube: Kube) -> None:
    api = kube.api
    created = api.create(svc("aff", sessionAffinity="ClientIP", clusterIP="198.19.3.1"))
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
    spec = created["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    assert spec["clusterIPs"] == ["198.19.3.1"] and spec["ipFamilies"] == ["IPv4"]
    assert spec["ports"][0] == {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}
    model = kube.v1.read_namespaced_service("aff", "default")
    assert model.spec.session_affinity_config.client_ip.timeout_seconds == 10800
    plain_obj = api.create(svc("plain", clusterIP="198.19.3.2"))
    plain = plain_obj["spec"]
    assert plain["sessionAffinity"] == "None" and "sessionAffinityConfig" not in plain
    np = api.create(svc("np", type="NodePort"))["spec"]
    assert np["clusterIP"] and 30000 <= np["ports"][0]["nodePort"] <= 32767
    assert np["externalTrafficPolicy"] == "Cluster"
    # Spec change bumps generation; a no-op update writes nothing.
    before = api.resource_version
    same = api.update(svc("plain", clusterIP="198.19.3.2"))
    assert api.resource_version == before
    assert same["metadata"]["resourceVersion"] == plain_obj["metadata"]["resourceVersion"]
    changed = api.update(svc("plain", clusterIP="198.19.3.2", ports=[{"port": 81}]))
    assert changed["metadata"]["generation"] == 2
    assert changed["metadata"]["uid"] == api.get("Service", "default", "plain")["metadata"]["uid"]


def test_malformed_objects_are_stored_without_validation(kube: Kube) -> None:
    kube.api.create(svc("bad", clusterIP="not-an-ip", ports=[{"port": "eighty"}, "junk"]))
    kube.api.create({"kind": "EndpointSlice", "metadata": {"name": "s", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "bad"}},
                     "addressType": "IPv4", "endpoints": [], "ports": [{"port": 80}]})
    item = raw(kube.v1.list_service_for_all_namespaces)["items"][0]
    assert item["spec"]["clusterIP"] == "not-an-ip"
    assert item["spec"]["ports"][1] == "junk"
    eps = raw(kube.disc.list_endpoint_slice_for_all_namespaces)["items"][0]
    assert eps["endpoints"] is None  # an empty list comes back as null, as from etcd
    assert eps["ports"] == [{"port": 80, "name": "", "protocol": "TCP"}]
    # The 37.0.2 models accept the null.
    assert kube.disc.list_endpoint_slice_for_all_namespaces().items[0].endpoints is None


def test_control_api_get_list_apply_delete(kube: Kube) -> None:
    api = kube.api
    assert api.get("Service", "default", "a") is None
    api.apply(svc("a"))
    api.apply(svc("a", clusterIP="198.19.4.1"))
    assert api.get("Service", "default", "a")["spec"]["clusterIP"] == "198.19.4.1"
    with pytest.raises(ValueError):
        api.create(svc("a"))
    with pytest.raises(KeyError):
        api.update(svc("zzz"))
    gone = api.delete("Service", "default", "a")
    assert gone["metadata"]["resourceVersion"] == api.resource_version
    with pytest.raises(KeyError):
        api.delete("Service", "default", "a")
    api.create({"kind": "Node", "metadata": {"name": "n"}})
    assert [n["metadata"]["name"] for n in api.list("Node")] == ["n"]
    assert api.delete("Node", None, "n")["kind"] == "Node"


def test_events_are_accepted_and_dropped(kube: Kube) -> None:
    ev = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="pyproxy."),
        involved_object=client.V1ObjectReference(kind="Node", name="n1"),
        reason="Starting", message="hello", type="Normal")
    created = kube.v1.create_namespaced_event("default", ev)
    assert created.metadata.name.startswith("pyproxy.")
    ev2 = client.EventsV1Event(metadata=client.V1ObjectMeta(name="e2"), reason="Starting",
                               event_time=datetime.now(UTC), action="StartKubeProxy", type="Normal",
                               reporting_controller="pyproxy", reporting_instance="n1")
    client.EventsV1Api(kube.client).create_namespaced_event("default", ev2)
    assert [e["apiVersion"] for e in kube.api.events] == ["v1", "events.k8s.io/v1"]
    assert kube.v1.list_service_for_all_namespaces().items == []  # nothing stored


def test_concurrent_writers_and_watchers_agree(kube: Kube) -> None:
    """Events fan out atomically: every watcher sees every write exactly once, in order."""
    api = kube.api
    rv = api.resource_version
    results: list[list[int]] = [[], []]

    def consume(slot: int) -> None:
        w = watch.Watch()
        for ev in w.stream(kube.v1.list_service_for_all_namespaces, resource_version=rv,
                           timeout_seconds=5, _request_timeout=10):
            results[slot].append(int(ev["raw_object"]["metadata"]["resourceVersion"]))
            if len(results[slot]) == 40:
                w.stop()

    def write(prefix: str) -> None:
        for i in range(20):
            api.create(svc(f"{prefix}{i}"))

    readers = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    writers = [threading.Thread(target=write, args=(p,)) for p in ("x", "y")]
    for t in readers:
        t.start()
    assert api.wait_for_watches(2, "Service")
    for t in writers:
        t.start()
    for t in writers + readers:
        t.join(10)
    assert results[0] == results[1] == sorted(results[0]) and len(results[0]) == 40
