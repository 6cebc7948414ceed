"""Unit tests for pyproxy.model: parsing and validation of API dicts, and slice merging."""

from __future__ import annotations

import copy
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from pyproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    Endpoint,
    EndpointSlice,
    InvalidObject,
    IPFamily,
    Protocol,
    ServicePortName,
    ServiceType,
    merge_endpoints,
    parse_endpoint_slice,
    parse_node,
    parse_service,
    service_is_proxied,
)

# --------------------------------------------------------------------------
# builders


def service(
    *,
    name: str = "web",
    namespace: str = "default",
    status: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"clusterIP": "10.0.0.10", "ports": [{"port": 80}]}
    body.update(spec)
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations is not None:
        meta["annotations"] = annotations
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
                           "spec": body}
    if status is not None:
        obj["status"] = status
    return obj


def lb_status(*ingress: dict[str, Any]) -> dict[str, Any]:
    return {"loadBalancer": {"ingress": list(ingress)}}


def endpoint(ip: str, **extra: Any) -> dict[str, Any]:
    return {"addresses": [ip], **extra}


def eps_slice(
    *endpoints: dict[str, Any],
    name: str = "web-abc",
    namespace: str = "default",
    service_name: str | None = "web",
    address_type: str = "IPv4",
    ports: Any = None,
) -> dict[str, Any]:
    labels = {} if service_name is None else {"kubernetes.io/service-name": service_name}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "addressType": address_type,
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": list(endpoints),
    }


def parse_ok(obj: dict[str, Any]):  # type: ignore[no-untyped-def]
    svc = parse_service(obj)
    assert svc is not None
    return svc


def invalid(fn: Any, obj: Any) -> InvalidObject:
    with pytest.raises(InvalidObject) as info:
        fn(obj)
    return info.value


# --------------------------------------------------------------------------
# Services: types and defaults


def test_cluster_ip_defaults() -> None:
    svc = parse_ok(service())
    assert svc.key == ("default", "web")
    (sp,) = svc.ports
    assert sp.name == ServicePortName("default", "web", "", Protocol.TCP)
    assert sp.protocol is Protocol.TCP
    assert sp.type is ServiceType.CLUSTER_IP
    assert sp.family is IPFamily.IPv4
    assert sp.cluster_ip == ip_address("10.0.0.10")
    assert sp.port == 80
    assert sp.node_port == 0
    assert sp.affinity_timeout == 0
    assert sp.external_ips == () and sp.load_balancer_ips == ()
    assert sp.load_balancer_source_ranges == ()
    assert not sp.external_policy_local and not sp.internal_policy_local
    assert not sp.topology_aware and not sp.prefer_same_node
    assert sp.health_check_node_port == 0
    assert not sp.externally_accessible


