"""Unit tests for pyproxy.sources.files: loading a directory of manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from textwrap import dedent

import pytest

from pyproxy.sources import files

SVC = dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: default}
    spec:
      clusterIP: 10.0.0.10
      ports: [{name: http, port: 80}]
    """)

SLICE = dedent("""\
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: web-1
      namespace: default
      labels: {kubernetes.io/service-name: web}
    addressType: IPv4
    ports: [{name: http, port: 8080}]
    endpoints: [{addresses: [10.1.0.1]}]
    """)

NODE = dedent("""\
    apiVersion: v1
    kind: Node
    metadata: {name: node-a}
    status: {addresses: [{type: InternalIP, address: 10.0.0.5}]}
    """)


def names(objs: list[dict[str, object]]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objs)  # type: ignore[index]


def test_multi_document_file(tmp_path: Path) -> None:
    (tmp_path / "all.yaml").write_text(f"{SVC}---\n{SLICE}---\n{NODE}---\n")
    m = files.load(tmp_path)
    assert names(m.services) == ["web"]
    assert names(m.slices) == ["web-1"]
    assert names(m.nodes) == ["node-a"]
    assert m.errors == []
    assert m.services[0]["spec"]["ports"] == [{"name": "http", "port": 80}]


def test_empty_documents_and_other_kinds_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(
        "---\n---\n# only a comment\n---\n"
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n" + SVC)
    m = files.load(tmp_path)
    assert names(m.services) == ["web"]
    assert m.slices == [] and m.nodes == [] and m.errors == []


def test_kind_list(tmp_path: Path) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b", "namespace": "x"}},
        {"kind": "EndpointSlice", "metadata": {"name": "a-1", "namespace": "x"}},
        {"kind": "List", "items": [{"kind": "Node", "metadata": {"name": "n"}}]},
    ]}
    (tmp_path / "list.json").write_text(json.dumps(doc))
    m = files.load(tmp_path)
    assert names(m.services) == ["a", "b"]
    assert names(m.slices) == ["a-1"]
    assert names(m.nodes) == ["n"]


def test_typed_lists(tmp_path: Path) -> None:
    (tmp_path / "svcs.yaml").write_text(dedent("""\
        apiVersion: v1
        kind: ServiceList
        metadata: {resourceVersion: "12"}
        items:
        - apiVersion: v1
          kind: Service
          metadata: {name: a, namespace: x}
        - apiVersion: v1
          kind: Service
          metadata: {name: b, namespace: x}
        """))
    (tmp_path / "slices.yaml").write_text(dedent("""\
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSliceList
        items:
        - {kind: EndpointSlice, metadata: {name: a-1, namespace: x}}
        """))
    (tmp_path / "empty.yaml").write_text("kind: ServiceList\nitems: null\n")
    m = files.load(tmp_path)
    assert names(m.services) == ["a", "b"]
    assert names(m.slices) == ["a-1"]
    assert m.errors == []


def test_typed_list_items_without_kind(tmp_path: Path) -> None:
    # A saved API LIST response: items carry no kind or apiVersion.
    (tmp_path / "services.json").write_text(json.dumps({
        "kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
        "items": [{"metadata": {"name": "a", "namespace": "x"}, "spec": {}}]}))
    (tmp_path / "slices.json").write_text(json.dumps({
        "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
        "items": [{"metadata": {"name": "a-1", "namespace": "x"}, "addressType": "IPv4"}]}))
    (tmp_path / "nodes.json").write_text(json.dumps({
        "kind": "NodeList", "items": [{"metadata": {"name": "n"}}]}))
    m = files.load(tmp_path)
    assert names(m.services) == ["a"] and m.services[0]["kind"] == "Service"
    assert names(m.slices) == ["a-1"]
    assert names(m.nodes) == ["n"]


def test_nested_directories_and_suffixes(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "svc.yml").write_text(SVC)
    (tmp_path / "a" / "slice.json").write_text(json.dumps({
        "kind": "EndpointSlice", "metadata": {"name": "web-1", "namespace": "default"}}))
    (tmp_path / "node.yaml").write_text(NODE)
    (tmp_path / "README.md").write_text("# kind: Service\n")
    (tmp_path / "notes.txt").write_text("{{{ not yaml")
    (tmp_path / "svc.yaml.bak").write_text(SVC)
    (tmp_path / ".hidden.yaml").write_text(SVC)
    m = files.load(tmp_path)
    assert names(m.services) == ["web"]
    assert names(m.slices) == ["web-1"]
    assert names(m.nodes) == ["node-a"]
    assert m.errors == []


