"""The RBAC rules in manifests/ against the API calls pyproxy's agent really makes.

The agent runs (as a subprocess, in a throwaway network namespace, so the rules
it programs touch nothing else) against the tests' API server, once with the
DaemonSet's own command line and once reading its configuration through the
API (--config-configmap). Each recorded request is turned into the attributes
the API server's authorizer sees (verb, API group, resource, namespace, name)
and must be allowed by the ClusterRole or the Role bound to pyproxy's
ServiceAccount; and every verb those rules grant must be used by one of the
runs, or be justified in JUSTIFIED below. Nothing missing, nothing extra.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from tests.api.server import FakeKubeAPI

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
PYPROXY = str(Path(sys.executable).parent / "pyproxy")
NODE = "node-a"

# Grants no run exercises, each with the reason it stays. Keep this short: an
# entry here is a permission the agent holds without a test showing it needs it.
# Keys are (namespace or "" for cluster-wide, API group, resource, verb).
JUSTIFIED: dict[tuple[str, str, str, str], str] = {}

# Non-resource URLs every authenticated client may GET (the system:discovery and
# system:public-info-viewer ClusterRoles); the kubernetes client reads some of them.
DISCOVERY = ("/api", "/api/*", "/apis", "/apis/*", "/version", "/version/", "/healthz",
             "/livez", "/readyz", "/openapi", "/openapi/*")


# -- what the authorizer sees --------------------------------------------------------------------


@dataclass(frozen=True)
class Attributes:
    """A resource request as Kubernetes' RequestInfo resolves it."""

    verb: str
    group: str
    resource: str
    namespace: str = ""  # "" for a cluster-scoped request or one across all namespaces
    name: str = ""
    subresource: str = ""

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        named = f" {self.name!r}" if self.name else ""
        res = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {res}.{self.group or 'core'}{named}{where}"


def request_attributes(method: str, target: str) -> Attributes | str:
    """The request's Attributes, or its path when it is a non-resource request."""
    split = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
    parts = [p for p in split.path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return split.path
    if not rest:
        return split.path
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 2:
        if len(rest) == 2:
            rest = ["namespaces", rest[1]]
        else:
            namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    method = method.upper()
    if method == "GET":
        if name:
            verb = "get"
        else:
            verb = "watch" if query.get("watch", "").lower() in ("1", "true") else "list"
    elif method == "POST":
        verb = "create"
    elif method == "PUT":
        verb = "update"
    elif method == "PATCH":
        verb = "patch"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        raise AssertionError(f"unexpected method {method} {target}")
    if not name and verb in ("list", "watch"):
        # The API server authorizes a list or watch selecting one name by
        # metadata.name as a request for that name (so resourceNames can allow it).
        for term in query.get("fieldSelector", "").split(","):
            field, op, value = term.partition("=")  # metadata.name=x or metadata.name==x
            if field == "metadata.name" and op:
                name = value.removeprefix("=")
    return Attributes(verb, group, resource, namespace, name, subresource)


def is_discovery(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in DISCOVERY)


# -- what the manifests grant ------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    namespace: str  # "" for a ClusterRole bound cluster-wide
    group: str
    resource: str
    verb: str
    names: tuple[str, ...]  # resourceNames; () means any


def _objects() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def service_account() -> tuple[str, str]:
    (sa,) = [d for d in _objects() if d["kind"] == "ServiceAccount"]
    return sa["metadata"]["namespace"], sa["metadata"]["name"]


def grants(objects: list[dict[str, Any]] | None = None) -> list[Grant]:
    """Everything the bindings give the DaemonSet's ServiceAccount."""
    objects = _objects() if objects is None else objects
    sa_ns, sa_name = service_account()
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
             for d in objects if d["kind"] in ("Role", "ClusterRole")}
    out: list[Grant] = []
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa_name
                   and s.get("namespace") == sa_ns for s in binding.get("subjects", [])):
            continue
        scope = binding["metadata"].get("namespace", "")
        ref = binding["roleRef"]
        role_ns = scope if ref["kind"] == "Role" else ""
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']} refers to " \
                                 f"missing {ref['kind']} {ref['name']}"
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule, "pyproxy needs no non-resource URL"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.append(Grant(scope, group, resource, verb,
                                         tuple(rule.get("resourceNames", ()))))
    return out


def allowed_by(attrs: Attributes, granted: list[Grant]) -> Grant | None:
    """The grant that allows the request, as the RBAC authorizer decides."""
    res = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    for g in granted:
        if g.namespace and g.namespace != attrs.namespace:
            continue
        if g.group not in ("*", attrs.group) or g.resource not in ("*", res):
            continue
        if g.verb not in ("*", attrs.verb):
            continue
        if g.names and attrs.name not in g.names:
            continue
        return g
    return None