def test_node_port_service() -> None:
    svc = parse_ok(service(type="NodePort", ports=[
        {"name": "http", "port": 80, "nodePort": 30080},
        {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
        {"name": "s", "port": 9, "protocol": "SCTP", "nodePort": 30009},
    ]))
    by_name = {p.name.port: p for p in svc.ports}
    assert by_name["http"].type is ServiceType.NODE_PORT
    assert by_name["http"].node_port == 30080
    assert by_name["dns"].protocol is Protocol.UDP
    assert by_name["dns"].node_port == 30053
    assert by_name["s"].protocol is Protocol.SCTP
    assert all(p.externally_accessible for p in svc.ports)


def test_node_port_ignored_on_cluster_ip_service() -> None:
    (sp,) = parse_ok(service(ports=[{"port": 80, "nodePort": 30080}])).ports
    assert sp.node_port == 0


def test_load_balancer_service() -> None:
    svc = parse_ok(service(
        type="LoadBalancer",
        ports=[{"port": 443, "nodePort": 31443}],
        externalTrafficPolicy="Local",
        healthCheckNodePort=32000,
        status=lb_status({"ip": "203.0.113.7"}, {"ip": "203.0.113.8", "ipMode": "VIP"}),
    ))
    (sp,) = svc.ports
    assert sp.type is ServiceType.LOAD_BALANCER
    assert sp.node_port == 31443
    assert sp.load_balancer_ips == (ip_address("203.0.113.7"), ip_address("203.0.113.8"))
    assert sp.external_policy_local
    assert sp.health_check_node_port == 32000
    assert sp.uses_local_endpoints and sp.uses_cluster_endpoints


def test_lb_ingress_proxy_mode_and_hostname_only_skipped() -> None:
    (sp,) = parse_ok(service(
        type="LoadBalancer",
        status=lb_status(
            {"ip": "203.0.113.1", "ipMode": "Proxy"},
            {"hostname": "lb.example.com"},
            {"ip": "", "hostname": "lb2.example.com"},
            {"ip": "203.0.113.2"},
        ),
    )).ports
    assert sp.load_balancer_ips == (ip_address("203.0.113.2"),)


def test_lb_ingress_only_read_for_load_balancer_type() -> None:
    (sp,) = parse_ok(service(status=lb_status({"ip": "203.0.113.1"}))).ports
    assert sp.load_balancer_ips == ()


def test_lb_ingress_unknown_ip_mode_is_invalid() -> None:
    err = invalid(parse_service, service(
        type="LoadBalancer", status=lb_status({"ip": "203.0.113.1", "ipMode": "Magic"})))
    assert err.field_path == "status.loadBalancer.ingress[0].ipMode"


@pytest.mark.parametrize("obj", [
    service(type="ExternalName", externalName="example.com", clusterIP=None),
    service(type="ExternalName", externalName="example.com"),
    service(clusterIP="None"),
    service(clusterIP=""),
    service(clusterIP=None),
    service(clusterIP="None", clusterIPs=["None"]),
])
def test_external_name_and_headless_are_not_proxied(obj: dict[str, Any]) -> None:
    assert parse_service(obj) is None
    assert service_is_proxied(obj) is False


def test_service_is_proxied_for_ordinary_service() -> None:
    assert service_is_proxied(service())
    assert service_is_proxied(service(clusterIP=None, clusterIPs=["10.0.0.11"]))
    assert service_is_proxied({"metadata": {"name": "x"}})  # parse_service reports it


def test_external_name_does_not_need_ports() -> None:
    assert parse_service(service(type="ExternalName", ports=None, clusterIP=None)) is None


def test_unknown_type_is_invalid() -> None:
    err = invalid(parse_service, service(type="Weird"))
    assert err.field_path == "spec.type"


# --------------------------------------------------------------------------
# Services: session affinity


def test_client_ip_affinity_default_timeout() -> None:
    (sp,) = parse_ok(service(sessionAffinity="ClientIP")).ports
    assert sp.affinity_timeout == DEFAULT_AFFINITY_TIMEOUT == 10800


def test_client_ip_affinity_null_timeout_means_default() -> None:
    (sp,) = parse_ok(service(sessionAffinity="ClientIP", sessionAffinityConfig={
        "clientIP": {"timeoutSeconds": None}})).ports
    assert sp.affinity_timeout == 10800


@pytest.mark.parametrize("timeout", [1, 60, 86400])
def test_client_ip_affinity_timeout_in_bounds(timeout: int) -> None:
    (sp,) = parse_ok(service(sessionAffinity="ClientIP", sessionAffinityConfig={
        "clientIP": {"timeoutSeconds": timeout}})).ports
    assert sp.affinity_timeout == timeout


@pytest.mark.parametrize("timeout", [0, -1, 86401, "60", True, 1.5])
def test_client_ip_affinity_timeout_out_of_bounds(timeout: Any) -> None:
    err = invalid(parse_service, service(sessionAffinity="ClientIP", sessionAffinityConfig={
        "clientIP": {"timeoutSeconds": timeout}}))
    assert err.kind == "Service"
    assert err.key == "default/web"
    assert err.field_path == "spec.sessionAffinityConfig.clientIP.timeoutSeconds"


def test_affinity_config_ignored_without_client_ip() -> None:
    (sp,) = parse_ok(service(sessionAffinity="None", sessionAffinityConfig={
        "clientIP": {"timeoutSeconds": 0}})).ports
    assert sp.affinity_timeout == 0


@pytest.mark.parametrize("value", ["Cookie", "clientip", 3])
def test_bad_session_affinity(value: Any) -> None:
    err = invalid(parse_service, service(sessionAffinity=value))
    assert (err.kind, err.key, err.field_path) == ("Service", "default/web",
                                                   "spec.sessionAffinity")


# --------------------------------------------------------------------------
# Services: externalIPs, source ranges, dual stack


def test_external_ips_filtered_by_family() -> None:
    svc = parse_ok(service(
        clusterIPs=["10.0.0.10", "fd00::10"],
        externalIPs=["192.0.2.1", "2001:db8::1", "192.0.2.2"],
    ))
    v4, = svc.ports_for(IPFamily.IPv4)
    v6, = svc.ports_for(IPFamily.IPv6)
    assert v4.external_ips == (ip_address("192.0.2.1"), ip_address("192.0.2.2"))
    assert v6.external_ips == (ip_address("2001:db8::1"),)
    assert v4.externally_accessible and v6.externally_accessible


def test_external_ip_of_other_family_only_is_not_accessible() -> None:
    (sp,) = parse_ok(service(externalIPs=["2001:db8::1"])).ports
    assert sp.external_ips == ()
    assert not sp.externally_accessible


def test_lb_ingress_filtered_by_family() -> None:
    svc = parse_ok(service(
        type="LoadBalancer",
        clusterIPs=["10.0.0.10", "fd00::10"],
        status=lb_status({"ip": "2001:db8::7"}, {"ip": "203.0.113.7"}),
    ))
    assert svc.ports_for(IPFamily.IPv4)[0].load_balancer_ips == (ip_address("203.0.113.7"),)
    assert svc.ports_for(IPFamily.IPv6)[0].load_balancer_ips == (ip_address("2001:db8::7"),)


def test_source_ranges_trimmed_and_filtered_by_family() -> None:
    svc = parse_ok(service(
        type="LoadBalancer",
        clusterIPs=["10.0.0.10", "fd00::10"],
        loadBalancerSourceRanges=[" 192.0.2.0/24", "2001:db8::/32 ", "\t0.0.0.0/0\n",
                                  "198.51.100.7/24"],
    ))
    v4 = svc.ports_for(IPFamily.IPv4)[0]
    v6 = svc.ports_for(IPFamily.IPv6)[0]
    assert v4.load_balancer_source_ranges == (
        ip_network("192.0.2.0/24"), ip_network("0.0.0.0/0"), ip_network("198.51.100.0/24"))
    assert v6.load_balancer_source_ranges == (ip_network("2001:db8::/32"),)


def test_bad_source_range_is_invalid() -> None:
    err = invalid(parse_service, service(loadBalancerSourceRanges=["10.0.0.0/8", "nope"]))
    assert err.field_path == "spec.loadBalancerSourceRanges[1]"


def test_dual_stack_one_service_port_per_family() -> None:
    svc = parse_ok(service(
        clusterIP="fd00::10",
        clusterIPs=["fd00::10", "10.0.0.10"],
        ipFamilies=["IPv6", "IPv4"],
        ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81, "protocol": "UDP"}],
    ))
    assert len(svc.ports) == 4
    v4 = svc.ports_for(IPFamily.IPv4)
    v6 = svc.ports_for(IPFamily.IPv6)
    assert [p.name.port for p in v4] == ["a", "b"]
    assert {p.cluster_ip for p in v4} == {ip_address("10.0.0.10")}
    assert {p.cluster_ip for p in v6} == {ip_address("fd00::10")}
    # both families share the port's identity
    assert [p.name for p in v4] == [p.name for p in v6]


