"""KubeProxyConfiguration parsing: the upstream schema, flag overrides, defaults, validation.

The document is the ``config.conf`` key of the kube-system/kube-proxy ConfigMap
(``apiVersion: kubeproxy.config.k8s.io/v1alpha1``, ``kind: KubeProxyConfiguration``).
Precedence is flag > document > default. Defaults and validation follow upstream
kube-proxy (``pkg/proxy/apis/config/v1alpha1/defaults.go`` and
``pkg/proxy/apis/config/validation/validation.go``), including its quirks: a zero
``iptables.syncPeriod``, ``iptables.minSyncPeriod``, ``ipvs.syncPeriod`` or
``configSyncPeriod`` in the document means "use the default", while a zero given
by a flag is kept.

Unknown fields never stop the start: they come back as warnings naming the
field's path. Upstream fields that pyproxy has no use for (``logging``,
``nftables``, ``winkernel``, ``portRange``, ...) are accepted silently; the few
that would change behaviour pyproxy does not implement warn when they are set.
Invalid values raise :class:`ConfigError`, whose ``field`` is the document's own
path (``iptables.minSyncPeriod``) or, for a value that came from the command
line, the flag (``--cluster-cidr``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from enum import StrEnum
from fractions import Fraction
from typing import Any, NamedTuple, TypeAlias

import yaml

__all__ = [
    "API_VERSION",
    "DEFAULT_HEALTHZ_PORT",
    "DEFAULT_METRICS_PORT",
    "IPVS_SCHEDULERS",
    "KIND",
    "OVERRIDE_KEYS",
    "RELOADABLE",
    "ClientConnectionConfig",
    "ConfigError",
    "ConntrackConfig",
    "DetectLocalConfig",
    "DetectLocalMode",
    "HostPort",
    "IPNetwork",
    "IPTablesConfig",
    "IPVSConfig",
    "ProxyConfig",
    "ProxyMode",
    "diff_reloadable",
    "format_duration",
    "load_config",
    "load_config_file",
    "parse_duration",
]

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
DEFAULT_HEALTHZ_PORT = 10256
DEFAULT_METRICS_PORT = 10249

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: IPVS schedulers known to the kernel (``ipvsadm -s``); "" in the document means rr.
IPVS_SCHEDULERS = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos"}
)


class ProxyMode(StrEnum):
    """The dataplane. An empty ``mode`` in the document means iptables."""

    IPTABLES = "iptables"
    IPVS = "ipvs"


class DetectLocalMode(StrEnum):
    """How traffic from local pods is recognised (upstream ``LocalMode``)."""

    CLUSTER_CIDR = "ClusterCIDR"
    NODE_CIDR = "NodeCIDR"
    BRIDGE_INTERFACE = "BridgeInterface"
    INTERFACE_NAME_PREFIX = "InterfaceNamePrefix"


class HostPort(NamedTuple):
    """A listen address; ``host`` carries no brackets. ``str()`` gives ``host:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class ConfigError(Exception):
    """An invalid configuration.

    ``field`` names the offending field by its path in the document
    (``iptables.masqueradeBit``, ``nodePortAddresses[1]``) or by the flag it came
    from (``--sync-period``); it is ``""`` for errors about the document as a
    whole (unreadable file, broken YAML). When validation finds several problems,
    the first one is ``field``/``message`` and ``errors`` holds all of them.
    """

    def __init__(self, field: str, message: str, *, errors: Sequence[ConfigError] = ()) -> None:
        self.field = field
        self.message = message
        self.errors: tuple[ConfigError, ...] = tuple(errors) or (self,)
        super().__init__(self._text())

    def _text(self) -> str:
        first = f"{self.field}: {self.message}" if self.field else self.message
        rest = self.errors[1:]
        if not rest:
            return first
        more = "; ".join(str(e) for e in rest)
        return f"{first}; and {len(rest)} more: {more}"


# --------------------------------------------------------------------------- durations

_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # µs, MICRO SIGN
    "\u03bcs": 1_000,  # μs, GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
_MAX_DURATION_NS = 2**63 - 1


