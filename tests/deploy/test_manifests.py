"""The deployment files: manifests/ (kubectl apply -k), the Dockerfile, .dockerignore.

Every manifest is validated against the Kubernetes OpenAPI schemas (strict:
unknown fields fail), then checked for what running pyproxy in place of
kube-proxy needs. RBAC is checked against the agent's real API calls in
test_rbac.py.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pyproxy.cli import main as cli_main
from pyproxy.config import load_config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
NAMESPACE = "kube-system"
NAME = "pyproxy"
CONFIG_DIR = "/var/lib/pyproxy"
# The oldest Kubernetes still in wide use and the newest the schemas know.
OLDEST_VERSION = "1.29.0"


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_objects() -> list[dict[str, Any]]:
    return [d for p in manifest_files() for d in documents(p)]


def only(kind: str) -> dict[str, Any]:
    found = [d for d in all_objects() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return doc


def daemonset_pod() -> dict[str, Any]:
    pod: dict[str, Any] = only("DaemonSet")["spec"]["template"]["spec"]
    return pod


def container() -> dict[str, Any]:
    containers = daemonset_pod()["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def config_text() -> str:
    text: str = only("ConfigMap")["data"]["config.conf"]
    return text


# -- schemas ------------------------------------------------------------------------------------


def _versions() -> list[str]:
    known = kubernetes_validate.utils.all_versions()
    return sorted({v for v in (OLDEST_VERSION, kubernetes_validate.latest_version())
                   if v in known})


@pytest.mark.parametrize("version", _versions())
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_matches_the_openapi_schema(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_misspelt_field() -> None:
    ds = only("DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostNetwrk"):
        kubernetes_validate.validate(ds, _versions()[0], strict=True)


def test_every_object_is_pyproxys_and_namespaced_objects_are_in_kube_system() -> None:
    for doc in all_objects():
        meta = doc["metadata"]
        assert meta["name"] == NAME, doc["kind"]
        assert meta.get("labels", {}).get("k8s-app") == NAME, doc["kind"]
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            assert "namespace" not in meta
        else:
            assert meta["namespace"] == NAMESPACE, doc["kind"]
    assert not any(d["kind"] == "Namespace" for d in all_objects())


# -- kustomization ---------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_not_the_examples() -> None:
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == sorted(p.name for p in manifest_files())
    assert not any("examples" in r for r in resources)
    kinds = sorted(d["kind"] for d in all_objects())
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                            "RoleBinding", "ConfigMap", "DaemonSet"])


def test_kustomization_image_entry_names_the_daemonsets_image() -> None:
    (entry,) = kustomization()["images"]
    name, _, tag = container()["image"].rpartition(":")
    assert entry["name"] == name
    assert entry["newTag"] == tag


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (built-in kustomize)")
def test_kubectl_kustomize_renders_the_manifests() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(d["kind"] for d in all_objects())
    (ds,) = [d for d in rendered if d["kind"] == "DaemonSet"]
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == container()["image"]


# -- identities and bindings ------------------------------------------------------------------


def test_bindings_tie_the_roles_to_the_daemonsets_service_account() -> None:
    sa = only("ServiceAccount")["metadata"]
    assert daemonset_pod()["serviceAccountName"] == sa["name"]
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"),
                                    ("RoleBinding", "Role")):
        binding = only(binding_kind)
        role_name = only(role_kind)["metadata"]["name"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": role_kind, "name": role_name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"],
                                        "namespace": sa["namespace"]}]


def test_role_reads_only_pyproxys_configmap() -> None:
    (rule,) = only("Role")["rules"]
    assert rule == {"apiGroups": [""], "resources": ["configmaps"],
                    "resourceNames": [only("ConfigMap")["metadata"]["name"]],
                    "verbs": ["get", "list", "watch"]}


# -- the ConfigMap -----------------------------------------------------------------------------


def test_configmap_holds_a_kube_proxy_configuration_pyproxy_loads_without_warnings() -> None:
    doc = yaml.safe_load(config_text())
    assert doc["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1"
    assert doc["kind"] == "KubeProxyConfiguration"
    config, warnings = load_config(config_text(), source="manifests/configmap.yaml")
    assert warnings == []
    assert str(config.mode) == "iptables"
    assert config.cluster_cidrs, "clusterCIDR should be set (masquerading depends on it)"
    assert config.client_connection.kubeconfig == ""  # the pod's service account


def test_configmap_is_a_full_kube_proxy_configuration() -> None:
    """Every top-level section kubeadm writes is there, so operators edit rather than add."""
    doc = yaml.safe_load(config_text())
    for key in ("mode", "clusterCIDR", "bindAddress", "healthzBindAddress", "metricsBindAddress",
                "hostnameOverride", "configSyncPeriod", "iptables", "ipvs", "conntrack",
                "nodePortAddresses", "detectLocalMode", "detectLocal", "featureGates",
                "clientConnection"):
        assert key in doc, key
    # Left empty so $(NODE_NAME) on the command line names the node.
    assert doc["hostnameOverride"] == ""


def test_configmap_keys_are_the_config_and_optional_api_server_address() -> None:
    data = only("ConfigMap")["data"]
    assert set(data) <= {"config.conf", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}


# -- the DaemonSet -----------------------------------------------------------------------------


def test_daemonset_runs_on_every_linux_node_in_the_host_network() -> None:
    ds = only("DaemonSet")
    spec = ds["spec"]
    labels = {"k8s-app": NAME}
    assert ds["metadata"]["labels"] == labels
    assert spec["selector"] == {"matchLabels": labels}
    assert spec["template"]["metadata"]["labels"] == labels
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    pod = daemonset_pod()
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostNetwork"] is True
    # Not ClusterFirstWithHostNet: cluster DNS sits behind a ClusterIP pyproxy programs.
    assert pod["dnsPolicy"] == "Default"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_daemonset_command_is_kube_proxys_with_pyproxys_paths_and_parses() -> None:
    c = container()
    assert "args" not in c
    assert c["command"] == ["pyproxy", "run", f"--config={CONFIG_DIR}/config.conf",
                            "--hostname-override=$(NODE_NAME)"]
    # The flags exist and parse (nothing runs).
    run = cli_main.commands["run"]
    ctx = run.make_context("run", [a.replace("$(NODE_NAME)", "node-a") for a in c["command"][2:]])
    assert ctx.params["config_file"] == f"{CONFIG_DIR}/config.conf"
    assert ctx.params["hostname_override"] == "node-a"


def test_daemonset_node_name_comes_from_the_downward_api() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_daemonset_api_server_address_is_optional_from_the_configmap() -> None:
    env = {e["name"]: e for e in container()["env"]}
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        assert env[name]["valueFrom"] == {"configMapKeyRef": {
            "name": only("ConfigMap")["metadata"]["name"], "key": name, "optional": True}}


def _mounts() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    volumes = {v["name"]: v for v in daemonset_pod()["volumes"]}
    mounts = container()["volumeMounts"]
    assert len(mounts) == len(volumes)
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in mounts}


def test_daemonset_mounts_the_configmap_where_the_command_reads_it() -> None:
    mount, volume = _mounts()[CONFIG_DIR]
    assert volume["configMap"]["name"] == only("ConfigMap")["metadata"]["name"]
    assert "items" not in volume["configMap"]  # config.conf keeps its key as file name
    assert "subPath" not in mount  # a subPath mount would never see ConfigMap edits
    assert mount["readOnly"] is True


def test_daemonset_shares_the_hosts_xtables_lock_and_reads_its_modules() -> None:
    mounts = _mounts()
    mount, volume = mounts["/run/xtables.lock"]
    assert volume["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert not mount.get("readOnly", False)
    mount, volume = mounts["/lib/modules"]
    assert volume["hostPath"]["path"] == "/lib/modules"
    assert mount["readOnly"] is True


def test_daemonset_probes_the_healthz_port_of_the_config() -> None:
    config, _ = load_config(config_text())
    port = config.healthz_bind_address.port
    c = container()
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert port == 10256


def test_daemonset_requests_resources() -> None:
    requests = container()["resources"]["requests"]
    assert set(requests) == {"cpu", "memory"}


def test_daemonset_privilege_is_explained() -> None:
    sc = container()["securityContext"]
    if sc.get("privileged"):
        # The reason is written next to it.
        text = (MANIFESTS / "daemonset.yaml").read_text()
        before = text[:text.index("privileged: true")]
        comment = before[before.rindex("securityContext:"):]
        for reason in ("/proc/sys", "route_localnet", "NET_ADMIN"):
            assert reason in comment, reason
    else:
        assert set(sc["capabilities"]["add"]) <= {"NET_ADMIN", "NET_RAW", "SYS_MODULE"}


# -- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines inside a continuation are dropped too, as Docker does
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return out


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negate
    return excluded


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_parses_into_the_expected_instructions() -> None:
    steps = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    words = [w for w, _ in steps]
    assert set(words) <= {"FROM", "LABEL", "RUN", "ENV", "WORKDIR", "COPY", "ENTRYPOINT", "CMD",
                          "ARG", "USER"}
    assert steps[0] == ("FROM", "python:3.11-slim-bookworm")
    assert words.count("FROM") == 1
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["pyproxy"]
    assert "pyproxy = pyproxy.cli:main" in (ROOT / "setup.cfg").read_text()


def test_dockerfile_installs_the_kernel_tools_pyproxy_drives() -> None:
    steps = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    (install,) = [args for w, args in steps if w == "RUN" and "apt-get install" in args]
    words = shlex.split(install)
    assert "--no-install-recommends" in words
    assert "rm -rf /var/lib/apt/lists/*" in install
    # The runtime tools only (scripts/bootstrap.sh adds test-only ones such as ipvsadm).
    for pkg in ("iptables", "ipset", "conntrack", "iproute2", "kmod"):
        assert pkg in words, pkg


def test_dockerfile_copies_files_that_exist_and_the_context_keeps() -> None:
    steps = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    copies = [shlex.split(args) for w, args in steps if w == "COPY"]
    assert copies
    sources = [src.rstrip("/") for words in copies for src in words[:-1]
               if not src.startswith("--")]
    assert set(sources) >= {"setup.cfg", "setup.py", "pyproject.toml", "README.md", "pyproxy"}
    ignore = _dockerignore()
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(ignore, rel), f"{rel} is excluded by .dockerignore"
    # setup.cfg reads the README as long_description: it must be in the image's build.
    assert "long_description = file: README.md" in (ROOT / "setup.cfg").read_text()
    # What the image must not carry.
    for rel in (".venv/bin/python", "tests/__init__.py", ".git/HEAD",
                "pyproxy/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(ignore, rel), rel