def test_single_stack_ipv6() -> None:
    svc = parse_ok(service(clusterIP="fd00::10"))
    assert svc.ports_for(IPFamily.IPv4) == ()
    (sp,) = svc.ports_for(IPFamily.IPv6)
    assert sp.family is IPFamily.IPv6


def test_cluster_ips_only() -> None:
    (sp,) = parse_ok(service(clusterIP=None, clusterIPs=["10.0.0.11"])).ports
    assert sp.cluster_ip == ip_address("10.0.0.11")


def test_cluster_ip_must_match_cluster_ips() -> None:
    err = invalid(parse_service, service(clusterIP="10.0.0.10", clusterIPs=["10.0.0.11"]))
    assert err.field_path == "spec.clusterIP"


def test_two_cluster_ips_of_one_family_are_invalid() -> None:
    err = invalid(parse_service, service(clusterIPs=["10.0.0.10", "10.0.0.11"]))
    assert err.field_path == "spec.clusterIPs"


# --------------------------------------------------------------------------
# Services: traffic policies and distribution


@pytest.mark.parametrize("svc_type,extra,expected", [
    ("ClusterIP", {}, False),
    ("NodePort", {}, True),
    ("LoadBalancer", {}, True),
    # upstream ExternalPolicyLocal: a ClusterIP service with externalIPs is externally
    # accessible, so eTP=Local applies to it too
    ("ClusterIP", {"externalIPs": ["192.0.2.1"]}, True),
])
def test_external_traffic_policy_local(svc_type: str, extra: dict[str, Any],
                                       expected: bool) -> None:
    (sp,) = parse_ok(service(type=svc_type, externalTrafficPolicy="Local", **extra)).ports
    assert sp.external_policy_local is expected


def test_external_traffic_policy_cluster() -> None:
    (sp,) = parse_ok(service(type="NodePort", externalTrafficPolicy="Cluster")).ports
    assert not sp.external_policy_local
    assert sp.uses_cluster_endpoints and not sp.uses_local_endpoints