def parse_duration(text: str) -> float:
    """Parse a Go duration string (``"1m30s"``, ``"1.5h"``, ``"-300ms"``, ``"0"``) to seconds.

    Units: ns, us, µs, ms, s, m, h. Every number needs a unit except a lone
    ``0``. Raises :class:`ValueError` naming the text on anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r}: not a string")
    s = text
    negative = False
    if s[:1] in ("+", "-"):
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = Fraction(0)
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        assert m is not None  # the pattern matches the empty string
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac:
            raise ValueError(f"invalid duration {text!r}")
        if not unit:
            raise ValueError(f"invalid duration {text!r}: missing unit")
        if unit not in _NS_PER_UNIT:
            raise ValueError(
                f"invalid duration {text!r}: unknown unit {unit!r} (use ns, us, ms, s, m or h)"
            )
        number = Fraction(int(whole or "0"))
        if frac:
            number += Fraction(int(frac), 10 ** len(frac))
        total += number * _NS_PER_UNIT[unit]
        if total > _MAX_DURATION_NS:
            raise ValueError(f"invalid duration {text!r}: out of range")
        pos = m.end()
    seconds = float(Fraction(int(total), 1_000_000_000))
    return -seconds if negative else seconds


def _trim_fraction(value: Fraction, digits: int) -> str:
    scaled = round(value * 10**digits)
    whole, rest = divmod(abs(scaled), 10**digits)
    sign = "-" if scaled < 0 else ""
    text = f"{sign}{whole}.{rest:0{digits}d}".rstrip("0").rstrip(".")
    return text


def format_duration(seconds: float) -> str:
    """Format seconds as Go's ``time.Duration.String`` does (``90.0 -> "1m30s"``)."""
    ns = round(Fraction(seconds) * 1_000_000_000)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim_fraction(Fraction(ns, 1_000), 3)}\u00b5s"
    if ns < 1_000_000_000:
        return f"{sign}{_trim_fraction(Fraction(ns, 1_000_000), 6)}ms"
    hours, rest = divmod(ns, 3600 * 1_000_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000_000)
    secs = _trim_fraction(Fraction(rest, 1_000_000_000), 9)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True, slots=True)
class IPTablesConfig:
    masquerade_all: bool = False
    masquerade_bit: int = 14
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    localhost_node_ports: bool = True


@dataclass(frozen=True, slots=True)
class IPVSConfig:
    scheduler: str = "rr"
    strict_arp: bool = False
    sync_period: float = 30.0
    min_sync_period: float = 0.0
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    tcp_timeout: float = 0.0  # 0 keeps the kernel's value
    tcp_fin_timeout: float = 0.0
    udp_timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class ConntrackConfig:
    max_per_core: int = 32 * 1024  # 0 leaves nf_conntrack_max alone (and ignores min)
    min: int = 128 * 1024
    tcp_established_timeout: float = 24 * 3600.0  # 0 leaves the kernel's value alone
    tcp_close_wait_timeout: float = 3600.0
    tcp_be_liberal: bool = False
    udp_timeout: float = 0.0
    udp_stream_timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class DetectLocalConfig:
    bridge_interface: str = ""
    interface_name_prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClientConnectionConfig:
    kubeconfig: str = ""  # "" means in-cluster configuration
    qps: float = 5.0
    burst: int = 10


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """A complete, validated, defaulted configuration. ``ProxyConfig()`` is all defaults."""

    mode: ProxyMode = ProxyMode.IPTABLES
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    bind_address: str = "0.0.0.0"
    healthz_bind_address: HostPort = HostPort("0.0.0.0", DEFAULT_HEALTHZ_PORT)
    metrics_bind_address: HostPort = HostPort("127.0.0.1", DEFAULT_METRICS_PORT)
    bind_address_hard_fail: bool = False
    #: Node name to use instead of the hostname; trimmed and lower-cased as upstream does.
    hostname_override: str = ""
    config_sync_period: float = 15 * 60.0
    iptables: IPTablesConfig = field(default_factory=IPTablesConfig)
    ipvs: IPVSConfig = field(default_factory=IPVSConfig)
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)
    #: CIDRs (normalised) and/or "primary"; empty means every local address.
    #: The upstream keywords "all" and "localhost" are expanded to their CIDRs.
    node_port_addresses: tuple[str, ...] = ()
    detect_local_mode: DetectLocalMode = DetectLocalMode.CLUSTER_CIDR
    detect_local: DetectLocalConfig = field(default_factory=DetectLocalConfig)
    #: Sorted (name, enabled) pairs.
    feature_gates: tuple[tuple[str, bool], ...] = ()
    client_connection: ClientConnectionConfig = field(default_factory=ClientConnectionConfig)
    oom_score_adj: int = -999
    #: From ``--service-proxy-name`` only: serve only Services whose
    #: ``service.kubernetes.io/service-proxy-name`` label has this value.
    service_proxy_name: str | None = None

    @property
    def sync_period(self) -> float:
        """The active mode's syncPeriod, in seconds."""
        if self.mode is ProxyMode.IPVS:
            return self.ipvs.sync_period
        return self.iptables.sync_period

    @property
    def min_sync_period(self) -> float:
        """The active mode's minSyncPeriod, in seconds."""
        if self.mode is ProxyMode.IPVS:
            return self.ipvs.min_sync_period
        return self.iptables.min_sync_period

    @property
    def masquerade_value(self) -> int:
        return 1 << self.iptables.masquerade_bit

    @property
    def masquerade_mark(self) -> str:
        """The fwmark that asks for SNAT, as iptables prints it: ``"0x4000"`` for bit 14."""
        return f"{self.masquerade_value:#x}"

    @property
    def masquerade_mask(self) -> str:
        """The mask that selects only the masquerade bit (rules use ``mark/mask``)."""
        return f"{self.masquerade_value:#x}"

    def feature_gate(self, name: str, default: bool = False) -> bool:
        return dict(self.feature_gates).get(name, default)


