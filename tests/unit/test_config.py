"""Unit tests for pyproxy.config: KubeProxyConfiguration parsing, flags, defaults, validation."""

from __future__ import annotations

import dataclasses
import ipaddress
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from pyproxy.config import (
    API_VERSION,
    IPVS_SCHEDULERS,
    KIND,
    RELOADABLE,
    ConfigError,
    DetectLocalMode,
    HostPort,
    ProxyConfig,
    ProxyMode,
    diff_reloadable,
    format_duration,
    load_config,
    load_config_file,
    parse_duration,
)

HEADER = f"apiVersion: {API_VERSION}\nkind: {KIND}\n"

# The kubeadm document from KUBE-API.md §4, verbatim.
KUBEADM_DOC = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ""                      # ""=iptables; ipvs | nftables
clusterCIDR: ""               # comma-separated dual-stack pair allowed
bindAddress: 0.0.0.0          # node-IP hint, not a socket
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
hostnameOverride: ""
configSyncPeriod: 15m0s
iptables: {masqueradeAll: false, masqueradeBit: 14, syncPeriod: 30s, minSyncPeriod: 1s, localhostNodePorts: true}
ipvs: {scheduler: "", strictARP: false, syncPeriod: 30s, minSyncPeriod: 0s, excludeCIDRs: null,
       tcpTimeout: 0s, tcpFinTimeout: 0s, udpTimeout: 0s}   # 0 = keep kernel value
conntrack: {maxPerCore: 32768, min: 131072, tcpEstablishedTimeout: 24h0m0s,
            tcpCloseWaitTimeout: 1h0m0s, tcpBeLiberal: false, udpTimeout: 0s, udpStreamTimeout: 0s}