def test_internal_traffic_policy_local() -> None:
    (sp,) = parse_ok(service(internalTrafficPolicy="Local")).ports
    assert sp.internal_policy_local
    assert sp.uses_local_endpoints
    assert not sp.uses_cluster_endpoints
    (np,) = parse_ok(service(type="NodePort", internalTrafficPolicy="Local",
                             ports=[{"port": 80, "nodePort": 30080}])).ports
    assert np.uses_local_endpoints and np.uses_cluster_endpoints


@pytest.mark.parametrize("field_name", ["externalTrafficPolicy", "internalTrafficPolicy"])
@pytest.mark.parametrize("value", ["local", "Everywhere", 1])
def test_bad_traffic_policy(field_name: str, value: Any) -> None:
    err = invalid(parse_service, service(type="NodePort", **{field_name: value}))
    assert (err.kind, err.key, err.field_path) == ("Service", "default/web",
                                                   f"spec.{field_name}")


@pytest.mark.parametrize("annotations,distribution,aware,same_node", [
    (None, None, False, False),
    ({"service.kubernetes.io/topology-mode": "Auto"}, None, True, False),
    ({"service.kubernetes.io/topology-mode": "auto"}, None, True, False),
    ({"service.kubernetes.io/topology-mode": "Disabled"}, None, False, False),
    (None, "PreferClose", True, False),
    (None, "PreferSameZone", True, False),
    (None, "PreferSameNode", False, True),
    (None, "SomethingNew", False, False),
])
def test_topology(annotations: dict[str, str] | None, distribution: str | None, aware: bool,
                  same_node: bool) -> None:
    extra = {} if distribution is None else {"trafficDistribution": distribution}
    (sp,) = parse_ok(service(annotations=annotations, **extra)).ports
    assert sp.topology_aware is aware
    assert sp.prefer_same_node is same_node


# --------------------------------------------------------------------------
# Services: port names


def test_service_port_name_str() -> None:
    assert str(ServicePortName("ns", "svc", "http", Protocol.TCP)) == "ns/svc:http"
    assert str(ServicePortName("ns", "svc", "", Protocol.UDP)) == "ns/svc"
    assert ServicePortName("ns", "svc", "", Protocol.UDP).service == "ns/svc"


def test_service_port_names_from_parse() -> None:
    svc = parse_ok(service(namespace="kube-system", name="dns", ports=[
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    ]))
    assert [str(p.name) for p in svc.ports] == ["kube-system/dns:dns", "kube-system/dns:dns-tcp"]
    assert [p.protocol for p in svc.ports] == [Protocol.UDP, Protocol.TCP]


# --------------------------------------------------------------------------
# Services: validation


@pytest.mark.parametrize("obj,path", [
    (service(clusterIP="10.0.0.300"), "spec.clusterIP"),
    (service(clusterIP="10.0.0.300", clusterIPs=["10.0.0.300"]), "spec.clusterIPs[0]"),
    (service(clusterIPs=["10.0.0.10", "fd00::zz"]), "spec.clusterIPs[1]"),
    (service(clusterIP=42), "spec.clusterIP"),
    (service(externalIPs=["192.0.2.1", "192.0.2"]), "spec.externalIPs[1]"),
    (service(externalIPs="192.0.2.1"), "spec.externalIPs"),
    (service(type="LoadBalancer", status=lb_status({"ip": "203.0.113.999"})),
     "status.loadBalancer.ingress[0].ip"),
    (service(type="LoadBalancer", status=lb_status({"ip": "203.0.113.1"}, {"ip": "x"})),
     "status.loadBalancer.ingress[1].ip"),
])
def test_bad_addresses(obj: dict[str, Any], path: str) -> None:
    err = invalid(parse_service, obj)
    assert err.kind == "Service"
    assert err.key == "default/web"
    assert err.field_path == path
    assert "default/web" in str(err) and path in str(err)


@pytest.mark.parametrize("port", [0, 70000, -1, "80", None, True, 80.0])
def test_bad_port_number(port: Any) -> None:
    err = invalid(parse_service, service(ports=[{"port": port}]))
    assert (err.kind, err.key, err.field_path) == ("Service", "default/web", "spec.ports[0].port")


def test_missing_port_number() -> None:
    err = invalid(parse_service, service(ports=[{"name": "a", "port": 1},
                                                {"name": "b", "protocol": "TCP"}]))
    assert err.field_path == "spec.ports[1].port"


def test_port_limits() -> None:
    assert parse_ok(service(ports=[{"port": 1}])).ports[0].port == 1
    assert parse_ok(service(ports=[{"port": 65535}])).ports[0].port == 65535