def check(requests: list[tuple[str, str]],
          granted: list[Grant]) -> tuple[list[str], set[Grant]]:
    """(requests the rules refuse, grants the requests used)."""
    denied: list[str] = []
    used: set[Grant] = set()
    for method, target in requests:
        attrs = request_attributes(method, target)
        if isinstance(attrs, str):
            if not (method == "GET" and is_discovery(attrs)):
                denied.append(f"{method} {target} (non-resource URL)")
            continue
        grant = allowed_by(attrs, granted)
        if grant is None:
            denied.append(f"{attrs}  <- {method} {target}")
        else:
            used.add(grant)
    return denied, used


def key(g: Grant) -> tuple[str, str, str, str]:
    return (g.namespace, g.group, g.resource, g.verb)


# -- the checker itself (no root needed) -------------------------------------------------------


@pytest.mark.parametrize(("method", "target", "expected"), [
    ("GET", "/api/v1/services?labelSelector=x&limit=500", Attributes("list", "", "services")),
    ("GET", "/api/v1/services?watch=1&resourceVersion=5",
     Attributes("watch", "", "services")),
    ("GET", "/apis/discovery.k8s.io/v1/endpointslices?watch=true",
     Attributes("watch", "discovery.k8s.io", "endpointslices")),
    ("GET", "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-a",
     Attributes("list", "", "nodes", name="node-a")),
    ("GET", "/api/v1/nodes/node-a", Attributes("get", "", "nodes", name="node-a")),
    ("GET", "/api/v1/namespaces/kube-system/configmaps/pyproxy",
     Attributes("get", "", "configmaps", "kube-system", "pyproxy")),
    ("POST", "/apis/events.k8s.io/v1/namespaces/default/events",
     Attributes("create", "events.k8s.io", "events", "default")),
    ("PATCH", "/api/v1/namespaces/default/events/e1",
     Attributes("patch", "", "events", "default", "e1")),
    ("GET", "/api/v1/namespaces/kube-system", Attributes("get", "", "namespaces",
                                                         name="kube-system")),
    ("GET", "/apis/discovery.k8s.io/v1/", "/apis/discovery.k8s.io/v1/"),
    ("GET", "/version/", "/version/"),
])
def test_request_attributes(method: str, target: str, expected: Attributes | str) -> None:
    assert request_attributes(method, target) == expected


def test_checker_honours_resource_names_and_namespaces() -> None:
    granted = grants()
    cm = "/api/v1/namespaces/kube-system/configmaps"
    ok = [("GET", f"{cm}/pyproxy"), ("GET", f"{cm}?fieldSelector=metadata.name%3Dpyproxy"),
          ("GET", f"{cm}?fieldSelector=metadata.name%3Dpyproxy&watch=1"),
          ("GET", "/api/v1/services?limit=500"), ("GET", "/apis/"), ("GET", "/version/")]
    assert check(ok, granted)[0] == []
    refused = [
        ("GET", cm),  # every ConfigMap in kube-system: resourceNames cannot allow it
        ("GET", f"{cm}/kube-proxy"),
        ("GET", f"{cm}?fieldSelector=metadata.name%3Dcoredns&watch=1"),
        ("GET", "/api/v1/namespaces/default/configmaps/pyproxy"),
        ("GET", "/api/v1/namespaces/kube-system/secrets/pyproxy"),
        ("GET", "/api/v1/services/x"),
        ("PUT", f"{cm}/pyproxy"),
        ("POST", "/api/v1/namespaces/default/events"),
        ("GET", "/metrics"),
    ]
    for request in refused:
        assert len(check([request], granted)[0]) == 1, request


def test_rules_grant_least_privilege() -> None:
    """No wildcard, no write, no Secret, in any rule."""
    for g in grants():
        assert "*" not in (g.group, g.resource, g.verb), g
        assert g.verb in ("get", "list", "watch", "create", "patch", "update"), g
        assert g.resource not in ("secrets", "pods/exec", "serviceaccounts/token"), g
        if g.verb in ("create", "patch", "update"):
            assert g.resource == "events", g


# -- the agent's real calls (root: a network namespace of its own) -----------------------------


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="needs root, iproute2 and iptables (runs the agent in a network namespace)",
)


def _daemonset_command() -> list[str]:
    (ds,) = [d for d in _objects() if d["kind"] == "DaemonSet"]
    command: list[str] = ds["spec"]["template"]["spec"]["containers"][0]["command"]
    return command


def _configmap() -> dict[str, Any]:
    (cm,) = [d for d in _objects() if d["kind"] == "ConfigMap"]
    return cm