_DEFAULT = ProxyConfig()


# --------------------------------------------------------------------------- document schema

# Leaf kinds. A dict is a nested section.
_STR, _BOOL, _INT32, _FLOAT, _DURATION, _STRLIST, _BOOLMAP = (
    "str",
    "bool",
    "int32",
    "float",
    "duration",
    "strlist",
    "boolmap",
)
_IGNORE = "ignore"  # upstream field pyproxy has no use for: accepted silently
_UNSUPPORTED = "unsupported"  # upstream field pyproxy does not implement: warns when set

_Spec: TypeAlias = Mapping[str, "str | _Spec"]

_SCHEMA: _Spec = {
    "apiVersion": _STR,
    "kind": _STR,
    "featureGates": _BOOLMAP,
    "clientConnection": {
        "kubeconfig": _STR,
        "acceptContentTypes": _IGNORE,
        "contentType": _IGNORE,
        "qps": _FLOAT,
        "burst": _INT32,
    },
    "logging": _IGNORE,
    "hostnameOverride": _STR,
    "bindAddress": _STR,
    "healthzBindAddress": _STR,
    "metricsBindAddress": _STR,
    "bindAddressHardFail": _BOOL,
    "enableProfiling": _UNSUPPORTED,
    "showHiddenMetricsForVersion": _UNSUPPORTED,
    "mode": _STR,
    "iptables": {
        "masqueradeBit": _INT32,
        "masqueradeAll": _BOOL,
        "localhostNodePorts": _BOOL,
        "snatNodeInternalIP": _UNSUPPORTED,
        "syncPeriod": _DURATION,
        "minSyncPeriod": _DURATION,
    },
    "ipvs": {
        "syncPeriod": _DURATION,
        "minSyncPeriod": _DURATION,
        "scheduler": _STR,
        "excludeCIDRs": _STRLIST,
        "strictARP": _BOOL,
        "tcpTimeout": _DURATION,
        "tcpFinTimeout": _DURATION,
        "udpTimeout": _DURATION,
    },
    "nftables": _IGNORE,
    "winkernel": _IGNORE,
    "detectLocalMode": _STR,
    "detectLocal": {"bridgeInterface": _STR, "interfaceNamePrefix": _STR},
    "clusterCIDR": _STR,
    "nodePortAddresses": _STRLIST,
    "oomScoreAdj": _INT32,
    "conntrack": {
        "maxPerCore": _INT32,
        "min": _INT32,
        "tcpEstablishedTimeout": _DURATION,
        "tcpCloseWaitTimeout": _DURATION,
        "tcpBeLiberal": _BOOL,
        "udpTimeout": _DURATION,
        "udpStreamTimeout": _DURATION,
    },
    "configSyncPeriod": _DURATION,
    "portRange": _IGNORE,
    "udpIdleTimeout": _IGNORE,
    "windowsRunAsService": _IGNORE,
}

# Fields whose zero value in the document means "use the default" (upstream
# defaulting tests for the zero value, not for absence).
_ZERO_MEANS_DEFAULT = (
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "iptables.syncPeriod",
    "iptables.minSyncPeriod",
    "ipvs.syncPeriod",
    "configSyncPeriod",
    "clientConnection.qps",
    "clientConnection.burst",
)

#: Keys accepted in the ``overrides`` mapping (flag names with ``_`` for ``-``).
OVERRIDE_KEYS = frozenset(
    {
        "mode",
        "cluster_cidr",
        "masquerade_all",
        "hostname_override",
        "healthz_bind_address",
        "metrics_bind_address",
        "sync_period",
        "min_sync_period",
        "ipvs_scheduler",
        "service_proxy_name",
        "node_port_addresses",
        "bind_address",
        "kubeconfig",
    }
)

_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({_show(value)})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


class _Missing:
    pass


_BAD = _Missing()