def test_bad_node_port() -> None:
    err = invalid(parse_service, service(type="NodePort", ports=[{"port": 80,
                                                                  "nodePort": 70000}]))
    assert err.field_path == "spec.ports[0].nodePort"


@pytest.mark.parametrize("protocol", ["HTTP", "tcp", 6])
def test_unknown_protocol(protocol: Any) -> None:
    err = invalid(parse_service, service(ports=[{"port": 80, "protocol": protocol}]))
    assert err.field_path == "spec.ports[0].protocol"


def test_missing_name() -> None:
    obj = service()
    del obj["metadata"]["name"]
    err = invalid(parse_service, obj)
    assert (err.kind, err.field_path) == ("Service", "metadata.name")


def test_missing_namespace() -> None:
    obj = service()
    del obj["metadata"]["namespace"]
    err = invalid(parse_service, obj)
    assert (err.kind, err.key, err.field_path) == ("Service", "web", "metadata.namespace")


@pytest.mark.parametrize("obj,path", [
    ("not a mapping", ""),
    ({"spec": {}}, "metadata"),
    ({"metadata": "x"}, "metadata"),
])
def test_not_an_object(obj: Any, path: str) -> None:
    err = invalid(parse_service, obj)
    assert err.field_path == path


def test_missing_spec() -> None:
    obj = service()
    del obj["spec"]
    assert invalid(parse_service, obj).field_path == "spec"
    obj["spec"] = "ClusterIP"
    assert invalid(parse_service, obj).field_path == "spec"


@pytest.mark.parametrize("ports", [None, []])
def test_missing_ports(ports: Any) -> None:
    err = invalid(parse_service, service(ports=ports))
    assert (err.key, err.field_path) == ("default/web", "spec.ports")


def test_duplicate_port_names() -> None:
    err = invalid(parse_service, service(ports=[
        {"name": "http", "port": 80}, {"name": "https", "port": 443},
        {"name": "http", "port": 8080, "protocol": "UDP"},
    ]))
    assert err.field_path == "spec.ports[2].name"


def test_unnamed_port_among_several() -> None:
    err = invalid(parse_service, service(ports=[{"name": "http", "port": 80}, {"port": 443}]))
    assert err.field_path == "spec.ports[1].name"


def test_port_entry_not_a_mapping() -> None:
    err = invalid(parse_service, service(ports=[80]))
    assert err.field_path == "spec.ports[0]"


def test_parse_service_does_not_mutate_input() -> None:
    obj = service(type="LoadBalancer", status=lb_status({"ip": "203.0.113.1"}))
    before = copy.deepcopy(obj)
    parse_service(obj)
    assert obj == before


def test_invalid_object_is_a_value_error() -> None:
    err = InvalidObject("Service", "ns/x", "spec.ports", "missing")
    assert isinstance(err, ValueError)
    assert str(err) == "Service ns/x: spec.ports: missing"
    assert err.message == "missing"


# --------------------------------------------------------------------------
# EndpointSlices


def parse_slice_ok(obj: dict[str, Any]) -> EndpointSlice:
    sl = parse_endpoint_slice(obj)
    assert sl is not None
    return sl


def test_slice_basic() -> None:
    sl = parse_slice_ok(eps_slice(
        endpoint("10.1.0.1", nodeName="node-a", zone="z1"),
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
    ))
    assert sl.service_key == ("default", "web")
    assert (sl.namespace, sl.name, sl.service) == ("default", "web-abc", "web")
    assert sl.family is IPFamily.IPv4
    assert [(p.name, p.port, p.protocol) for p in sl.ports] == [("http", 8080, Protocol.TCP)]
    (ep,) = sl.endpoints
    assert ep.ip == ip_address("10.1.0.1")
    assert (ep.node_name, ep.zone) == ("node-a", "z1")
    assert ep.zone_hints is None and ep.node_hints is None


def test_slice_keeps_one_copy_of_names_that_repeat() -> None:
    # Names built at run time, as a JSON decoder's are: equal, but each its own object.
    a, b = (parse_slice_ok(eps_slice(
        endpoint(ip, nodeName="-".join(["node", "a"]), zone="".join(["z", "1"]),
                 hints={"forZones": [{"name": "".join(["z", "1"])}]}),
        namespace="".join(["de", "fault"]))) for ip in ("10.1.0.1", "10.1.0.2"))
    ea, eb = a.endpoints[0], b.endpoints[0]
    assert ea.node_name is eb.node_name and ea.zone is eb.zone
    assert ea.zone_hints is not None and eb.zone_hints is not None
    assert ea.zone_hints[0] is eb.zone_hints[0] is ea.zone
    assert a.namespace is b.namespace