def _argv(variant: str, tmp: Path, kubeconfig: Path) -> list[str]:
    """The DaemonSet's command line, with this test's paths."""
    args = [a.replace("$(NODE_NAME)", NODE) for a in _daemonset_command()[1:]]
    cm = _configmap()
    if variant == "daemonset":
        conf = tmp / "config.conf"
        conf.write_text(cm["data"]["config.conf"])
        args = [f"--config={conf}" if a.startswith("--config=") else a for a in args]
    else:
        args = [a for a in args if not a.startswith("--config=")]
        meta = cm["metadata"]
        args += [f"--config-configmap={meta['namespace']}/{meta['name']}"]
    return [PYPROXY, *args, f"--kubeconfig={kubeconfig}"]


def _cluster_objects() -> list[dict[str, Any]]:
    cm = _configmap()
    return [
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
         "status": {"addresses": [{"type": "InternalIP", "address": "198.18.100.1"}]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "web", "namespace": "t"},
         "spec": {"type": "NodePort", "clusterIP": "198.18.200.10",
                  "clusterIPs": ["198.18.200.10"],
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                             "protocol": "TCP"}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-a", "namespace": "t",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": ["198.18.1.1"], "conditions": {"ready": True},
                        "nodeName": NODE}],
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": dict(cm["metadata"]),
         "data": dict(cm["data"])},
    ]


def _programmed(netns: str) -> bool:
    for tool in ("iptables-nft-save", "iptables-legacy-save"):
        out = subprocess.run(["ip", "netns", "exec", netns, tool, "-t", "nat"],
                             capture_output=True, text=True, check=False, timeout=30)
        if "PYPROXY-SERVICES" in out.stdout:
            return True
    return False


def _run_agent(netns: str, variant: str, tmp: Path) -> list[tuple[str, str]]:
    tmp.mkdir(parents=True, exist_ok=True)
    api = FakeKubeAPI(netns=netns).start()
    proc: subprocess.Popen[bytes] | None = None
    log_path = tmp / "agent.log"
    try:
        for obj in _cluster_objects():
            api.create(obj)
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("KUBERNETES_") and k != "NODE_NAME"}
        argv = ["ip", "netns", "exec", netns, *_argv(variant, tmp, kubeconfig)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    env=env)
        watches = 4 if variant == "configmap" else 3
        deadline = time.monotonic() + 30
        while not (api.watch_count() >= watches and _programmed(netns)):
            if proc.poll() is not None:
                raise AssertionError(f"pyproxy exited ({proc.returncode}):\n"
                                     f"{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no first sync within 30 s ({api.watch_count()} watches):"
                                     f"\n{log_path.read_text()}")
            time.sleep(0.1)
        # Whatever the agent does after its first sync (such as posting an Event).
        time.sleep(1.0)
        return api.requests
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        api.stop()


VARIANTS = ("daemonset", "configmap")


@pytest.fixture(scope="module")
def agent_requests(tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[dict[str, list[tuple[str, str]]]]:
    netns = f"pyproxy-rbac-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        tmp = tmp_path_factory.mktemp("rbac")
        yield {v: _run_agent(netns, v, tmp / v) for v in VARIANTS}
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("variant", VARIANTS)
def test_agent_calls_are_all_allowed(agent_requests: dict[str, list[tuple[str, str]]],
                                     variant: str) -> None:
    requests = agent_requests[variant]
    denied, _ = check(requests, grants())
    assert denied == [], "the agent made calls the RBAC rules refuse (add them to " \
                         "manifests/clusterrole.yaml or role.yaml):\n" + "\n".join(denied)


@pytest.mark.kernel
@needs_root
@pytest.mark.parametrize("variant", VARIANTS)
def test_agent_really_talked_to_the_api(agent_requests: dict[str, list[tuple[str, str]]],
                                        variant: str) -> None:
    """Guards the check above against a run that never reached the API server."""
    seen = {(a.verb, a.resource) for m, t in agent_requests[variant]
            if isinstance(a := request_attributes(m, t), Attributes)}
    for resource in ("services", "endpointslices", "nodes"):
        assert {("list", resource), ("watch", resource)} <= seen, resource
    if variant == "configmap":
        assert {("get", "configmaps"), ("list", "configmaps"), ("watch", "configmaps")} <= seen
    else:
        assert not any(r == "configmaps" for _, r in seen)


@pytest.mark.kernel
@needs_root
def test_every_granted_verb_is_used_or_justified(
        agent_requests: dict[str, list[tuple[str, str]]]) -> None:
    granted = grants()
    used: set[Grant] = set()
    for requests in agent_requests.values():
        used |= check(requests, granted)[1]
    unused = sorted({key(g) for g in granted} - {key(g) for g in used} - set(JUSTIFIED))
    assert unused == [], "granted but never used by the agent (drop them, or justify them " \
                         "in JUSTIFIED):\n" + "\n".join(map(str, unused))
    stale = sorted(set(JUSTIFIED) - {key(g) for g in granted})
    assert stale == [], f"JUSTIFIED names grants the manifests no longer hold: {stale}"
