"""The objects of the kernel tests' mini-cluster, as API dicts, and how to write them out.

One set of Services covers every scenario, so one sync programs them all and
each test only sends traffic. The IPVS tests reuse the same objects.

Pods (see scripts/netlab.py): pod1 198.18.1.1, pod2 198.18.1.2 and pod3
198.18.1.3. pod1 and pod2 are on this node (node-a); pod3 is said to be on
node-b, which is how the eTP=Local scenarios tell local from remote endpoints.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

NODE = "node-a"
NS = "t"
POD_NODES = {"pod1": NODE, "pod2": NODE, "pod3": "node-b"}
POD_IPS = {"pod1": "198.18.1.1", "pod2": "198.18.1.2", "pod3": "198.18.1.3"}

CLUSTER_IPS = {
    "web": "198.18.200.10",
    "empty": "198.18.200.11",
    "sticky": "198.18.200.12",
    "notready": "198.18.200.13",
    "terminating": "198.18.200.14",
    "multi": "198.18.200.15",
    "local": "198.18.200.16",
    "localnone": "198.18.200.17",
    "ext": "198.18.200.18",
    "lb": "198.18.200.19",
    "lbranged": "198.18.200.20",
    "lballowed": "198.18.200.21",
    "dns": "198.18.200.53",
}
NODE_PORTS = {"web": 30080, "local": 30081, "localnone": 30082, "lb": 30083}
EXTERNAL_IP = "198.18.201.10"
LB_IPS = {"lb": "198.18.202.10", "lbranged": "198.18.202.11", "lballowed": "198.18.202.12"}


def node() -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.100.1"}]},
    }


def service(name: str, *, ports: list[dict[str, Any]] | None = None, type: str = "ClusterIP",
            **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": type,
        "clusterIP": CLUSTER_IPS[name],
        "clusterIPs": [CLUSTER_IPS[name]],
        "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        **spec,
    }
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }
    status = spec.pop("status", None)
    if status:
        obj["status"] = status
        body.pop("status", None)
    return obj


def endpoint(pod: str, *, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None) -> dict[str, Any]:
    conditions: dict[str, bool] = {}
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[key] = value
    return {"addresses": [POD_IPS[pod]], "conditions": conditions, "nodeName": POD_NODES[pod],
            "targetRef": {"kind": "Pod", "namespace": NS, "name": pod}}


def endpoint_slice(service_name: str, endpoints: list[dict[str, Any]] | None, *,
                   suffix: str = "a", ports: list[dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service_name}-{suffix}", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": service_name,
                                "endpointslice.kubernetes.io/managed-by":
                                    "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080,
                                                   "protocol": "TCP"}],
    }


def all_pods() -> list[dict[str, Any]]:
    return [endpoint(p) for p in ("pod1", "pod2", "pod3")]


def objects() -> list[dict[str, Any]]:
    """Every Service and EndpointSlice of the scenarios."""
    lb_status = lambda name: {"loadBalancer": {"ingress": [{"ip": LB_IPS[name],  # noqa: E731
                                                            "ipMode": "VIP"}]}}
    http_np = lambda name: [{"name": "http", "port": 80, "targetPort": 8080,  # noqa: E731
                             "protocol": "TCP", "nodePort": NODE_PORTS[name]}]
    objs = [
        service("web", type="NodePort", ports=http_np("web"),
                externalTrafficPolicy="Cluster"),
        endpoint_slice("web", all_pods()),
        service("empty"),
        endpoint_slice("empty", None),
        service("sticky", sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
        endpoint_slice("sticky", all_pods()),
        service("notready"),
        endpoint_slice("notready", [endpoint("pod1"), endpoint("pod2", ready=False,
                                                              serving=False)]),
        service("terminating"),
        endpoint_slice("terminating", [
            endpoint("pod1", ready=False, serving=True, terminating=True),
            endpoint("pod2", ready=False, serving=False, terminating=True)]),
        service("multi", ports=[
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "alt", "port": 81, "targetPort": 8081, "protocol": "TCP"}]),
        endpoint_slice("multi", [endpoint("pod1")], suffix="a"),
        endpoint_slice("multi", [endpoint("pod2")], suffix="b",
                       ports=[{"name": "alt", "port": 8081, "protocol": "TCP"}]),
        service("local", type="NodePort", ports=http_np("local"),
                externalTrafficPolicy="Local"),
        endpoint_slice("local", [endpoint("pod1"), endpoint("pod3")]),
        service("localnone", type="NodePort", ports=http_np("localnone"),
                externalTrafficPolicy="Local"),
        endpoint_slice("localnone", [endpoint("pod3")]),
        service("ext", externalIPs=[EXTERNAL_IP]),
        endpoint_slice("ext", all_pods()),
        service("lb", type="LoadBalancer", ports=http_np("lb"), status=lb_status("lb")),
        endpoint_slice("lb", all_pods()),
        service("lbranged", type="LoadBalancer", allocateLoadBalancerNodePorts=False,
                loadBalancerSourceRanges=["198.18.150.0/24"], status=lb_status("lbranged")),
        endpoint_slice("lbranged", all_pods()),
        service("lballowed", type="LoadBalancer", allocateLoadBalancerNodePorts=False,
                loadBalancerSourceRanges=[" 198.18.100.0/24 "], status=lb_status("lballowed")),
        endpoint_slice("lballowed", all_pods()),
        service("dns", ports=[{"name": "dns", "port": 53, "targetPort": 5353,
                               "protocol": "UDP"}]),
        endpoint_slice("dns", all_pods(), ports=[{"name": "dns", "port": 5353,
                                                   "protocol": "UDP"}]),
    ]
    return objs


def malformed() -> list[dict[str, Any]]:
    """Objects an API server validating properly would never serve: each must be skipped."""
    bad_ip = service("web")
    bad_ip["metadata"]["name"] = "bad-ip"
    bad_ip["spec"]["clusterIP"] = bad_ip["spec"]["clusterIPs"][0] = "198.18.300.1"
    bad_port = service("web")
    bad_port["metadata"]["name"] = "bad-port"
    bad_port["spec"]["clusterIP"] = bad_port["spec"]["clusterIPs"][0] = "198.18.200.99"
    bad_port["spec"]["ports"][0]["port"] = 70000
    bad_slice = endpoint_slice("web", [{"addresses": ["not-an-ip"]}], suffix="broken")
    return [bad_ip, bad_port, bad_slice]


def write(directory: Path, objs: list[dict[str, Any]]) -> None:
    """One multi-document file for the objects, one for the node: as an operator would."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yaml"):
        old.unlink()
    (directory / "node.yaml").write_text(yaml.safe_dump(node()))
    (directory / "cluster.yaml").write_text(
        yaml.safe_dump_all([copy.deepcopy(o) for o in objs], sort_keys=False))