def test_slice_without_service_label_is_ignored() -> None:
    assert parse_endpoint_slice(eps_slice(endpoint("10.1.0.1"), service_name=None)) is None
    assert parse_endpoint_slice(eps_slice(endpoint("10.1.0.1"), service_name="")) is None
    obj = eps_slice(endpoint("10.1.0.1"))
    del obj["metadata"]["labels"]
    assert parse_endpoint_slice(obj) is None


def test_fqdn_slice_is_ignored() -> None:
    assert parse_endpoint_slice(eps_slice(endpoint("example.com"),
                                          address_type="FQDN")) is None


@pytest.mark.parametrize("address_type", [None, "IPv5", "ipv4"])
def test_bad_address_type(address_type: Any) -> None:
    err = invalid(parse_endpoint_slice, eps_slice(address_type=address_type))
    assert (err.kind, err.key, err.field_path) == ("EndpointSlice", "default/web-abc",
                                                   "addressType")


def test_null_endpoints_and_ports() -> None:
    obj = eps_slice()
    obj["endpoints"] = None
    obj["ports"] = None
    sl = parse_slice_ok(obj)
    assert sl.endpoints == () and sl.ports == ()
    del obj["endpoints"], obj["ports"]
    sl = parse_slice_ok(obj)
    assert sl.endpoints == () and sl.ports == ()


def test_condition_defaults() -> None:
    sl = parse_slice_ok(eps_slice(
        endpoint("10.1.0.1"),
        endpoint("10.1.0.2", conditions={}),
        endpoint("10.1.0.3", conditions={"ready": None, "serving": None, "terminating": None}),
    ))
    for ep in sl.endpoints:
        assert (ep.ready, ep.serving, ep.terminating) == (True, True, False)


def test_serving_nil_is_true_even_when_not_ready() -> None:
    (ep,) = parse_slice_ok(eps_slice(endpoint("10.1.0.1", conditions={"ready": False}))).endpoints
    assert (ep.ready, ep.serving, ep.terminating) == (False, True, False)


def test_explicit_conditions() -> None:
    (ep,) = parse_slice_ok(eps_slice(endpoint("10.1.0.1", conditions={
        "ready": False, "serving": True, "terminating": True}))).endpoints
    assert (ep.ready, ep.serving, ep.terminating) == (False, True, True)


def test_bad_condition_value() -> None:
    err = invalid(parse_endpoint_slice, eps_slice(
        endpoint("10.1.0.1"), endpoint("10.1.0.2", conditions={"ready": "yes"})))
    assert err.field_path == "endpoints[1].conditions.ready"


def test_ports_without_name_or_number_are_ignored() -> None:
    sl = parse_slice_ok(eps_slice(endpoint("10.1.0.1"), ports=[
        {"port": 80},                         # no name: ignored
        {"name": "zero", "port": 0},          # 0: ignored
        {"name": "none"},                     # no number: ignored
        {"name": "nullport", "port": None},   # null: ignored
        {"name": "", "port": 81},             # unnamed is ""
        {"name": "udp", "port": 53, "protocol": "UDP"},
    ]))
    assert [(p.name, p.port, p.protocol) for p in sl.ports] == [
        ("", 81, Protocol.TCP), ("udp", 53, Protocol.UDP)]


@pytest.mark.parametrize("port,path", [
    ({"name": "a", "port": 70000}, "ports[0].port"),
    ({"name": "a", "port": "80"}, "ports[0].port"),
    ({"name": "a", "port": 80, "protocol": "ICMP"}, "ports[0].protocol"),
    ({"name": 5, "port": 80}, "ports[0].name"),
])
def test_bad_slice_port(port: dict[str, Any], path: str) -> None:
    err = invalid(parse_endpoint_slice, eps_slice(endpoint("10.1.0.1"), ports=[port]))
    assert err.field_path == path


def test_address_family_mismatch_is_invalid() -> None:
    err = invalid(parse_endpoint_slice, eps_slice(endpoint("10.1.0.1"),
                                                  endpoint("fd00::1")))
    assert (err.kind, err.key, err.field_path) == ("EndpointSlice", "default/web-abc",
                                                   "endpoints[1].addresses[0]")
    err = invalid(parse_endpoint_slice, eps_slice(endpoint("10.1.0.1"), address_type="IPv6"))
    assert err.field_path == "endpoints[0].addresses[0]"


def test_ipv6_slice() -> None:
    sl = parse_slice_ok(eps_slice(endpoint("fd00::1"), address_type="IPv6"))
    assert sl.family is IPFamily.IPv6
    assert sl.endpoints[0].ip == ip_address("fd00::1")