class _Ctx:
    """Working state: flat values by document path, where they came from, problems."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.shown: dict[str, str] = {}  # how the value was written, for messages
        self.origin: dict[str, str] = {}  # path -> flag, for values from the command line
        self.errors: list[ConfigError] = []
        self.warnings: list[str] = []
        self.bad: set[str] = set()

    def name(self, path: str) -> str:
        return self.origin.get(path, path)

    def error(self, path: str, message: str) -> None:
        self.bad.add(path)
        self.errors.append(ConfigError(self.name(path), message))

    def invalid(self, path: str, message: str, shown: str | None = None) -> None:
        what = shown if shown is not None else self.shown.get(path, _show(self.values.get(path)))
        self.error(path, f"invalid value {what}: {message}")

    def set(self, path: str, value: object, shown: str, origin: str | None = None) -> None:
        self.values[path] = value
        self.shown[path] = shown
        if origin is not None:
            self.origin[path] = origin
        else:
            self.origin.pop(path, None)

    def has(self, path: str) -> bool:
        return path in self.values

    def get(self, path: str, default: Any) -> Any:
        return self.values.get(path, default)


# --------------------------------------------------------------------------- document walk


def _convert(ctx: _Ctx, path: str, kind: str, raw: object) -> object:
    if kind == _STR:
        if not isinstance(raw, str):
            ctx.error(path, f"expected a string, got {_type_name(raw)}")
            return _BAD
        return raw
    if kind == _BOOL:
        if not isinstance(raw, bool):
            ctx.error(path, f"expected true or false, got {_type_name(raw)}")
            return _BAD
        return raw
    if kind == _INT32:
        if isinstance(raw, bool) or not isinstance(raw, int):
            ctx.error(path, f"expected an integer, got {_type_name(raw)}")
            return _BAD
        if not _INT32_MIN <= raw <= _INT32_MAX:
            ctx.error(path, f"invalid value {raw}: out of range for a 32-bit integer")
            return _BAD
        return raw
    if kind == _FLOAT:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            ctx.error(path, f"expected a number, got {_type_name(raw)}")
            return _BAD
        return float(raw)
    if kind == _DURATION:
        if not isinstance(raw, str):
            ctx.error(
                path,
                f"expected a duration string such as '30s', got {_type_name(raw)}",
            )
            return _BAD
        try:
            return parse_duration(raw)
        except ValueError as exc:
            ctx.error(path, f"{exc} (expected a duration such as '30s' or '1m30s')")
            return _BAD
    if kind == _STRLIST:
        if not isinstance(raw, list):
            ctx.error(path, f"expected a list of strings, got {_type_name(raw)}")
            return _BAD
        items: list[str] = []
        ok = True
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                ctx.error(f"{path}[{i}]", f"expected a string, got {_type_name(item)}")
                ctx.bad.add(path)
                ok = False
            else:
                items.append(item)
        return items if ok else _BAD
    if kind == _BOOLMAP:
        if not isinstance(raw, Mapping):
            ctx.error(path, f"expected a mapping of names to true/false, got {_type_name(raw)}")
            return _BAD
        gates: dict[str, bool] = {}
        ok = True
        for key, value in raw.items():
            if not isinstance(value, bool):
                ctx.error(f"{path}.{key}", f"expected true or false, got {_type_name(value)}")
                ctx.bad.add(path)
                ok = False
            else:
                gates[str(key)] = value
        return gates if ok else _BAD
    raise AssertionError(f"unknown kind {kind}")  # pragma: no cover


def _is_set(raw: object) -> bool:
    """Whether an ignored upstream field carries a non-default (non-zero) value."""
    if isinstance(raw, Mapping):
        return any(_is_set(v) for v in raw.values())
    if isinstance(raw, list):
        return bool(raw)
    return raw not in (None, False, 0, "", "0s", "0")


def _walk(ctx: _Ctx, node: Mapping[Any, Any], spec: _Spec, prefix: str) -> None:
    for key, raw in node.items():
        path = f"{prefix}{key}"
        kind = spec.get(key) if isinstance(key, str) else None
        if kind is None:
            ctx.warnings.append(
                f"unknown field {path!r} in {KIND} ignored (misspelt, or newer than pyproxy knows)"
            )
            continue
        if kind == _IGNORE or raw is None:
            continue
        if kind == _UNSUPPORTED:
            if _is_set(raw):
                ctx.warnings.append(f"field {path!r} is not supported by pyproxy; ignored")
            continue
        if not isinstance(kind, str):
            if not isinstance(raw, Mapping):
                ctx.error(path, f"expected a mapping, got {_type_name(raw)}")
                continue
            _walk(ctx, raw, kind, f"{path}.")
            continue
        value = _convert(ctx, path, kind, raw)
        if value is not _BAD:
            ctx.set(path, value, _show(raw))


def _read_document(ctx: _Ctx, text: str | None, source: str) -> None:
    if text is None:
        return
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        ctx.errors.append(ConfigError("", f"{source}: invalid YAML: {exc}"))
        return
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        ctx.errors.append(
            ConfigError("", f"{source}: expected a {KIND} mapping, got {_type_name(doc)}")
        )
        return
    if not doc:
        return
    _walk(ctx, doc, _SCHEMA, "")
    kind = ctx.get("kind", None)
    if "kind" not in ctx.bad:
        if kind is None:
            ctx.error("kind", f"missing; must be {KIND}")
        elif kind != KIND:
            hint = ""
            if kind == "ConfigMap":
                hint = " (give the ConfigMap's config.conf key, not the ConfigMap)"
            ctx.invalid("kind", f"must be {KIND}{hint}")
    api_version = ctx.get("apiVersion", None)
    if "apiVersion" not in ctx.bad:
        if api_version is None:
            ctx.error("apiVersion", f"missing; must be {API_VERSION}")
        elif api_version != API_VERSION:
            ctx.invalid("apiVersion", f"must be {API_VERSION}")
    for path in _ZERO_MEANS_DEFAULT:
        if ctx.get(path, None) in (0, 0.0, ""):
            ctx.values.pop(path, None)


# --------------------------------------------------------------------------- overrides


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _override_str(ctx: _Ctx, key: str, value: object) -> str | None:
    if not isinstance(value, str):
        ctx.errors.append(ConfigError(_flag(key), f"expected a string, got {_type_name(value)}"))
        return None
    return value


def _override_duration(ctx: _Ctx, key: str, value: object) -> float | None:
    flag = _flag(key)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            ctx.errors.append(
                ConfigError(flag, f"{exc} (expected a duration such as '30s' or '1m30s')")
            )
            return None
    ctx.errors.append(ConfigError(flag, f"expected a duration, got {_type_name(value)}"))
    return None


def _apply_overrides(ctx: _Ctx, overrides: Mapping[str, object]) -> str | None:
    """Write flag values over the document's. Returns --service-proxy-name."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in sorted(set(given) - OVERRIDE_KEYS):
        ctx.errors.append(ConfigError(_flag(key), "unknown override (not a pyproxy flag)"))
    service_proxy_name: str | None = None

    simple = {
        "mode": "mode",
        "hostname_override": "hostnameOverride",
        "healthz_bind_address": "healthzBindAddress",
        "metrics_bind_address": "metricsBindAddress",
        "bind_address": "bindAddress",
        "ipvs_scheduler": "ipvs.scheduler",
        "cluster_cidr": "clusterCIDR",
        "kubeconfig": "clientConnection.kubeconfig",
    }
    for key, path in simple.items():
        if key not in given:
            continue
        text = _override_str(ctx, key, given[key])
        if text is None:
            continue
        if text == "" and path in _ZERO_MEANS_DEFAULT:
            ctx.values.pop(path, None)
            ctx.origin.pop(path, None)
            continue
        ctx.set(path, text, repr(text), _flag(key))

    if "masquerade_all" in given:
        value = given["masquerade_all"]
        if isinstance(value, bool):
            ctx.set("iptables.masqueradeAll", value, _show(value), _flag("masquerade_all"))
        else:
            ctx.errors.append(
                ConfigError(
                    _flag("masquerade_all"), f"expected true or false, got {_type_name(value)}"
                )
            )

    if "node_port_addresses" in given:
        value = given["node_port_addresses"]
        flag = _flag("node_port_addresses")
        items: list[str] | None = None
        if isinstance(value, str):
            items = [part.strip() for part in value.split(",")] if value.strip() else []
        elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
            items = [str(v) for v in value]
        else:
            ctx.errors.append(
                ConfigError(flag, f"expected comma-separated CIDRs, got {_type_name(value)}")
            )
        if items is not None:
            ctx.set("nodePortAddresses", items, _show(value), flag)

    # The period flags apply to the section of the mode that will be active.
    mode = ctx.get("mode", "")
    section = "ipvs" if mode == ProxyMode.IPVS.value else "iptables"
    for key, leaf in (("sync_period", "syncPeriod"), ("min_sync_period", "minSyncPeriod")):
        if key in given:
            seconds = _override_duration(ctx, key, given[key])
            if seconds is not None:
                shown = given[key] if isinstance(given[key], str) else format_duration(seconds)
                ctx.set(f"{section}.{leaf}", seconds, repr(shown), _flag(key))

    if "service_proxy_name" in given:
        flag = _flag("service_proxy_name")
        text = _override_str(ctx, "service_proxy_name", given["service_proxy_name"])
        if text:
            if _LABEL_VALUE.match(text):
                service_proxy_name = text
            else:
                ctx.errors.append(
                    ConfigError(
                        flag,
                        f"invalid value {text!r}: must be a valid label value (at most 63 "
                        "letters, digits, '-', '_' or '.', starting and ending with a "
                        "letter or digit)",
                    )
                )
    return service_proxy_name