nodePortAddresses: null       # CIDRs or "primary"; null = all (iptables/ipvs)
detectLocalMode: ClusterCIDR  # NodeCIDR | BridgeInterface | InterfaceNamePrefix
detectLocal: {bridgeInterface: "", interfaceNamePrefix: ""}
featureGates: {}
clientConnection: {kubeconfig: /var/lib/kube-proxy/kubeconfig.conf, qps: 5, burst: 10}
"""  # noqa: E501

# What `kubeadm config print init-defaults --component-configs KubeProxyConfiguration`
# prints on a recent release: many fields pyproxy has no use for.
KUBEADM_FULL_DOC = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


def load(body: str = "", **overrides: object) -> ProxyConfig:
    config, _ = load_config(HEADER + textwrap.dedent(body), overrides)
    return config


def error_for(body: str = "", **overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(HEADER + textwrap.dedent(body), overrides)
    return info.value


# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("text", [None, "", "   \n", "# only a comment\n", "{}", "---\n"])
def test_empty_document_gives_upstream_defaults(text: str | None) -> None:
    config, warnings = load_config(text, {})
    assert warnings == []
    assert config == ProxyConfig()


def test_defaults_match_upstream_v1alpha1() -> None:
    c, _ = load_config(None, {})
    assert c.mode is ProxyMode.IPTABLES
    assert c.cluster_cidrs == ()
    assert c.bind_address == "0.0.0.0"
    assert c.healthz_bind_address == HostPort("0.0.0.0", 10256)
    assert c.metrics_bind_address == HostPort("127.0.0.1", 10249)
    assert str(c.healthz_bind_address) == "0.0.0.0:10256"
    assert str(c.metrics_bind_address) == "127.0.0.1:10249"
    assert c.hostname_override == ""
    assert c.config_sync_period == 15 * 60
    assert c.iptables.masquerade_all is False
    assert c.iptables.masquerade_bit == 14
    assert c.iptables.sync_period == 30
    assert c.iptables.min_sync_period == 1
    assert c.iptables.localhost_node_ports is True
    assert c.ipvs.scheduler == "rr"
    assert c.ipvs.strict_arp is False
    assert c.ipvs.sync_period == 30
    assert c.ipvs.min_sync_period == 0
    assert c.ipvs.exclude_cidrs == ()
    assert (c.ipvs.tcp_timeout, c.ipvs.tcp_fin_timeout, c.ipvs.udp_timeout) == (0, 0, 0)
    assert c.conntrack.max_per_core == 32768
    assert c.conntrack.min == 131072
    assert c.conntrack.tcp_established_timeout == 24 * 3600
    assert c.conntrack.tcp_close_wait_timeout == 3600
    assert c.conntrack.tcp_be_liberal is False
    assert (c.conntrack.udp_timeout, c.conntrack.udp_stream_timeout) == (0, 0)
    assert c.node_port_addresses == ()
    assert c.detect_local_mode is DetectLocalMode.CLUSTER_CIDR
    assert c.detect_local.bridge_interface == ""
    assert c.detect_local.interface_name_prefix == ""
    assert c.feature_gates == ()
    assert c.client_connection.kubeconfig == ""
    assert c.client_connection.qps == 5
    assert c.client_connection.burst == 10
    assert c.oom_score_adj == -999
    assert c.service_proxy_name is None
    assert c.sync_period == 30
    assert c.min_sync_period == 1


def test_config_is_frozen_and_hashable() -> None:
    c = load("clusterCIDR: 10.0.0.0/8\nfeatureGates: {A: true}\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mode = ProxyMode.IPVS  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.iptables.sync_period = 1  # type: ignore[misc]
    assert hash(c) == hash(load("clusterCIDR: 10.0.0.0/8\nfeatureGates: {A: true}\n"))


# ----------------------------------------------------------------------------- documents


def test_kubeadm_example_parses_without_warnings() -> None:
    config, warnings = load_config(KUBEADM_DOC, {})
    assert warnings == []
    assert config == dataclasses.replace(
        ProxyConfig(),
        client_connection=dataclasses.replace(
            ProxyConfig().client_connection, kubeconfig="/var/lib/kube-proxy/kubeconfig.conf"
        ),
    )


def test_full_kubeadm_document_with_zero_values_defaults_like_upstream() -> None:
    config, warnings = load_config(KUBEADM_FULL_DOC, {})
    assert warnings == []
    # Zero/null values in the document mean "default", as upstream defaulting does.
    assert config.iptables.sync_period == 30
    assert config.iptables.min_sync_period == 1
    assert config.iptables.masquerade_bit == 14
    assert config.iptables.localhost_node_ports is True
    assert config.ipvs.sync_period == 30
    assert config.config_sync_period == 900
    assert config.conntrack.max_per_core == 32768
    assert config.conntrack.tcp_established_timeout == 86400
    assert config.client_connection.qps == 5
    assert config.client_connection.burst == 10
    assert config.healthz_bind_address == HostPort("0.0.0.0", 10256)
    assert config.metrics_bind_address == HostPort("127.0.0.1", 10249)
    assert config.oom_score_adj == -999
    assert config.cluster_cidrs == (
        ipaddress.ip_network("10.244.0.0/16"),
        ipaddress.ip_network("fd00:10:244::/56"),
    )


def test_every_field_is_read() -> None:
    c = load(
        """\
        mode: ipvs
        clusterCIDR: 10.244.0.0/16
        bindAddress: 10.0.0.5
        healthzBindAddress: 10.0.0.5:1234
        metricsBindAddress: 0.0.0.0:9999
        bindAddressHardFail: true
        hostnameOverride: " Node-1 "
        configSyncPeriod: 1m
        oomScoreAdj: -500
        iptables:
          masqueradeAll: true
          masqueradeBit: 5
          syncPeriod: 10s
          minSyncPeriod: 2s
          localhostNodePorts: false
        ipvs:
          scheduler: wlc
          strictARP: true
          syncPeriod: 20s
          minSyncPeriod: 500ms
          excludeCIDRs: [192.168.0.0/24, "fd00::/64"]
          tcpTimeout: 15m
          tcpFinTimeout: 2m
          udpTimeout: 30s
        conntrack:
          maxPerCore: 0
          min: 0
          tcpEstablishedTimeout: 0s
          tcpCloseWaitTimeout: 30s
          tcpBeLiberal: true
          udpTimeout: 30s
          udpStreamTimeout: 300s
        nodePortAddresses: [10.0.0.0/8, primary]
        detectLocalMode: InterfaceNamePrefix
        detectLocal: {bridgeInterface: cbr0, interfaceNamePrefix: veth}
        featureGates: {Zeta: false, Alpha: true}
        clientConnection: {kubeconfig: /k.conf, qps: 2.5, burst: 7}
        """
    )
    assert c.mode is ProxyMode.IPVS
    assert c.cluster_cidrs == (ipaddress.ip_network("10.244.0.0/16"),)
    assert c.bind_address == "10.0.0.5"
    assert c.healthz_bind_address == HostPort("10.0.0.5", 1234)
    assert c.metrics_bind_address == HostPort("0.0.0.0", 9999)
    assert c.bind_address_hard_fail is True
    assert c.hostname_override == "node-1"
    assert c.config_sync_period == 60
    assert c.oom_score_adj == -500
    assert c.iptables.masquerade_all is True
    assert c.iptables.masquerade_bit == 5
    assert (c.iptables.sync_period, c.iptables.min_sync_period) == (10, 2)
    assert c.iptables.localhost_node_ports is False
    assert c.ipvs.scheduler == "wlc"
    assert c.ipvs.strict_arp is True
    assert (c.ipvs.sync_period, c.ipvs.min_sync_period) == (20, 0.5)
    assert c.ipvs.exclude_cidrs == (
        ipaddress.ip_network("192.168.0.0/24"),
        ipaddress.ip_network("fd00::/64"),
    )
    assert (c.ipvs.tcp_timeout, c.ipvs.tcp_fin_timeout, c.ipvs.udp_timeout) == (900, 120, 30)
    assert c.conntrack.max_per_core == 0  # explicit zero is kept (pointer field upstream)
    assert c.conntrack.min == 0
    assert c.conntrack.tcp_established_timeout == 0
    assert c.conntrack.tcp_close_wait_timeout == 30
    assert c.conntrack.tcp_be_liberal is True
    assert (c.conntrack.udp_timeout, c.conntrack.udp_stream_timeout) == (30, 300)
    assert c.node_port_addresses == ("10.0.0.0/8", "primary")
    assert c.detect_local_mode is DetectLocalMode.INTERFACE_NAME_PREFIX
    assert c.detect_local.bridge_interface == "cbr0"
    assert c.detect_local.interface_name_prefix == "veth"
    assert c.feature_gates == (("Alpha", True), ("Zeta", False))
    assert c.feature_gate("Alpha") is True
    assert c.feature_gate("Zeta", default=True) is False
    assert c.feature_gate("Missing") is False
    assert c.client_connection.kubeconfig == "/k.conf"
    assert c.client_connection.qps == 2.5
    assert c.client_connection.burst == 7
    # The active mode is ipvs, so the convenience properties follow it.
    assert (c.sync_period, c.min_sync_period) == (20, 0.5)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("", ProxyMode.IPTABLES), ("iptables", ProxyMode.IPTABLES), ("ipvs", ProxyMode.IPVS)],
)
def test_mode(mode: str, expected: ProxyMode) -> None:
    assert load(f"mode: {mode!r}\n").mode is expected


def test_mode_absent_or_null_is_iptables() -> None:
    assert load().mode is ProxyMode.IPTABLES
    assert load("mode: null\n").mode is ProxyMode.IPTABLES


@pytest.mark.parametrize("mode", ["nftables", "kernelspace", "userspace"])
def test_unsupported_modes_are_rejected_clearly(mode: str) -> None:
    err = error_for(f"mode: {mode}\n")
    assert err.field == "mode"
    assert mode in str(err)
    assert "iptables and ipvs" in str(err)


def test_unknown_mode_is_rejected() -> None:
    err = error_for("mode: IPVS\n")  # case matters, as upstream
    assert err.field == "mode"
    assert "'IPVS'" in str(err)


def test_zero_periods_in_document_mean_default_like_upstream() -> None:
    c = load("iptables: {syncPeriod: 0s, minSyncPeriod: 0s}\nipvs: {syncPeriod: '0'}\n")
    assert c.iptables.sync_period == 30
    assert c.iptables.min_sync_period == 1
    assert c.ipvs.sync_period == 30
    assert load("configSyncPeriod: 0s\n").config_sync_period == 900


def test_ipvs_scheduler_empty_means_rr() -> None:
    assert load("mode: ipvs\nipvs: {scheduler: ''}\n").ipvs.scheduler == "rr"


@pytest.mark.parametrize("scheduler", sorted(IPVS_SCHEDULERS))
def test_known_ipvs_schedulers(scheduler: str) -> None:
    assert load(f"mode: ipvs\nipvs: {{scheduler: {scheduler}}}\n").ipvs.scheduler == scheduler


def test_ipvs_section_is_only_validated_in_ipvs_mode() -> None:
    # Upstream validates the ipvs section only when mode is ipvs.
    body = "ipvs: {scheduler: bogus, syncPeriod: 1s, minSyncPeriod: 5s}\n"
    assert load(body).mode is ProxyMode.IPTABLES
    err = error_for("mode: ipvs\n" + body)
    assert {e.field for e in err.errors} == {"ipvs.scheduler", "ipvs.minSyncPeriod"}


# ----------------------------------------------------------------------------- addresses


def test_cluster_cidr_dual_stack() -> None:
    c = load("clusterCIDR: 'fd00:10:244::/56, 10.244.0.0/16'\n")
    assert c.cluster_cidrs == (
        ipaddress.ip_network("fd00:10:244::/56"),
        ipaddress.ip_network("10.244.0.0/16"),
    )


def test_cluster_cidr_host_bits_are_masked_like_go() -> None:
    assert load("clusterCIDR: 10.244.1.7/16\n").cluster_cidrs == (
        ipaddress.ip_network("10.244.0.0/16"),
    )


def test_bare_ip_gets_default_port() -> None:
    c = load("healthzBindAddress: 10.1.2.3\nmetricsBindAddress: '::1'\n")
    assert c.healthz_bind_address == HostPort("10.1.2.3", 10256)
    assert c.metrics_bind_address == HostPort("::1", 10249)
    assert str(c.metrics_bind_address) == "[::1]:10249"


def test_ipv6_bind_address_changes_default_listen_addresses() -> None:
    c = load("bindAddress: '::'\n")
    assert c.healthz_bind_address == HostPort("::", 10256)
    assert c.metrics_bind_address == HostPort("::1", 10249)
    c = load("healthzBindAddress: '[fd00::1]:8080'\n")
    assert c.healthz_bind_address == HostPort("fd00::1", 8080)


def test_node_port_addresses_keywords_and_normalisation() -> None:
    c = load("nodePortAddresses: [primary, 10.0.0.1/8, all, localhost, 0.0.0.0/0]\n")
    assert c.node_port_addresses == (
        "primary",
        "10.0.0.0/8",
        "0.0.0.0/0",
        "::/0",
        "127.0.0.0/8",
        "::1/128",
    )
    assert load("nodePortAddresses: []\n").node_port_addresses == ()


@pytest.mark.parametrize("mode", list(DetectLocalMode))
def test_detect_local_modes(mode: DetectLocalMode) -> None:
    c = load(
        f"detectLocalMode: {mode.value}\n"
        "detectLocal: {bridgeInterface: cni0, interfaceNamePrefix: veth}\n"
    )
    assert c.detect_local_mode is mode


def test_detect_local_mode_empty_means_cluster_cidr() -> None:
    assert load("detectLocalMode: ''\n").detect_local_mode is DetectLocalMode.CLUSTER_CIDR


# ----------------------------------------------------------------------------- masquerade


@pytest.mark.parametrize(("bit", "mark"), [(14, "0x4000"), (0, "0x1"), (31, "0x80000000")])
def test_masquerade_mark(bit: int, mark: str) -> None:
    c = load(f"iptables: {{masqueradeBit: {bit}}}\n")
    assert c.masquerade_mark == mark
    assert c.masquerade_mask == mark
    assert c.masquerade_value == 1 << bit


def test_default_masquerade_mark() -> None:
    assert ProxyConfig().masquerade_mark == "0x4000"
    assert ProxyConfig().masquerade_mask == "0x4000"


# ----------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("+0", 0.0),
        ("-0", 0.0),
        ("0s", 0.0),
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("15m0s", 900.0),
        ("24h0m0s", 86400.0),
        ("1h1m1s", 3661.0),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("300ms", 0.3),
        ("1500us", 0.0015),
        ("1500\u00b5s", 0.0015),
        ("1500\u03bcs", 0.0015),
        ("2000000ns", 0.002),
        ("-1.5s", -1.5),
        ("+5s", 5.0),
        ("1h-0s", None),  # invalid: sign only at the start
        ("3m0.25s", 180.25),
        ("2562047h", 2562047 * 3600.0),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(ValueError):
            parse_duration(text)
    else:
        assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "s", "5", "1.5", ".", ".s", "-", "5 s", "5sec", "1d", "abc", "1m 30s", "30S", "2562048h"],
)
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (30, "30s"),
        (90, "1m30s"),
        (900, "15m0s"),
        (86400, "24h0m0s"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
        (0.0015, "1.5ms"),
        (0.000002, "2\u00b5s"),
        (1e-9, "1ns"),
        (-90, "-1m30s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "field", "shown"),
    [
        ("iptables: {syncPeriod: -1s}", "iptables.syncPeriod", "-1s"),
        ("iptables: {minSyncPeriod: -1s}", "iptables.minSyncPeriod", "-1s"),
        ("iptables: {masqueradeBit: 32}", "iptables.masqueradeBit", "32"),
        ("iptables: {masqueradeBit: -1}", "iptables.masqueradeBit", "-1"),
        ("mode: ipvs\nipvs: {syncPeriod: -5s}", "ipvs.syncPeriod", "-5s"),
        ("mode: ipvs\nipvs: {minSyncPeriod: -5s}", "ipvs.minSyncPeriod", "-5s"),
        ("mode: ipvs\nipvs: {syncPeriod: 5s, minSyncPeriod: 6s}", "ipvs.minSyncPeriod", "6s"),
        ("mode: ipvs\nipvs: {minSyncPeriod: 31s}", "ipvs.minSyncPeriod", "31s"),
        ("mode: ipvs\nipvs: {scheduler: fastest}", "ipvs.scheduler", "fastest"),
        ("mode: ipvs\nipvs: {tcpTimeout: -1s}", "ipvs.tcpTimeout", "-1s"),
        ("mode: ipvs\nipvs: {tcpFinTimeout: -1s}", "ipvs.tcpFinTimeout", "-1s"),
        ("mode: ipvs\nipvs: {udpTimeout: -1s}", "ipvs.udpTimeout", "-1s"),
        ("ipvs: {excludeCIDRs: [10.0.0.0/8, nope]}", "ipvs.excludeCIDRs[1]", "nope"),
        ("conntrack: {maxPerCore: -1}", "conntrack.maxPerCore", "-1"),
        ("conntrack: {min: -1}", "conntrack.min", "-1"),
        ("conntrack: {tcpEstablishedTimeout: -1s}", "conntrack.tcpEstablishedTimeout", "-1s"),
        ("conntrack: {tcpCloseWaitTimeout: -1h}", "conntrack.tcpCloseWaitTimeout", "-1h"),
        ("conntrack: {udpTimeout: -1s}", "conntrack.udpTimeout", "-1s"),
        ("conntrack: {udpStreamTimeout: -1s}", "conntrack.udpStreamTimeout", "-1s"),
        ("configSyncPeriod: -1m", "configSyncPeriod", "-1m"),
        ("clusterCIDR: 10.0.0.0/33", "clusterCIDR", "10.0.0.0/33"),
        ("clusterCIDR: 10.0.0.0", "clusterCIDR", "10.0.0.0"),
        ("clusterCIDR: 10.0.0.0/8,10.1.0.0/16", "clusterCIDR", "10.1.0.0/16"),
        ("clusterCIDR: '10.0.0.0/8,fd00::/64,fd01::/64'", "clusterCIDR", "fd01::/64"),
        ("clusterCIDR: '10.0.0.0/8,'", "clusterCIDR", "10.0.0.0/8,"),
        ("bindAddress: localhost", "bindAddress", "localhost"),
        ("healthzBindAddress: 0.0.0.0:0", "healthzBindAddress", "0.0.0.0:0"),
        ("healthzBindAddress: 0.0.0.0:65536", "healthzBindAddress", "0.0.0.0:65536"),
        ("healthzBindAddress: 0.0.0.0:http", "healthzBindAddress", "0.0.0.0:http"),
        ("healthzBindAddress: node1:10256", "healthzBindAddress", "node1:10256"),
        ("metricsBindAddress: ':10249'", "metricsBindAddress", ":10249"),
        ("metricsBindAddress: '::1:10249'", "metricsBindAddress", "::1:10249"),
        ("metricsBindAddress: 'not an address'", "metricsBindAddress", "not an address"),
        ("nodePortAddresses: [10.0.0.0/8, eth0]", "nodePortAddresses[1]", "eth0"),
        ("detectLocalMode: PodCIDR", "detectLocalMode", "PodCIDR"),
        ("detectLocalMode: BridgeInterface", "detectLocal.bridgeInterface", "BridgeInterface"),
        (
            "detectLocalMode: InterfaceNamePrefix",
            "detectLocal.interfaceNamePrefix",
            "InterfaceNamePrefix",
        ),
        (
            "detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: a-very-long-bridge0}",
            "detectLocal.bridgeInterface",
            "a-very-long-bridge0",
        ),
        ("clientConnection: {burst: -1}", "clientConnection.burst", "-1"),
        ("oomScoreAdj: -1001", "oomScoreAdj", "-1001"),
    ],
)
def test_validation_errors_name_field_and_value(body: str, field: str, shown: str) -> None:
    err = error_for(body + "\n")
    assert err.field == field
    assert str(err).startswith(field + ":")
    assert shown in str(err)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("iptables: [1, 2]", "iptables"),
        ("iptables: true", "iptables"),
        ("ipvs: 'rr'", "ipvs"),
        ("conntrack: [maxPerCore]", "conntrack"),
        ("clientConnection: /kubeconfig", "clientConnection"),
        ("detectLocal: cni0", "detectLocal"),
        ("iptables: {masqueradeAll: 'yes please'}", "iptables.masqueradeAll"),
        ("iptables: {masqueradeAll: 1}", "iptables.masqueradeAll"),
        ("iptables: {masqueradeBit: '14'}", "iptables.masqueradeBit"),
        ("iptables: {masqueradeBit: 14.0}", "iptables.masqueradeBit"),
        ("iptables: {masqueradeBit: true}", "iptables.masqueradeBit"),
        ("iptables: {syncPeriod: 30}", "iptables.syncPeriod"),
        ("iptables: {syncPeriod: 30 seconds}", "iptables.syncPeriod"),
        ("iptables: {minSyncPeriod: [1s]}", "iptables.minSyncPeriod"),
        ("ipvs: {strictARP: 'true'}", "ipvs.strictARP"),
        ("ipvs: {excludeCIDRs: 10.0.0.0/8}", "ipvs.excludeCIDRs"),
        ("ipvs: {excludeCIDRs: [1]}", "ipvs.excludeCIDRs[0]"),
        ("conntrack: {maxPerCore: 1e3}", "conntrack.maxPerCore"),
        ("conntrack: {min: 4294967296}", "conntrack.min"),
        ("conntrack: {tcpBeLiberal: no-thanks}", "conntrack.tcpBeLiberal"),
        ("mode: 1", "mode"),
        ("mode: [ipvs]", "mode"),
        ("clusterCIDR: [10.0.0.0/8]", "clusterCIDR"),
        ("hostnameOverride: {name: x}", "hostnameOverride"),
        ("nodePortAddresses: 10.0.0.0/8", "nodePortAddresses"),
        ("nodePortAddresses: [{cidr: 10.0.0.0/8}]", "nodePortAddresses[0]"),
        ("featureGates: [A]", "featureGates"),
        ("featureGates: {A: enabled}", "featureGates.A"),
        ("clientConnection: {qps: fast}", "clientConnection.qps"),
        ("clientConnection: {burst: 1.5}", "clientConnection.burst"),
        ("clientConnection: {kubeconfig: 5}", "clientConnection.kubeconfig"),
        ("detectLocal: {bridgeInterface: [cni0]}", "detectLocal.bridgeInterface"),
        ("bindAddressHardFail: maybe", "bindAddressHardFail"),
    ],
)
def test_wrong_yaml_types_name_the_field(body: str, field: str) -> None:
    err = error_for(body + "\n")
    assert err.field == field
    assert field in str(err)


def test_duration_error_says_what_was_expected() -> None:
    err = error_for("iptables: {syncPeriod: 30}\n")
    assert "duration" in str(err) and "30s" in str(err)
    err = error_for("iptables: {syncPeriod: 30 seconds}\n")
    assert "'30 seconds'" in str(err)


def test_all_errors_are_reported_first_one_as_field() -> None:
    err = error_for("iptables: {masqueradeBit: 99, syncPeriod: -1s}\nbindAddress: x\n")
    assert err.field == "iptables.masqueradeBit"
    assert [e.field for e in err.errors] == [
        "iptables.masqueradeBit",
        "iptables.syncPeriod",
        "bindAddress",
    ]
    text = str(err)
    assert "and 2 more" in text
    assert "iptables.syncPeriod" in text and "bindAddress" in text


def test_single_error_has_itself_in_errors() -> None:
    err = error_for("iptables: {masqueradeBit: 99}\n")
    assert [e.field for e in err.errors] == ["iptables.masqueradeBit"]
    assert "more" not in str(err)


# ----------------------------------------------------------------------------- kind, apiVersion


def test_wrong_kind_names_kind() -> None:
    err = error_for_doc(f"apiVersion: {API_VERSION}\nkind: KubeletConfiguration\n")
    assert err.field == "kind"
    assert "KubeletConfiguration" in str(err)
    assert KIND in str(err)


def test_configmap_instead_of_its_key_gets_a_hint() -> None:
    err = error_for_doc("apiVersion: v1\nkind: ConfigMap\ndata: {config.conf: ''}\n")
    assert err.field == "kind"
    assert "config.conf" in str(err)


def test_missing_kind_names_kind() -> None:
    err = error_for_doc(f"apiVersion: {API_VERSION}\nmode: ipvs\n")
    assert err.field == "kind"


@pytest.mark.parametrize(
    "api_version", ["kubeproxy.config.k8s.io/v1alpha2", "v1", "kubeproxy.config.k8s.io/v1"]
)
def test_wrong_api_version_names_api_version(api_version: str) -> None:
    err = error_for_doc(f"apiVersion: {api_version}\nkind: {KIND}\n")
    assert err.field == "apiVersion"
    assert api_version in str(err)


def test_missing_api_version() -> None:
    assert error_for_doc(f"kind: {KIND}\n").field == "apiVersion"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_document_must_be_a_mapping(text: str) -> None:
    err = error_for_doc(text)
    assert err.field == ""
    assert KIND in str(err)


def test_broken_yaml() -> None:
    err = error_for_doc("mode: [ipvs\n")
    assert err.field == ""
    assert "invalid YAML" in str(err)


def error_for_doc(text: str, **overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(text, overrides)
    return info.value


# ----------------------------------------------------------------------------- unknown fields


def test_unknown_fields_warn_with_their_path() -> None:
    config, warnings = load_config(
        HEADER
        + textwrap.dedent(
            """\
            mode: ipvs
            colour: blue
            iptables: {masqueradeBit: 14, masqueradeal: true}
            ipvs: {scheduler: rr, sheduler: wrr}
            conntrack: {maxPerCore: 1, tcpEstablished: 1h}
            detectLocal: {bridge: cni0}
            clientConnection: {kubeconfig: /k, timeout: 5s}
            """
        ),
        {},
    )
    assert config.mode is ProxyMode.IPVS
    assert config.iptables.masquerade_all is False
    assert config.ipvs.scheduler == "rr"
    paths = [
        "colour",
        "iptables.masqueradeal",
        "ipvs.sheduler",
        "conntrack.tcpEstablished",
        "detectLocal.bridge",
        "clientConnection.timeout",
    ]
    assert len(warnings) == len(paths)
    for path, warning in zip(paths, warnings, strict=True):
        assert repr(path) in warning
        assert "unknown field" in warning


def test_unknown_field_with_bad_value_only_warns() -> None:
    _, warnings = load_config(HEADER + "futureThing: {deep: [1, {x: y}]}\n", {})
    assert len(warnings) == 1 and "'futureThing'" in warnings[0]


def test_field_names_are_case_sensitive() -> None:
    config, warnings = load_config(HEADER + "Mode: ipvs\nclustercidr: 10.0.0.0/8\n", {})
    assert config.mode is ProxyMode.IPTABLES
    assert config.cluster_cidrs == ()
    assert ["'Mode'" in w for w in warnings] == [True, False]
    assert "'clustercidr'" in warnings[1]


def test_unused_upstream_fields_are_silent_unless_unsupported_and_set() -> None:
    _, warnings = load_config(
        HEADER
        + "nftables: {masqueradeBit: 3}\nlogging: {verbosity: 4}\noomScoreAdj: -999\n"
        + "winkernel: {enableDSR: true}\nportRange: 30000-32767\nudpIdleTimeout: 250ms\n",
        {},
    )
    assert warnings == []
    _, warnings = load_config(
        HEADER + "enableProfiling: true\niptables: {snatNodeInternalIP: true}\n", {}
    )
    assert len(warnings) == 2
    assert "'enableProfiling'" in warnings[0] and "not supported" in warnings[0]
    assert "'iptables.snatNodeInternalIP'" in warnings[1]


def test_null_sections_and_values_mean_absent() -> None:
    config, warnings = load_config(
        HEADER + "iptables: null\nipvs: ~\nconntrack: {maxPerCore: null}\nmode: null\n", {}
    )
    assert warnings == []
    assert config == ProxyConfig()


# ----------------------------------------------------------------------------- overrides


def test_flags_override_document_which_overrides_defaults() -> None:
    body = """\
        clusterCIDR: 10.0.0.0/8
        hostnameOverride: from-file
        iptables: {masqueradeAll: false, syncPeriod: 10s}
        """
    file_only = load(body)
    assert file_only.hostname_override == "from-file"
    assert file_only.iptables.sync_period == 10
    assert file_only.iptables.min_sync_period == 1  # default

    c = load(
        body,
        cluster_cidr="10.1.0.0/16,fd00::/48",
        hostname_override="From-Flag",
        masquerade_all=True,
        sync_period="1m",
        healthz_bind_address="127.0.0.1:9000",
        metrics_bind_address="0.0.0.0",
        node_port_addresses="10.0.0.0/8, primary",
        service_proxy_name="pyproxy",
        kubeconfig="/flag.conf",
        bind_address="10.0.0.9",
    )
    assert c.cluster_cidrs == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("fd00::/48"),
    )
    assert c.hostname_override == "from-flag"
    assert c.iptables.masquerade_all is True
    assert c.iptables.sync_period == 60
    assert c.healthz_bind_address == HostPort("127.0.0.1", 9000)
    assert c.metrics_bind_address == HostPort("0.0.0.0", 10249)
    assert c.node_port_addresses == ("10.0.0.0/8", "primary")
    assert c.service_proxy_name == "pyproxy"
    assert c.client_connection.kubeconfig == "/flag.conf"
    assert c.bind_address == "10.0.0.9"


def test_none_means_flag_not_given() -> None:
    body = "mode: ipvs\nclusterCIDR: 10.0.0.0/8\niptables: {masqueradeAll: true}\n"
    c = load(
        body,
        mode=None,
        cluster_cidr=None,
        masquerade_all=None,
        hostname_override=None,
        healthz_bind_address=None,
        metrics_bind_address=None,
        sync_period=None,
        min_sync_period=None,
        ipvs_scheduler=None,
        service_proxy_name=None,
        node_port_addresses=None,
    )
    assert c == load(body)


def test_mode_flag_overrides_document() -> None:
    assert load("mode: ipvs\n", mode="iptables").mode is ProxyMode.IPTABLES
    assert load("mode: iptables\n", mode="ipvs").mode is ProxyMode.IPVS
    assert load("mode: ipvs\n", mode="").mode is ProxyMode.IPTABLES


def test_period_flags_apply_to_the_active_mode() -> None:
    c = load("", sync_period="45s", min_sync_period="2s")
    assert (c.iptables.sync_period, c.iptables.min_sync_period) == (45, 2)
    assert (c.ipvs.sync_period, c.ipvs.min_sync_period) == (30, 0)

    c = load("mode: ipvs\n", sync_period="45s", min_sync_period="2s")
    assert (c.ipvs.sync_period, c.ipvs.min_sync_period) == (45, 2)
    assert (c.iptables.sync_period, c.iptables.min_sync_period) == (30, 1)
    assert (c.sync_period, c.min_sync_period) == (45, 2)

    c = load("mode: iptables\n", mode="ipvs", sync_period=timedelta(minutes=2), min_sync_period=3)
    assert (c.sync_period, c.min_sync_period) == (120, 3)


def test_zero_min_sync_period_from_flag_is_kept() -> None:
    # Upstream applies flags after defaulting, so an explicit 0 stays 0.
    assert load("", min_sync_period="0s").iptables.min_sync_period == 0
    assert load("", min_sync_period=0).min_sync_period == 0


def test_ipvs_scheduler_flag() -> None:
    assert load("mode: ipvs\nipvs: {scheduler: rr}\n", ipvs_scheduler="sh").ipvs.scheduler == "sh"


def test_cluster_cidr_flag_empty_clears_the_document_value() -> None:
    assert load("clusterCIDR: 10.0.0.0/8\n", cluster_cidr="").cluster_cidrs == ()


def test_node_port_addresses_flag_accepts_a_list() -> None:
    c = load("", node_port_addresses=["192.168.1.0/24", "primary"])
    assert c.node_port_addresses == ("192.168.1.0/24", "primary")
    assert load("nodePortAddresses: [primary]\n", node_port_addresses="").node_port_addresses == ()


def test_empty_listen_address_flag_means_default() -> None:
    c = load("healthzBindAddress: 10.0.0.1:1\n", healthz_bind_address="")
    assert c.healthz_bind_address == HostPort("0.0.0.0", 10256)


@pytest.mark.parametrize(
    ("overrides", "flag", "shown"),
    [
        ({"mode": "nftables"}, "--mode", "nftables"),
        ({"mode": "bogus"}, "--mode", "bogus"),
        ({"mode": 3}, "--mode", "3"),
        ({"cluster_cidr": "10.0.0.0/8,10.1.0.0/16"}, "--cluster-cidr", "10.1.0.0/16"),
        ({"cluster_cidr": "not-a-cidr"}, "--cluster-cidr", "not-a-cidr"),
        ({"masquerade_all": "true"}, "--masquerade-all", "true"),
        ({"hostname_override": 7}, "--hostname-override", "7"),
        ({"healthz_bind_address": "0.0.0.0:99999"}, "--healthz-bind-address", "99999"),
        ({"metrics_bind_address": "localhost:10249"}, "--metrics-bind-address", "localhost"),
        ({"sync_period": "0s"}, "--sync-period", "0s"),
        ({"sync_period": "-1s"}, "--sync-period", "-1s"),
        ({"sync_period": "soon"}, "--sync-period", "soon"),
        ({"min_sync_period": "-1s"}, "--min-sync-period", "-1s"),
        ({"min_sync_period": [1]}, "--min-sync-period", "list"),
        ({"mode": "ipvs", "min_sync_period": "1h"}, "--min-sync-period", "1h"),
        ({"mode": "ipvs", "ipvs_scheduler": "best"}, "--ipvs-scheduler", "best"),
        ({"node_port_addresses": "10.0.0.0/8,eth0"}, "--node-port-addresses", "eth0"),
        ({"node_port_addresses": 5}, "--node-port-addresses", "5"),
        ({"service_proxy_name": "not valid!"}, "--service-proxy-name", "not valid!"),
        ({"service_proxy_name": "x" * 64}, "--service-proxy-name", "x" * 64),
        ({"bind_address": "nowhere"}, "--bind-address", "nowhere"),
        ({"no_such_flag": 1}, "--no-such-flag", "unknown"),
    ],
)
def test_override_errors_name_the_flag(overrides: dict[str, object], flag: str, shown: str) -> None:
    err = error_for("", **overrides)
    assert err.field == flag
    assert str(err).startswith(flag + ":")
    assert shown in str(err)


def test_cross_field_error_names_flag_and_field() -> None:
    err = error_for("mode: ipvs\nipvs: {syncPeriod: 10s}\n", min_sync_period="20s")
    assert err.field == "--min-sync-period"
    assert "ipvs.syncPeriod" in str(err)
    err = error_for("mode: ipvs\nipvs: {minSyncPeriod: 20s}\n", sync_period="10s")
    assert err.field == "ipvs.minSyncPeriod"
    assert "--sync-period" in str(err)


def test_flag_value_replaces_invalid_document_value_origin() -> None:
    # A valid flag over a valid document value: the flag wins, no error.
    assert load("mode: ipvs\n", mode="iptables").mode is ProxyMode.IPTABLES
    # A document error still stops the start even if a flag would replace it.
    err = error_for("iptables: {syncPeriod: nonsense}\n", sync_period="10s")
    assert err.field == "iptables.syncPeriod"


def test_empty_service_proxy_name_means_unset() -> None:
    assert load("", service_proxy_name="").service_proxy_name is None


# ----------------------------------------------------------------------------- files


def test_load_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.conf"
    path.write_text(KUBEADM_DOC.replace('mode: ""', "mode: ipvs"))
    config, warnings = load_config_file(path, {"sync_period": "5s"})
    assert warnings == []
    assert config.mode is ProxyMode.IPVS
    assert config.ipvs.sync_period == 5
    assert load_config_file(str(path))[0].ipvs.sync_period == 30


def test_load_config_file_unreadable_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.conf"
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config_file(tmp_path)  # a directory
    assert str(tmp_path) in str(info.value)


def test_load_config_file_bad_yaml_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "config.conf"
    path.write_text("mode: [ipvs\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(path) in str(info.value)
    assert "invalid YAML" in str(info.value)


# ----------------------------------------------------------------------------- reload


def test_diff_reloadable_nothing_changed() -> None:
    assert diff_reloadable(load(KUBEADM_DOC[len(HEADER) :]), load_config(KUBEADM_DOC)[0]) == set()


def test_diff_reloadable_names_changes() -> None:
    old = load("clusterCIDR: 10.0.0.0/8\n")
    new = load(
        "mode: ipvs\nclusterCIDR: 10.1.0.0/16\n"
        "iptables: {masqueradeAll: true}\nipvs: {syncPeriod: 10s}\n"
    )
    changed = diff_reloadable(old, new)
    assert changed == {
        "mode",
        "cluster_cidrs",
        "iptables",
        "iptables.masquerade_all",
        "ipvs",
        "ipvs.sync_period",
        "sync_period",
        "min_sync_period",
    }
    assert changed - {"iptables", "ipvs"} <= RELOADABLE


def test_diff_reloadable_flags_what_needs_a_restart() -> None:
    old = load("")
    new = load("iptables: {masqueradeBit: 15}\nhealthzBindAddress: 0.0.0.0:1\n")
    changed = diff_reloadable(old, new)
    assert changed == {
        "iptables",
        "iptables.masquerade_bit",
        "healthz_bind_address",
    }
    assert not changed & RELOADABLE


def test_diff_reloadable_periods_of_inactive_mode_do_not_change_effective_period() -> None:
    changed = diff_reloadable(load(""), load("ipvs: {syncPeriod: 10s}\n"))
    assert changed == {"ipvs", "ipvs.sync_period"}
