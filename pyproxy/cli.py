"""The `pyproxy` command: run, plan, cleanup, version.

Configuration is settled before anything touches the kernel: an invalid
document or flag stops the start with a message naming the field.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any

import click
import tenacity

from pyproxy import logs
from pyproxy.agent import (
    CONFIG_KEY,
    Agent,
    build_dataplane,
    ipvs_available,
    ipvs_context,
    plan_context,
)
from pyproxy.config import ConfigError, ProxyConfig, ProxyMode, load_config, load_config_file
from pyproxy.introspect import (
    TraceInputs,
    from_iptables_plan,
    from_ipvs_plan,
    from_kernel_iptables,
    from_kernel_ipvs,
    iptables_diff,
    ipvs_diff,
    namespace_addresses,
    run_trace,
    trace_header,
    trace_json,
)
from pyproxy.iptables.plan import PlanContext, Planner
from pyproxy.iptables.restore import Backend, IPTables, IPTablesError, detect_backend
from pyproxy.iptables.ruleset import Ruleset, parse_save, render
from pyproxy.iptables.sync import IPTablesDataplane
from pyproxy.iptables.trace import Packet, TraceError, format_trace
from pyproxy.ipvs.diff import diff as ipvs_diff_ops
from pyproxy.ipvs.netlink import KUBE_PROXY_DUMMY, IPVSKernel
from pyproxy.ipvs.plan import DUMMY_INTERFACE, describe, node_port_addresses
from pyproxy.ipvs.plan import plan as ipvs_plan
from pyproxy.migrate import cleanup_kube_proxy
from pyproxy.model import InvalidObject, IPFamily, NodeInfo, parse_node
from pyproxy.sources import files
from pyproxy.tracker import ChangeTracker, Snapshot, report_invalid

if TYPE_CHECKING:
    from pyproxy.sources import kube

log = logging.getLogger("pyproxy")

MANIFEST_POLL_SECONDS = 1.0
ONCE_LIST_TIMEOUT = 60.0


@dataclass
class Settings:
    config: ProxyConfig
    overrides: dict[str, object]
    node_name: str
    manifests: str | None
    backend: str


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    """Flags shared by `run` and `plan`: they must compute the same rules."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="KubeProxyConfiguration file (the kube-proxy ConfigMap's config.conf)."),
        click.option("--mode", type=click.Choice(["iptables", "ipvs"]), default=None,
                     help="Dataplane; overrides the config file's `mode`."),
        click.option("--manifests", type=click.Path(exists=True),
                     help="Directory (or file) of Service/EndpointSlice/Node YAML manifests."),
        click.option("--hostname-override", default=None,
                     help="This node's name (default: $NODE_NAME, then the hostname)."),
        click.option("--cluster-cidr", default=None,
                     help="Pod CIDR(s), comma-separated; traffic from outside is masqueraded."),
        click.option("--masquerade-all", is_flag=True, default=None, flag_value=True,
                     help="Masquerade all service traffic."),
        click.option("--sync-period", default=None, help="Full resync period (Go duration)."),
        click.option("--min-sync-period", default=None,
                     help="Minimum time between syncs (Go duration)."),
        click.option("-v", "--verbose", is_flag=True, help="Debug logging."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _settings(config_file: str | None, mode: str | None, manifests: str | None,
              hostname_override: str | None, cluster_cidr: str | None,
              masquerade_all: bool | None, sync_period: str | None,
              min_sync_period: str | None, verbose: bool, backend: str = "auto",
              config_text: str | None = None, **more: object) -> Settings:
    logs.setup(verbose)
    overrides: dict[str, object] = {
        "mode": mode,
        "cluster_cidr": cluster_cidr,
        "masquerade_all": masquerade_all,
        "hostname_override": hostname_override,
        "sync_period": sync_period,
        "min_sync_period": min_sync_period,
        **more,
    }
    try:
        if config_file:
            config, warnings = load_config_file(config_file, overrides)
        else:
            config, warnings = load_config(config_text, overrides)
    except ConfigError as err:
        raise click.UsageError(f"invalid configuration: {err}") from err
    for warning in warnings:
        log.warning("configuration warning", extra={"detail": warning})
    node_name = (config.hostname_override or os.environ.get("NODE_NAME")
                 or socket.gethostname()).strip().lower()
    return Settings(config, overrides, node_name, manifests, backend)


def _node_info(settings: Settings, manifests: files.Manifests | None) -> NodeInfo:
    obj = manifests.node(settings.node_name) if manifests else None
    if obj is not None:
        try:
            return parse_node(obj)
        except InvalidObject as err:
            report_invalid(err)
    return NodeInfo(name=settings.node_name)


def _load(settings: Settings, tracker: ChangeTracker) -> files.Manifests:
    assert settings.manifests is not None
    manifests = files.load(settings.manifests)
    tracker.replace(manifests.services, manifests.slices)
    return manifests


def _iptables(backend: str) -> IPTables:
    chosen = detect_backend() if backend == "auto" else Backend(backend)
    log.info("iptables backend", extra={"backend": str(chosen),
                                        "detected": backend == "auto"})
    return IPTables(chosen)


def _read_config_map(api: Any, ref: str) -> str | None:
    """The ConfigMap's config.conf, read before anything touches the kernel."""
    from kubernetes import client

    ns, _, name = ref.partition("/")
    if not ns or not name:
        raise click.UsageError(f"--config-configmap: expected NAMESPACE/NAME, got {ref!r}")
    for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(6),
                                     wait=tenacity.wait_exponential(multiplier=1, max=8),
                                     reraise=True):
        with attempt:
            cm = client.CoreV1Api(api).read_namespaced_config_map(name, ns)
    data = cm.data or {}
    text = data.get(CONFIG_KEY)
    if text is None:
        raise click.UsageError(f"configmap {ref} has no {CONFIG_KEY!r} key")
    return str(text)


@click.group()
def main() -> None:
    """pyproxy: a kube-proxy replacement (iptables and IPVS dataplanes)."""


@main.command()
@_common
@click.option("--iptables-backend", type=click.Choice(["auto", "legacy", "nft"]),
              default="auto", show_default=True,
              help="Force an iptables backend instead of detecting the host's.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="Watch the API with this kubeconfig (default: in-cluster config).")
@click.option("--config-configmap", default=None, metavar="NAMESPACE/NAME",
              help="Read and watch the KubeProxyConfiguration in this ConfigMap.")
@click.option("--service-proxy-name", default=None,
              help="Serve only Services labelled service.kubernetes.io/service-proxy-name=NAME.")
@click.option("--once", is_flag=True, help="One full sync in this network namespace, then exit.")
def run(iptables_backend: str, kubeconfig: str | None, config_configmap: str | None,
        service_proxy_name: str | None, once: bool, **kw: Any) -> None:
    """Program this node's kernel and keep it in sync."""
    api = None
    if not kw.get("manifests"):
        logs.setup(bool(kw.get("verbose")))
        from pyproxy.sources import kube  # the kubernetes client is slow to import

        api = kube.api_client(kubeconfig)
        if config_configmap:
            kw["config_text"] = _read_config_map(api, config_configmap)
    settings = _settings(backend=iptables_backend, service_proxy_name=service_proxy_name, **kw)
    if settings.config.mode is ProxyMode.IPVS and not ipvs_available():
        raise click.UsageError("mode ipvs: IPVS is not available in this kernel "
                               "(no /proc/net/ip_vs, even after modprobe ip_vs)")
    manifests = None
    node = NodeInfo(settings.node_name)
    if settings.manifests:
        manifests = files.load(settings.manifests)
        node = _node_info(settings, manifests)
    dataplane = build_dataplane(settings.config, node, _iptables(settings.backend))
    agent = Agent(settings.config, settings.node_name, dataplane, overrides=settings.overrides)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())

    informers: list[kube.Informer] = []
    if manifests is not None:
        agent.tracker.replace(manifests.services, manifests.slices)
    else:
        cm = tuple(config_configmap.split("/", 1)) if config_configmap else None
        informers = agent.informers(api, cm)  # type: ignore[arg-type]

    if once:
        _sync_once(agent, informers)
        return
    agent.start_servers()
    if kw.get("config_file"):
        agent.watch_config_file(kw["config_file"])
    log.info("running", extra={"node": settings.node_name, "mode": str(settings.config.mode),
                               "source": "manifests" if manifests is not None else "api"})
    try:
        if manifests is not None:
            threading.Thread(target=_watch_manifests, args=(agent, settings), daemon=True,
                             name="manifests").start()
            agent.run([])
        else:
            agent.run(informers)
    finally:
        agent.close()


def _sync_once(agent: Agent, informers: list[kube.Informer]) -> None:
    if informers:
        for informer in informers:
            informer.start(agent.stop)
        if not all(i.synced.wait(ONCE_LIST_TIMEOUT) for i in informers[:2]):
            log.error("could not list Services and EndpointSlices")
            agent.stop.set()
            sys.exit(1)
    try:
        result = agent.reconciler.sync_once(full=True)
    except (IPTablesError, OSError) as err:
        log.error("could not program the kernel", extra={"error": str(err)})
        sys.exit(1)
    finally:
        agent.stop.set()
    log.info("synced", extra={"service_ports": len(agent.tracker.snapshot.services),
                              "lines_written": result.lines_written})


def _watch_manifests(agent: Agent, settings: Settings) -> None:
    assert settings.manifests is not None
    seen = files.fingerprint(settings.manifests)
    while not agent.stop.wait(MANIFEST_POLL_SECONDS):
        now = files.fingerprint(settings.manifests)
        if now == seen:
            continue
        seen = now
        with agent.reconciler.lock:
            manifests = _load(settings, agent.tracker)
        agent.set_node(manifests.node(settings.node_name))
        log.info("manifests changed", extra={"directory": settings.manifests})
        agent.reconciler.changed()


_BACKEND_OPTION = click.option(
    "--iptables-backend", type=click.Choice(["auto", "legacy", "nft"]), default="auto",
    show_default=True, help="Which iptables backend to read (default: the host's).")


@main.command()
@_common
@_BACKEND_OPTION
@click.option("--diff", "show_diff", is_flag=True,
              help="Show what a full sync would change against what the kernel holds now "
                   "(no output when in sync); touch nothing.")
def plan(iptables_backend: str, show_diff: bool, **kw: Any) -> None:
    """Print what a full sync would program (iptables rules; in IPVS mode also virtual
    servers, addresses and ipsets); touch nothing."""
    settings = _settings(backend=iptables_backend, **kw)
    if not settings.manifests:
        raise click.UsageError("--manifests DIR is required")
    tracker = ChangeTracker(settings.node_name, IPFamily.IPv4)
    manifests = _load(settings, tracker)
    snapshot = tracker.checkout()
    node = _node_info(settings, manifests)
    if show_diff:
        lines = _plan_diff(settings, snapshot, node)
        if lines:
            click.echo("\n".join(lines))
        return
    if settings.config.mode is ProxyMode.IPVS:
        # NodePorts listen on the node's addresses, as the Node object gives them here.
        ctx = replace(ipvs_context(settings.config, node), node_port_addresses=node.addresses)
        planned_ipvs = ipvs_plan(snapshot.services, snapshot.endpoints, ctx)
        click.echo(describe(planned_ipvs), nl=False)
        click.echo("# iptables rules (iptables-restore --noflush format)")
        click.echo(render(planned_ipvs.ruleset, Ruleset(), only=None).text, nl=False)
        return
    planned = Planner(plan_context(settings.config, node)).plan(
        snapshot.services, snapshot.endpoints)
    click.echo(render(planned.ruleset, Ruleset(), only=None).text, nl=False)


def _plan_diff(settings: Settings, snapshot: Snapshot, node: NodeInfo) -> list[str]:
    """The changes a full sync would make here, as the dataplanes compute them."""
    try:
        ipt = _iptables(settings.backend)
        existing = parse_save(ipt.save())
        if settings.config.mode is not ProxyMode.IPVS:
            planned = Planner(plan_context(settings.config, node)).plan(
                snapshot.services, snapshot.endpoints)
            return iptables_diff(planned.ruleset, existing)
        with IPVSKernel(exclude_cidrs=settings.config.ipvs.exclude_cidrs) as kernel:
            # Where NodePorts listen is read from the kernel, as the IPVS dataplane does.
            addresses = node_port_addresses(kernel.local_addresses())
            kernel.set_node_port_addresses(str(a) for a in addresses)
            ctx = replace(ipvs_context(settings.config, node), node_port_addresses=addresses)
            desired = ipvs_plan(snapshot.services, snapshot.endpoints, ctx)
            ops = ipvs_diff_ops(desired, kernel.read(), ipv6=False)
        return ipvs_diff(ops, desired.ruleset, existing)
    except (IPTablesError, OSError) as err:
        raise click.ClickException(f"could not read the kernel's state: {err}") from err


@main.command("trace")
@_common
@_BACKEND_OPTION
@click.option("--src", required=True, metavar="IP", help="The packet's source address.")
@click.option("--dst", required=True, metavar="IP:PORT",
              help="The packet's destination (IPv6 as [ADDR]:PORT).")
@click.option("--proto", type=click.Choice(["tcp", "udp", "sctp"]), default="tcp",
              show_default=True)
@click.option("--from-node/--from-outside", "from_node", default=None,
              help="Sent by the node itself (nat OUTPUT) or arriving from outside "
                   "(nat PREROUTING); default: from the node if --src is one of its addresses.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def trace_command(iptables_backend: str, src: str, dst: str, proto: str,
                  from_node: bool | None, as_json: bool, **kw: Any) -> None:
    """Follow one packet through pyproxy's rules: as planned from --manifests, or as
    programmed in this network namespace (iptables-save, and in IPVS mode the IPVS table
    and ipsets). Shows the chains it traverses, whether it is masqueraded, the endpoints
    it can reach (with probabilities), or the rule that rejects or drops it."""
    mode_given = kw.get("mode") is not None or kw.get("config_file") is not None
    settings = _settings(backend=iptables_backend, **kw)
    try:
        packet = Packet(src, *_host_port(dst), protocol=proto)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if settings.manifests:
        inputs = _planned_trace_inputs(settings)
    else:
        ipvs = settings.config.mode is ProxyMode.IPVS if mode_given else os.path.exists(
            f"/sys/class/net/{DUMMY_INTERFACE}")
        inputs = _kernel_trace_inputs(settings, ipvs, ipv6=":" in packet.dst)
    try:
        result, from_node = run_trace(inputs, packet, from_node)
    except TraceError as err:
        raise click.ClickException(f"cannot trace: {err}") from err
    if as_json:
        click.echo(json.dumps(trace_json(inputs, packet, from_node, result), indent=2))
        return
    click.echo(trace_header(inputs, packet, from_node) + format_trace(result), nl=False)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise click.UsageError(f"--dst: expected IP:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _planned_trace_inputs(settings: Settings) -> TraceInputs:
    tracker = ChangeTracker(settings.node_name, IPFamily.IPv4)
    manifests = _load(settings, tracker)
    snapshot = tracker.checkout()
    node = _node_info(settings, manifests)
    if settings.config.mode is ProxyMode.IPVS:
        ctx = replace(ipvs_context(settings.config, node), node_port_addresses=node.addresses)
        return from_ipvs_plan(ipvs_plan(snapshot.services, snapshot.endpoints, ctx), node)
    planned = Planner(plan_context(settings.config, node)).plan(
        snapshot.services, snapshot.endpoints)
    return from_iptables_plan(planned, node)


def _kernel_trace_inputs(settings: Settings, ipvs: bool, ipv6: bool = False) -> TraceInputs:
    try:
        ipt = replace(_iptables(settings.backend), ipv6=ipv6)
        source = f"kernel ({'ip6' if ipv6 else 'ip'}tables-{ipt.backend}" \
                 f"{', IPVS' if ipvs else ''})"
        saved = parse_save(ipt.save())
        local = namespace_addresses()
        if not ipvs:
            return from_kernel_iptables(saved, local, source)
        with IPVSKernel(exclude_cidrs=settings.config.ipvs.exclude_cidrs) as kernel:
            kernel.set_node_port_addresses(
                str(a) for a in node_port_addresses(kernel.local_addresses()))
            state = kernel.read()
        return from_kernel_ipvs(saved, state, local, source)
    except (IPTablesError, OSError) as err:
        raise click.ClickException(f"could not read the kernel's state: {err}") from err


@main.command()
@click.option("--kube-proxy", "kube_proxy", is_flag=True,
              help="Remove an upstream kube-proxy's leftovers instead (its KUBE-* chains and "
                   "jumps; kube-ipvs0, its IPVS services and KUBE-* ipsets), nothing else.")
@click.option("-v", "--verbose", is_flag=True)
def cleanup(kube_proxy: bool, verbose: bool) -> None:
    """Remove every chain and rule pyproxy owns in this network namespace (with
    --kube-proxy: everything an upstream kube-proxy left instead), nothing else."""
    logs.setup(verbose)
    if kube_proxy:
        report = cleanup_kube_proxy()
        for tool, lines in sorted(report.iptables_lines.items()):
            click.echo(f"{tool}: removed kube-proxy's chains and jumps ({lines} restore lines)")
        for key in report.virtual_servers:
            click.echo(f"ipvs: removed virtual server {key}")
        for name in report.ipsets:
            click.echo(f"ipset: destroyed {name}")
        if report.dummy_removed:
            click.echo(f"link: deleted {KUBE_PROXY_DUMMY}")
        for error in report.errors:
            click.echo(f"error: {error}", err=True)
        if report.errors:
            sys.exit(1)
        return
    failed = False
    for backend in Backend:
        ipt = IPTables(backend)
        try:
            ipt.save()
        except (FileNotFoundError, IPTablesError) as err:
            # Not installed, or unusable in this kernel: nothing of ours can be there.
            log.info("iptables backend unavailable", extra={"backend": str(backend),
                                                            "reason": str(err)})
            continue
        try:
            lines = IPTablesDataplane(ipt, PlanContext(NodeInfo(""))).cleanup()
        except IPTablesError as err:
            log.error("cleanup failed", extra={"backend": str(backend), "error": str(err)})
            failed = True
            continue
        log.info("cleaned up", extra={"backend": str(backend), "lines": lines})
    # IPVS state goes after the iptables rules that match on its ipsets.
    if os.path.exists("/proc/net/ip_vs") or os.path.exists(f"/sys/class/net/{DUMMY_INTERFACE}"):
        try:
            with IPVSKernel() as kernel:
                # NodePort virtual servers sit on the node's own addresses: ours too.
                kernel.set_node_port_addresses(kernel.local_addresses())
                kernel.cleanup()
            log.info("cleaned up", extra={"dataplane": "ipvs"})
        except Exception as err:  # noqa: BLE001 - reported, and the exit code says so
            log.error("IPVS cleanup failed", extra={"error": str(err)})
            failed = True
    if failed:
        sys.exit(1)


@main.command()
def version() -> None:
    """Print pyproxy's version."""
    try:
        click.echo(metadata.version("pyproxy"))
    except metadata.PackageNotFoundError:
        click.echo("unknown")


if __name__ == "__main__":
    main()