def test_bad_endpoint_address() -> None:
    err = invalid(parse_endpoint_slice, eps_slice(endpoint("10.1.0.999")))
    assert err.field_path == "endpoints[0].addresses[0]"
    err = invalid(parse_endpoint_slice, eps_slice({"addresses": []}))
    assert err.field_path == "endpoints[0].addresses"


def test_only_first_address_used() -> None:
    (ep,) = parse_slice_ok(eps_slice({"addresses": ["10.1.0.1", "10.1.0.2"]})).endpoints
    assert ep.ip == ip_address("10.1.0.1")


def test_hints() -> None:
    sl = parse_slice_ok(eps_slice(
        endpoint("10.1.0.1", hints={"forZones": [{"name": "z1"}, {"name": "z2"}],
                                    "forNodes": [{"name": "node-a"}]}),
        endpoint("10.1.0.2", hints={"forZones": [{"name": "z1"}]}),
        endpoint("10.1.0.3", hints={}),
        endpoint("10.1.0.4", hints=None),
    ))
    a, b, c, d = sl.endpoints
    assert a.zone_hints == ("z1", "z2") and a.node_hints == ("node-a",)
    assert b.zone_hints == ("z1",) and b.node_hints is None
    assert c.zone_hints is None and c.node_hints is None
    assert d.zone_hints is None and d.node_hints is None


def test_bad_hint() -> None:
    err = invalid(parse_endpoint_slice, eps_slice(
        endpoint("10.1.0.1", hints={"forZones": ["z1"]})))
    assert err.field_path == "endpoints[0].hints.forZones[0]"


def test_slice_missing_namespace() -> None:
    obj = eps_slice(endpoint("10.1.0.1"))
    del obj["metadata"]["namespace"]
    err = invalid(parse_endpoint_slice, obj)
    assert (err.kind, err.field_path) == ("EndpointSlice", "metadata.namespace")


# --------------------------------------------------------------------------
# merge_endpoints


def _slice(name: str, *endpoints: dict[str, Any], ports: Any = None) -> EndpointSlice:
    return parse_slice_ok(eps_slice(*endpoints, name=name, ports=ports))


HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def test_merge_several_slices() -> None:
    merged = merge_endpoints([
        _slice("web-1", endpoint("10.1.0.2"), endpoint("10.1.0.1"), ports=HTTP),
        _slice("web-2", endpoint("10.1.0.3"), ports=HTTP),
    ], "node-a")
    assert list(merged) == [("http", Protocol.TCP)]
    assert [str(e) for e in merged[("http", Protocol.TCP)]] == [
        "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]


def test_merge_keyed_by_port_name_and_protocol() -> None:
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"},
             {"name": "dns", "port": 5353, "protocol": "TCP"},
             {"name": "metrics", "port": 9153, "protocol": "TCP"}]
    merged = merge_endpoints([_slice("s", endpoint("10.1.0.1"), ports=ports)], "")
    assert set(merged) == {("dns", Protocol.UDP), ("dns", Protocol.TCP),
                           ("metrics", Protocol.TCP)}
    assert merged[("dns", Protocol.UDP)][0].port == 53
    assert merged[("dns", Protocol.TCP)][0].port == 5353


def test_merge_same_name_different_port_numbers_keeps_both() -> None:
    merged = merge_endpoints([
        _slice("a", endpoint("10.1.0.1"), ports=HTTP),
        _slice("b", endpoint("10.1.0.1"), ports=[{"name": "http", "port": 9090}]),
    ], "")
    assert [e.address for e in merged[("http", Protocol.TCP)]] == [
        "10.1.0.1:8080", "10.1.0.1:9090"]


def test_merge_duplicates_prefer_local_copy() -> None:
    for order in (("a", "b"), ("b", "a")):
        merged = merge_endpoints([
            _slice(order[0], endpoint("10.1.0.1", nodeName="node-b",
                                      conditions={"ready": False}), ports=HTTP),
            _slice(order[1], endpoint("10.1.0.1", nodeName="node-a"), ports=HTTP),
        ], "node-a")
        (ep,) = merged[("http", Protocol.TCP)]
        assert ep.is_local and ep.node_name == "node-a" and ep.ready


def test_merge_duplicates_without_local_copy_collapse() -> None:
    merged = merge_endpoints([
        _slice("a", endpoint("10.1.0.1", nodeName="node-b"), ports=HTTP),
        _slice("b", endpoint("10.1.0.1", nodeName="node-c"), ports=HTTP),
        _slice("c", endpoint("10.1.0.1", nodeName="node-c"), endpoint("10.1.0.1"), ports=HTTP),
    ], "node-a")
    (ep,) = merged[("http", Protocol.TCP)]
    assert not ep.is_local


