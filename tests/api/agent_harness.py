"""Helpers for the agent's end-to-end tests: `pyproxy run` in a lab's node namespace.

Each test gets an ``Env``: the shared mini-cluster (scripts/netlab.py), a fresh
FakeKubeAPI listening on the node namespace's loopback (so only the pyproxy
running there can reach it), and any number of pyproxy processes started with
``Env.agent()``. ``Env.close()`` stops them, stops the API server and removes
every rule pyproxy owns in the node namespace, so the next test starts clean.

Everything is polled with bounded deadlines (``wait_for``); nothing sleeps
longer than a poll interval.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from prometheus_client.parser import text_string_to_metric_families

from pyproxy.iptables.ruleset import (
    is_owned_chain,
    is_owned_rule,
    parse_save,
    render_cleanup,
)
from tests.api.server import FakeKubeAPI, in_netns
from tests.kernel.lab import PYPROXY, wait_for

NODE = "node-a"
NS = "t"
CLUSTER_CIDR = "198.18.1.0/24"
NODE_IP = "198.18.100.1"
GATEWAY = "198.18.0.1"  # the node's address on the pod links: what masquerade leaves
POD_IPS = {"pod1": "198.18.1.1", "pod2": "198.18.1.2", "pod3": "198.18.1.3"}
POD_NODES = {"pod1": NODE, "pod2": NODE, "pod3": "node-b"}
HEALTHZ_PORT = 10256
METRICS_PORT = 10249
SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"

Owned = dict[str, dict[str, tuple[str, ...]]]  # table -> owned chain -> rules


# -- API objects ------------------------------------------------------------------------------


def node_object(**labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE,
                     "labels": {"topology.kubernetes.io/zone": "zone-a", **labels}},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    }


def http_port(port: int = 80, target: int = 8080, *, name: str = "http",
              node_port: int | None = None, protocol: str = "TCP") -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port, "targetPort": target,
                           "protocol": protocol}
    if node_port is not None:
        out["nodePort"] = node_port
    return out


def service(name: str, cluster_ip: str, *, ns: str = NS, type: str = "ClusterIP",
            ports: list[dict[str, Any]] | None = None, labels: dict[str, str] | None = None,
            status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": type, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": ports if ports is not None else [http_port()], **spec},
    }
    if labels:
        obj["metadata"]["labels"] = dict(labels)
    if status is not None:
        obj["status"] = status
    return obj


def endpoint(pod: str, *, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None) -> dict[str, Any]:
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving),
                                     ("terminating", terminating)) if v is not None}
    return {"addresses": [POD_IPS[pod]], "conditions": conditions, "nodeName": POD_NODES[pod],
            "targetRef": {"kind": "Pod", "namespace": NS, "name": pod}}


def endpoint_slice(service_name: str, endpoints: list[dict[str, Any]] | None, *,
                   ns: str = NS, suffix: str = "a", ports: list[dict[str, Any]] | None = None,
                   labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service_name}-{suffix}", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name,
                                "endpointslice.kubernetes.io/managed-by":
                                    "endpointslice-controller.k8s.io", **(labels or {})}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080,
                                                   "protocol": "TCP"}],
    }


def config_map(text: str, ns: str = "kube-system", name: str = "kube-proxy") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "kube-proxy"}},
            "data": {"config.conf": text}}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


BASE_CONFIG: dict[str, Any] = {
    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
    "kind": "KubeProxyConfiguration",
    "mode": "",
    "healthzBindAddress": f"0.0.0.0:{HEALTHZ_PORT}",
    "metricsBindAddress": f"127.0.0.1:{METRICS_PORT}",
    # minSyncPeriod 0s would mean the 1 s default (kube-proxy's defaulting): 100ms is small.
    "iptables": {"masqueradeAll": False, "minSyncPeriod": "100ms", "syncPeriod": "30s"},
}


def config_text(**over: Any) -> str:
    """A KubeProxyConfiguration document: BASE_CONFIG deep-merged with ``over``."""
    return yaml.safe_dump(_merge(BASE_CONFIG, over), sort_keys=False)


def matches_proxy_selector(obj: dict[str, Any], proxy_name: str | None = None) -> bool:
    """What the agent's label selector lets through (see pyproxy.sources.kube)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if HEADLESS_LABEL in labels:
        return False
    if proxy_name is None:
        return PROXY_NAME_LABEL not in labels
    return labels.get(PROXY_NAME_LABEL) == proxy_name


# -- polling ---------------------------------------------------------------------------------


# -- iptables ----------------------------------------------------------------------------------


def owned_of(save_text: str) -> Owned:
    """{table: {chain: rules}} for pyproxy's chains in an iptables-save or restore text."""
    rs = parse_save(save_text)
    return {str(table): {name: rules for name, rules in chains.items() if is_owned_chain(name)}
            for table, chains in rs.chains.items()}


def jumps_of_save(save_text: str) -> set[tuple[str, str, str]]:
    """(table, built-in chain, rule) for every rule outside pyproxy's chains that enters one."""
    rs = parse_save(save_text)
    return {(str(table), chain, rule) for table, chains in rs.chains.items()
            for chain, rules in chains.items() if not is_owned_chain(chain)
            for rule in rules if is_owned_rule(rule)}


def jumps_of_plan(plan_text: str) -> set[tuple[str, str, str]]:
    """The ``-I CHAIN 1 RULE`` lines of a `pyproxy plan` payload."""
    out: set[tuple[str, str, str]] = set()
    table = ""
    for line in plan_text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-I "):
            _, chain, _pos, rule = line.split(" ", 3)
            out.add((table, chain, rule))
    return out