def test_broken_file_named_others_load(tmp_path: Path) -> None:
    (tmp_path / "a-good.yaml").write_text(SVC)
    bad = tmp_path / "b-bad.yaml"
    bad.write_text("kind: Service\nmetadata: {name: [unclosed\n")
    (tmp_path / "c-good.yaml").write_text(SLICE)
    m = files.load(tmp_path)
    assert names(m.services) == ["web"]
    assert names(m.slices) == ["web-1"]
    assert len(m.errors) == 1
    assert str(bad) in m.errors[0]


def test_broken_later_document_skips_the_whole_file(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(f"{SVC}---\nkey: [oops\n")
    m = files.load(tmp_path)
    assert m.services == []
    assert len(m.errors) == 1 and "x.yaml" in m.errors[0]


def test_undecodable_file_named_others_load(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    (tmp_path / "svc.yaml").write_text(SVC)
    m = files.load(tmp_path)
    assert names(m.services) == ["web"]
    assert len(m.errors) == 1 and "bin.yaml" in m.errors[0]


def test_non_mapping_document_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(f"- just\n- a list\n---\n{SVC}---\nplain string\n")
    m = files.load(tmp_path)
    assert names(m.services) == ["web"]
    assert len(m.errors) == 2
    assert all("x.yaml" in e for e in m.errors)


def test_single_file(tmp_path: Path) -> None:
    path = tmp_path / "only.yaml"
    path.write_text(SVC)
    (tmp_path / "other.yaml").write_text(SLICE)
    m = files.load(path)
    assert names(m.services) == ["web"] and m.slices == []


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        files.load(tmp_path / "nope")
    assert files.fingerprint(tmp_path / "nope") == ()


def test_empty_directory(tmp_path: Path) -> None:
    m = files.load(tmp_path)
    assert (m.services, m.slices, m.nodes, m.errors) == ([], [], [], [])


def test_node_lookup(tmp_path: Path) -> None:
    (tmp_path / "n.yaml").write_text(f"{NODE}---\nkind: Node\nmetadata: {{name: node-b}}\n")
    m = files.load(tmp_path)
    assert m.node("node-b") is not None
    assert m.node("node-a")["status"]["addresses"][0]["address"] == "10.0.0.5"  # type: ignore[index]
    assert m.node("node-c") is None


def test_loaded_objects_are_independent_copies(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(SVC)
    m = files.load(tmp_path)
    m.services[0]["kind"] = "Changed"
    assert files.load(tmp_path).services[0]["kind"] == "Service"


# --------------------------------------------------------------------------
# fingerprint


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(SVC)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    first = files.fingerprint(tmp_path)
    assert first == files.fingerprint(tmp_path)
    assert [e[0] for e in first] == [str(path)]

    path.write_text(SVC.replace("80", "81"))  # same size
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    second = files.fingerprint(tmp_path)
    assert second != first

    path.write_text(SVC + "# more\n")
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))  # same mtime, other size
    assert files.fingerprint(tmp_path) != second


def test_fingerprint_sees_added_and_removed_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SVC)
    first = files.fingerprint(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text(SLICE)
    second = files.fingerprint(tmp_path)
    assert len(second) == 2 and second != first
    (tmp_path / "a.yaml").unlink()
    third = files.fingerprint(tmp_path)
    assert [Path(e[0]).name for e in third] == ["b.yaml"]


def test_fingerprint_ignores_non_manifests(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SVC)
    first = files.fingerprint(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".swp.yaml").write_text("x")
    assert files.fingerprint(tmp_path) == first


def test_hidden_directories_are_skipped(tmp_path: Path) -> None:
    """A mounted ConfigMap keeps copies under ..<timestamp>/: read each object once."""
    doc = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\n"
    (tmp_path / "..2026_11_22").mkdir()
    (tmp_path / "..2026_11_22" / "svc.yaml").write_text(doc)
    (tmp_path / "svc.yaml").write_text(doc)
    assert len(files.load(tmp_path).services) == 1