def test_merge_sorted_numerically() -> None:
    merged = merge_endpoints([_slice("s", *(endpoint(ip) for ip in (
        "10.1.0.10", "10.1.0.9", "10.1.0.100", "9.255.255.255", "10.1.0.2")), ports=HTTP)], "")
    assert [str(e.ip) for e in merged[("http", Protocol.TCP)]] == [
        "9.255.255.255", "10.1.0.2", "10.1.0.9", "10.1.0.10", "10.1.0.100"]


def test_merge_ipv6_sorted_numerically_and_bracketed() -> None:
    sl = parse_slice_ok(eps_slice(endpoint("fd00::10"), endpoint("fd00::9"),
                                  endpoint("fd00::a"), address_type="IPv6", ports=HTTP))
    eps = merge_endpoints([sl], "")[("http", Protocol.TCP)]
    assert [e.address for e in eps] == ["[fd00::9]:8080", "[fd00::a]:8080", "[fd00::10]:8080"]


def test_merge_is_local_from_node_name() -> None:
    merged = merge_endpoints([_slice("s", endpoint("10.1.0.1", nodeName="node-a"),
                                     endpoint("10.1.0.2", nodeName="node-b"),
                                     endpoint("10.1.0.3"), ports=HTTP)], "node-a")
    assert [e.is_local for e in merged[("http", Protocol.TCP)]] == [True, False, False]


def test_merge_no_node_name_means_nothing_local() -> None:
    merged = merge_endpoints([_slice("s", endpoint("10.1.0.1"), ports=HTTP)], "")
    assert not merged[("http", Protocol.TCP)][0].is_local


def test_merge_carries_conditions_zone_and_hints() -> None:
    merged = merge_endpoints([_slice("s", endpoint(
        "10.1.0.1", nodeName="n", zone="z1",
        conditions={"ready": False, "serving": True, "terminating": True},
        hints={"forZones": [{"name": "z1"}], "forNodes": [{"name": "n"}]}), ports=HTTP)], "n")
    (ep,) = merged[("http", Protocol.TCP)]
    assert ep == Endpoint(ip=ip_address("10.1.0.1"), port=8080, ready=False, serving=True,
                          terminating=True, node_name="n", zone="z1", is_local=True,
                          zone_hints=("z1",), node_hints=("n",))


def test_merge_empty() -> None:
    assert merge_endpoints([], "n") == {}
    # a slice with ports but no endpoints gives an empty list for that port
    assert merge_endpoints([_slice("s", ports=HTTP)], "n") == {("http", Protocol.TCP): ()}


# --------------------------------------------------------------------------
# Nodes


def node(**status_spec: Any) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": "node-a", "labels": {
        "topology.kubernetes.io/zone": "z1"}}, **status_spec}


def test_parse_node_internal_before_external() -> None:
    info = parse_node(node(status={"addresses": [
        {"type": "ExternalIP", "address": "203.0.113.5"},
        {"type": "Hostname", "address": "node-a"},
        {"type": "InternalIP", "address": "10.0.0.5"},
        {"type": "InternalIP", "address": "fd00::5"},
        {"type": "InternalDNS", "address": "node-a.cluster.local"},
    ]}, spec={"podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"], "podCIDR": "10.244.1.0/24"}))
    assert info.name == "node-a"
    assert info.zone == "z1"
    assert info.addresses == (ip_address("10.0.0.5"), ip_address("fd00::5"),
                              ip_address("203.0.113.5"))
    assert info.pod_cidrs == (ip_network("10.244.1.0/24"), ip_network("fd00:244:1::/64"))


def test_parse_node_pod_cidr_fallback() -> None:
    info = parse_node(node(spec={"podCIDR": "10.244.2.0/24"}))
    assert info.pod_cidrs == (ip_network("10.244.2.0/24"),)


def test_parse_node_minimal() -> None:
    info = parse_node({"metadata": {"name": "bare"}})
    assert (info.name, info.addresses, info.zone, info.pod_cidrs) == ("bare", (), "", ())


def test_parse_node_bad_address() -> None:
    err = invalid(parse_node, node(status={"addresses": [
        {"type": "InternalIP", "address": "10.0.0.5"},
        {"type": "ExternalIP", "address": "nope"}]}))
    assert (err.kind, err.key, err.field_path) == ("Node", "node-a",
                                                   "status.addresses[1].address")


def test_parse_node_bad_cidr() -> None:
    err = invalid(parse_node, node(spec={"podCIDRs": ["10.244.0.0/24", "bad"]}))
    assert err.field_path == "spec.podCIDRs[1]"