# -- HTTP inside a namespace ---------------------------------------------------------------------


def http_get(netns: str, host: str, port: int, path: str = "/",
             timeout: float = 2.0) -> tuple[int, str]:
    """GET from inside ``netns``: the socket is made there, the rest runs here."""
    sock = in_netns(netns, lambda: socket.create_connection((host, port), timeout=timeout))
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


# -- the environment ---------------------------------------------------------------------------


class Agent:
    """One `pyproxy run` process in the node namespace; stderr goes to a file."""

    def __init__(self, proc: subprocess.Popen[Any], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.log), timeout,
                        lambda: f"log line /{pattern}/; log:\n{self.log[-3000:]}")

    def log_lines(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.log.splitlines() if regex.search(line)]

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class Env:
    """The lab's node namespace, a FakeKubeAPI inside it, and the agents a test starts."""

    def __init__(self, lab: Any, tmp: Path, **api_kwargs: Any) -> None:
        self.lab = lab
        self.tmp = tmp
        self.node_ns: str = lab.ns_name("node")
        self.api = FakeKubeAPI(netns=self.node_ns, **api_kwargs).start()
        self.kubeconfig = self.api.write_kubeconfig(tmp / "kubeconfig")
        self.agents: list[Agent] = []

    # -- agents

    def agent(self, *extra: str, config: str | None = None, configmap: str | None = None,
              wait_ready: bool = True, name: str = "agent") -> Agent:
        """Start `pyproxy run` against the API; by default wait for its first sync."""
        argv = [PYPROXY, "run", "--kubeconfig", str(self.kubeconfig),
                "--hostname-override", NODE, "--cluster-cidr", CLUSTER_CIDR,
                "--iptables-backend", "nft"]
        if configmap is not None:
            argv += ["--config-configmap", configmap]
        else:
            conf = self.tmp / f"{name}.conf"
            conf.write_text(config if config is not None else config_text())
            argv += ["--config", str(conf)]
        argv += extra
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = self.lab.spawn("node", *argv, stdout=log, stderr=log,
                                  stdin=subprocess.DEVNULL)
        agent = Agent(proc, log_path)
        self.agents.append(agent)
        if wait_ready:
            self.wait_programmed(agent)
        return agent

    def wait_programmed(self, agent: Agent, timeout: float = 10.0) -> None:
        def ready() -> bool:
            if not agent.running:
                raise AssertionError(f"pyproxy exited ({agent.proc.returncode}):\n{agent.log}")
            return "PYPROXY-SERVICES" in self.owned().get("nat", {})
        wait_for(ready, timeout, "the agent's first sync")

    def close(self) -> None:
        """Stop the agents and the API server; remove every rule pyproxy owns in the node.

        What `pyproxy cleanup` does, computed here (render_cleanup) and written with
        iptables-nft-restore in the node namespace: it saves a Python start per test.
        """
        try:
            for agent in self.agents:
                agent.stop()
        finally:
            self.api.stop()
            payload = render_cleanup(parse_save(self.save()))
            if payload:
                self.lab.run("node", "iptables-nft-restore", "--noflush", input=payload.text)

    # -- kernel

    def ipt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = self.lab.run(
            "node", "iptables-nft", "-w", *args, check=check)
        return result

    def save(self) -> str:
        out = self.lab.run("node", "iptables-nft-save").stdout
        return "\n".join(line for line in out.splitlines() if not line.startswith("#"))

    def owned(self, save_text: str | None = None) -> Owned:
        return owned_of(self.save() if save_text is None else save_text)

    def nat_rules(self) -> list[str]:
        return [rule for rules in self.owned().get("nat", {}).values() for rule in rules]

    def probe(self, ns: str, ip: str, port: int, count: int = 1, timeout: float = 0.5,
              proto: str = "tcp") -> list[str]:
        replies: list[str] = self.lab.probe(ns, proto, ip, port, count=count, timeout=timeout)
        return replies

    # -- HTTP endpoints of the agent

    def healthz(self, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
        status, body = http_get(self.node_ns, "127.0.0.1", HEALTHZ_PORT, path)
        return status, json.loads(body)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = http_get(self.node_ns, "127.0.0.1", METRICS_PORT, "/metrics")
        assert status == 200, body
        out = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    # -- the request log

    def gets(self, path_part: str) -> list[tuple[str, dict[str, str]]]:
        """GET requests whose path contains ``path_part``, as (path, decoded query)."""
        out = []
        for method, raw in self.api.requests:
            split = urlsplit(raw)
            if method == "GET" and path_part in split.path:
                query = {k: v[0] for k, v in parse_qs(split.query,
                                                      keep_blank_values=True).items()}
                out.append((split.path, query))
        return out

    # -- `pyproxy plan` from the server's objects

    def dump_manifests(self, directory: Path, proxy_name: str | None = None) -> None:
        """The objects the agent is meant to see (its selector applied), plus the node."""
        directory.mkdir(parents=True, exist_ok=True)
        objs = [o for kind in ("Service", "EndpointSlice") for o in self.api.list(kind)
                if matches_proxy_selector(o, proxy_name)]
        objs += self.api.list("Node")
        (directory / "cluster.yaml").write_text(yaml.safe_dump_all(objs, sort_keys=False))

    def plan(self, directory: Path) -> str:
        result = subprocess.run(
            [PYPROXY, "plan", "--manifests", str(directory), "--hostname-override", NODE,
             "--cluster-cidr", CLUSTER_CIDR], capture_output=True, text=True, timeout=60,
            check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))