# --------------------------------------------------------------------------- building


def _split_host_port(text: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort, enough for listen addresses."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            return None
        host, port = text[1:end], text[end + 2 :]
        if "[" in host or "]" in port or "[" in port:
            return None
        return host, port
    if text.count(":") != 1:
        return None
    host, port = text.split(":")
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text


def _append_port_if_needed(addr: str, port: int) -> str:
    """Upstream AppendPortIfNeeded: a bare IP gets the default port."""
    if _split_host_port(addr) is not None or not _is_ip(addr):
        return addr
    if ":" in addr:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def _host_port(ctx: _Ctx, path: str, default_host: str, default_port: int) -> HostPort:
    default = HostPort(default_host, default_port)
    if not ctx.has(path):
        return default
    text = _append_port_if_needed(str(ctx.get(path, "")), default_port)
    parts = _split_host_port(text)
    if parts is None:
        ctx.invalid(path, "must be IP:port (e.g. 0.0.0.0:10256 or [::]:10256)")
        return default
    host, port = parts
    if not _is_ip(host):
        ctx.invalid(path, f"{host!r} is not a valid IP address")
        return default
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        ctx.invalid(path, f"{port!r} is not a valid port (1-65535)")
        return default
    return HostPort(host, int(port))


def _parse_cidr(text: str) -> IPNetwork:
    if "/" not in text:
        raise ValueError("missing prefix length")
    return ipaddress.ip_network(text.strip(), strict=False)


def _cluster_cidrs(ctx: _Ctx) -> tuple[IPNetwork, ...]:
    path = "clusterCIDR"
    text = str(ctx.get(path, "")).strip()
    if not text:
        return ()
    parts = [p.strip() for p in text.split(",")]
    nets: list[IPNetwork] = []
    for part in parts:
        try:
            nets.append(_parse_cidr(part))
        except ValueError:
            ctx.invalid(
                path,
                f"{part!r} is not a valid CIDR block (e.g. 10.244.0.0/16 or "
                "10.244.0.0/16,fd00:10:244::/56)",
            )
            return ()
    if len(nets) > 2:
        ctx.invalid(path, "only one CIDR, or a dual-stack pair of one IPv4 and one IPv6 CIDR")
        return ()
    if len(nets) == 2 and nets[0].version == nets[1].version:
        ctx.invalid(path, "two CIDRs must be a dual-stack pair (one IPv4, one IPv6)")
        return ()
    return tuple(nets)


def _cidr_list(ctx: _Ctx, path: str) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for i, item in enumerate(ctx.get(path, [])):
        try:
            nets.append(_parse_cidr(item))
        except ValueError:
            where = ctx.name(path) if path in ctx.origin else f"{path}[{i}]"
            ctx.bad.add(path)
            ctx.errors.append(
                ConfigError(where, f"invalid value {item!r}: must be a valid CIDR block")
            )
    return tuple(nets)


_NODE_PORT_KEYWORDS = {
    "all": ("0.0.0.0/0", "::/0"),
    "localhost": ("127.0.0.0/8", "::1/128"),
}


def _node_port_addresses(ctx: _Ctx) -> tuple[str, ...]:
    path = "nodePortAddresses"
    out: list[str] = []
    for i, item in enumerate(ctx.get(path, [])):
        entry = item.strip()
        if entry == "primary":
            expanded: tuple[str, ...] = ("primary",)
        elif entry in _NODE_PORT_KEYWORDS:
            expanded = _NODE_PORT_KEYWORDS[entry]
        else:
            try:
                expanded = (str(_parse_cidr(entry)),)
            except ValueError:
                where = ctx.name(path) if path in ctx.origin else f"{path}[{i}]"
                ctx.bad.add(path)
                ctx.errors.append(
                    ConfigError(
                        where,
                        f"invalid value {item!r}: must be a CIDR block or 'primary'",
                    )
                )
                continue
        out.extend(e for e in expanded if e not in out)
    return tuple(out)


def _mode(ctx: _Ctx) -> ProxyMode:
    text = ctx.get("mode", "")
    if text in ("", ProxyMode.IPTABLES.value):
        return ProxyMode.IPTABLES
    if text == ProxyMode.IPVS.value:
        return ProxyMode.IPVS
    if text in ("nftables", "kernelspace", "userspace"):
        ctx.invalid(
            "mode",
            f"the {text} mode is not supported: pyproxy supports the iptables and ipvs "
            "modes ('' means iptables)",
        )
    else:
        ctx.invalid("mode", "must be iptables, ipvs or '' (which means iptables)")
    return ProxyMode.IPTABLES


def _check_period(ctx: _Ctx, path: str, value: float, *, positive: bool) -> None:
    if positive and value <= 0:
        ctx.invalid(path, "must be greater than 0")
    elif not positive and value < 0:
        ctx.invalid(path, "must be greater than or equal to 0")


def _check_interface(ctx: _Ctx, path: str, value: str, mode: DetectLocalMode) -> None:
    if not value:
        ctx.error(path, f"must not be empty when detectLocalMode is {mode.value}")
    elif len(value) > 15 or "/" in value or any(c.isspace() for c in value):
        ctx.invalid(path, "must be a Linux interface name (at most 15 characters, no '/')")


def _build(ctx: _Ctx, service_proxy_name: str | None) -> ProxyConfig:
    d_ipt, d_ipvs, d_ct = IPTablesConfig(), IPVSConfig(), ConntrackConfig()
    d_cc = ClientConnectionConfig()

    mode = _mode(ctx)

    # iptables: validated whatever the mode, as upstream does.
    bit = ctx.get("iptables.masqueradeBit", d_ipt.masquerade_bit)
    if not 0 <= bit <= 31:
        ctx.invalid("iptables.masqueradeBit", "must be within the range [0, 31]")
    ipt_sync = ctx.get("iptables.syncPeriod", d_ipt.sync_period)
    ipt_min = ctx.get("iptables.minSyncPeriod", d_ipt.min_sync_period)
    _check_period(ctx, "iptables.syncPeriod", ipt_sync, positive=True)
    _check_period(ctx, "iptables.minSyncPeriod", ipt_min, positive=False)
    iptables = IPTablesConfig(
        masquerade_all=ctx.get("iptables.masqueradeAll", d_ipt.masquerade_all),
        masquerade_bit=bit,
        sync_period=ipt_sync,
        min_sync_period=ipt_min,
        localhost_node_ports=ctx.get("iptables.localhostNodePorts", d_ipt.localhost_node_ports),
    )

    # ipvs: semantic checks only when it is the active mode, as upstream does.
    scheduler = ctx.get("ipvs.scheduler", "") or d_ipvs.scheduler
    ipvs_sync = ctx.get("ipvs.syncPeriod", d_ipvs.sync_period)
    ipvs_min = ctx.get("ipvs.minSyncPeriod", d_ipvs.min_sync_period)
    timeouts = {
        leaf: ctx.get(f"ipvs.{leaf}", 0.0) for leaf in ("tcpTimeout", "tcpFinTimeout", "udpTimeout")
    }
    if mode is ProxyMode.IPVS:
        _check_period(ctx, "ipvs.syncPeriod", ipvs_sync, positive=True)
        _check_period(ctx, "ipvs.minSyncPeriod", ipvs_min, positive=False)
        if (
            ipvs_min > ipvs_sync
            and ipvs_sync > 0
            and not {"ipvs.syncPeriod", "ipvs.minSyncPeriod"} & ctx.bad
        ):
            ctx.invalid(
                "ipvs.minSyncPeriod",
                f"must be less than or equal to {ctx.name('ipvs.syncPeriod')} "
                f"({format_duration(ipvs_sync)})",
            )
        for leaf, value in timeouts.items():
            _check_period(ctx, f"ipvs.{leaf}", value, positive=False)
        if scheduler not in IPVS_SCHEDULERS:
            ctx.invalid(
                "ipvs.scheduler",
                f"unknown IPVS scheduler; must be one of {', '.join(sorted(IPVS_SCHEDULERS))} "
                "or '' (which means rr)",
            )
    ipvs = IPVSConfig(
        scheduler=scheduler,
        strict_arp=ctx.get("ipvs.strictARP", d_ipvs.strict_arp),
        sync_period=ipvs_sync,
        min_sync_period=ipvs_min,
        exclude_cidrs=_cidr_list(ctx, "ipvs.excludeCIDRs"),
        tcp_timeout=timeouts["tcpTimeout"],
        tcp_fin_timeout=timeouts["tcpFinTimeout"],
        udp_timeout=timeouts["udpTimeout"],
    )

    ct_values: dict[str, Any] = {}
    for leaf, attr in (
        ("maxPerCore", "max_per_core"),
        ("min", "min"),
        ("tcpEstablishedTimeout", "tcp_established_timeout"),
        ("tcpCloseWaitTimeout", "tcp_close_wait_timeout"),
        ("udpTimeout", "udp_timeout"),
        ("udpStreamTimeout", "udp_stream_timeout"),
    ):
        value = ctx.get(f"conntrack.{leaf}", getattr(d_ct, attr))
        if value < 0:
            ctx.invalid(f"conntrack.{leaf}", "must be greater than or equal to 0")
        ct_values[attr] = value
    conntrack = ConntrackConfig(
        tcp_be_liberal=ctx.get("conntrack.tcpBeLiberal", d_ct.tcp_be_liberal), **ct_values
    )

    config_sync = ctx.get("configSyncPeriod", _DEFAULT.config_sync_period)
    _check_period(ctx, "configSyncPeriod", config_sync, positive=True)

    bind_address = ctx.get("bindAddress", "0.0.0.0")
    ipv6 = False
    if not _is_ip(bind_address):
        ctx.invalid("bindAddress", "must be a valid IP address")
    else:
        ipv6 = ipaddress.ip_address(bind_address).version == 6
    healthz = _host_port(
        ctx, "healthzBindAddress", "::" if ipv6 else "0.0.0.0", DEFAULT_HEALTHZ_PORT
    )
    metrics = _host_port(
        ctx, "metricsBindAddress", "::1" if ipv6 else "127.0.0.1", DEFAULT_METRICS_PORT
    )

    local_mode_text = ctx.get("detectLocalMode", "") or DetectLocalMode.CLUSTER_CIDR.value
    try:
        local_mode = DetectLocalMode(local_mode_text)
    except ValueError:
        ctx.invalid(
            "detectLocalMode",
            "must be one of " + ", ".join(m.value for m in DetectLocalMode),
        )
        local_mode = DetectLocalMode.CLUSTER_CIDR
    detect_local = DetectLocalConfig(
        bridge_interface=ctx.get("detectLocal.bridgeInterface", ""),
        interface_name_prefix=ctx.get("detectLocal.interfaceNamePrefix", ""),
    )
    if local_mode is DetectLocalMode.BRIDGE_INTERFACE:
        _check_interface(
            ctx, "detectLocal.bridgeInterface", detect_local.bridge_interface, local_mode
        )
    elif local_mode is DetectLocalMode.INTERFACE_NAME_PREFIX:
        _check_interface(
            ctx, "detectLocal.interfaceNamePrefix", detect_local.interface_name_prefix, local_mode
        )

    burst = ctx.get("clientConnection.burst", d_cc.burst)
    if burst < 0:
        ctx.invalid("clientConnection.burst", "must be greater than or equal to 0")
    client = ClientConnectionConfig(
        kubeconfig=ctx.get("clientConnection.kubeconfig", d_cc.kubeconfig),
        qps=ctx.get("clientConnection.qps", d_cc.qps),
        burst=burst,
    )

    oom = ctx.get("oomScoreAdj", _DEFAULT.oom_score_adj)
    if not -1000 <= oom <= 1000:
        ctx.invalid("oomScoreAdj", "must be within the range [-1000, 1000]")

    return ProxyConfig(
        mode=mode,
        cluster_cidrs=_cluster_cidrs(ctx),
        bind_address=bind_address,
        healthz_bind_address=healthz,
        metrics_bind_address=metrics,
        bind_address_hard_fail=ctx.get("bindAddressHardFail", False),
        hostname_override=ctx.get("hostnameOverride", "").strip().lower(),
        config_sync_period=config_sync,
        iptables=iptables,
        ipvs=ipvs,
        conntrack=conntrack,
        node_port_addresses=_node_port_addresses(ctx),
        detect_local_mode=local_mode,
        detect_local=detect_local,
        feature_gates=tuple(sorted(ctx.get("featureGates", {}).items())),
        client_connection=client,
        oom_score_adj=oom,
        service_proxy_name=service_proxy_name,
    )


def _raise(errors: list[ConfigError]) -> None:
    if errors:
        first = errors[0]
        raise ConfigError(first.field, first.message, errors=errors)


# --------------------------------------------------------------------------- entry points


def load_config(
    text: str | None,
    overrides: Mapping[str, object] | None = None,
    *,
    source: str = "configuration",
) -> tuple[ProxyConfig, list[str]]:
    """Parse a KubeProxyConfiguration document, apply flag overrides, default, validate.

    ``text`` None, empty or ``{}`` gives the defaults. ``overrides`` maps flag
    names (see :data:`OVERRIDE_KEYS`) to values; None means "flag not given".
    Returns the configuration and the warnings (unknown or unsupported fields,
    each naming its path). Raises :class:`ConfigError` on any invalid value.
    """
    ctx = _Ctx()
    _read_document(ctx, text, source)
    _raise(ctx.errors)  # nothing sensible can be built from a broken document
    service_proxy_name = _apply_overrides(ctx, overrides or {})
    config = _build(ctx, service_proxy_name)
    _raise(ctx.errors)
    return config, ctx.warnings


def load_config_file(
    path: str | os.PathLike[str], overrides: Mapping[str, object] | None = None
) -> tuple[ProxyConfig, list[str]]:
    """Like :func:`load_config` on the contents of ``path`` (``--config``)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {os.fspath(path)!s}: {exc}") from exc
    return load_config(text, overrides, source=f"config file {os.fspath(path)!s}")


# --------------------------------------------------------------------------- reload support

#: Names from :func:`diff_reloadable` that a running agent can apply without a restart.
RELOADABLE = frozenset(
    {
        "mode",
        "cluster_cidrs",
        "sync_period",
        "min_sync_period",
        "iptables.masquerade_all",
        "iptables.sync_period",
        "iptables.min_sync_period",
        "ipvs.sync_period",
        "ipvs.min_sync_period",
    }
)

_SECTIONS = ("iptables", "ipvs", "conntrack", "detect_local", "client_connection")


def diff_reloadable(old: ProxyConfig, new: ProxyConfig) -> set[str]:
    """Name what differs between two configurations.

    Top-level fields by their ProxyConfig attribute name (``mode``,
    ``cluster_cidrs``, ...); for a section, its name and each changed member
    (``iptables`` and ``iptables.masquerade_all``); and ``sync_period`` /
    ``min_sync_period`` when the active mode's effective period changed. Whatever
    is not in :data:`RELOADABLE` (section names aside) needs a restart.
    """
    changed: set[str] = set()
    for f in fields(ProxyConfig):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        changed.add(f.name)
        if f.name in _SECTIONS:
            for sub in fields(a):
                if getattr(a, sub.name) != getattr(b, sub.name):
                    changed.add(f"{f.name}.{sub.name}")
    if old.sync_period != new.sync_period:
        changed.add("sync_period")
    if old.min_sync_period != new.min_sync_period:
        changed.add("min_sync_period")
    return changed
