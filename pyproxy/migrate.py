"""`pyproxy cleanup --kube-proxy`: remove what an upstream kube-proxy left on a node.

So that a node can move from kube-proxy to pyproxy without a reboot, and
without touching anything else: not the kubelet's chains (KUBE-FIREWALL,
KUBE-KUBELET-CANARY, KUBE-MARK-DROP, KUBE-MARK-MASQ, KUBE-IPTABLES-HINT),
not a CNI's or Docker's rules, not pyproxy's own.

iptables (both backends, IPv4 and IPv6, every table: kube-proxy writes filter,
nat and mangle): the chains kube-proxy creates in either mode, by the names and
prefixes its CleanupLeftovers knows, and every rule elsewhere that jumps into
one of them, deleted in one iptables-restore transaction per table.

IPVS, after the iptables rules (the kernel refuses to destroy an ipset that a
rule still uses):

- its virtual servers: those on an address bound on ``kube-ipvs0`` (unless
  pyproxy's dummy interface holds the address too: then the virtual server is
  pyproxy's as well), and NodePort ones (a node address, a port in
  30000-32767) unless pyproxy runs in IPVS mode and has that node port in
  its own node-port sets, where they are pyproxy's;
- its ipsets (upstream's KUBE-* names, and KUBE-6-* for IPv6);
- the ``kube-ipvs0`` dummy interface, which takes its addresses with it.
"""

from __future__ import annotations

import errno
import logging
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pyproxy.iptables.restore import Backend, IPTables, IPTablesError
from pyproxy.iptables.ruleset import (
    KUBE_PROXY_CHAINS,
    RestorePayload,
    Tables,
    parse_tables,
    removal_section,
)
from pyproxy.ipvs.diff import DelService, KernelSet, Operation
from pyproxy.ipvs.netlink import KUBE_PROXY_DUMMY, IPVSKernel
from pyproxy.ipvs.plan import DUMMY_INTERFACE, IPSet, VirtualServerKey
from pyproxy.model import Protocol

log = logging.getLogger(__name__)

# Chain names and prefixes: upstream's list (ruleset.KUBE_PROXY_CHAINS) plus the IPVS
# mode's source-ranges firewall chain (pkg/proxy/ipvs/proxier.go).
CHAIN_PREFIXES = (*KUBE_PROXY_CHAINS, "KUBE-SOURCE-RANGES-FIREWALL")
# Never kube-proxy's, whatever a prefix above might match: the kubelet owns these.
KUBELET_CHAINS = frozenset({"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP",
                            "KUBE-MARK-MASQ", "KUBE-IPTABLES-HINT"})
# kube-proxy's ipsets (pkg/proxy/ipvs/ipset.go), as prefixes: KUBE-LOAD-BALANCER covers
# -LOCAL, -FW, -SOURCE-IP and -SOURCE-CIDR, KUBE-NODE-PORT- every node-port set. IPv6
# sets are named KUBE-6-*.
_SET_NAMES = ("CLUSTER-IP", "LOOP-BACK", "EXTERNAL-IP", "LOAD-BALANCER", "NODE-PORT-",
              "HEALTH-CHECK-NODE-PORT", "IPVS-IPS")
SET_PREFIXES = tuple(f"KUBE-{n}" for n in _SET_NAMES) + tuple(f"KUBE-6-{n}" for n in _SET_NAMES)

_ABSENT = (errno.ENOENT, errno.EINVAL, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT)


def is_kube_proxy_chain(name: str) -> bool:
    return name not in KUBELET_CHAINS and name.startswith(CHAIN_PREFIXES)


# -------------------------------------------------------------------------- iptables




def _target(rule: str) -> str | None:
    try:
        args = shlex.split(rule)
    except ValueError:
        return None
    for flag in ("-j", "--jump", "-g", "--goto"):
        if flag in args:
            i = args.index(flag)
            if i + 1 < len(args):
                return args[i + 1]
    return None


def render_kube_proxy_cleanup(tables: Tables) -> RestorePayload:
    """One transaction per table: flush kube-proxy's chains, delete the jumps into them
    from every other chain, then delete the chains."""
    payload = RestorePayload()
    for table in sorted(tables):
        chains = tables[table]
        doomed = sorted(name for name in chains if is_kube_proxy_chain(name))
        jumps = [(chain, rule)
                 for chain, rules in chains.items() if not is_kube_proxy_chain(chain)
                 for rule in rules
                 if (target := _target(rule)) is not None and is_kube_proxy_chain(target)]
        removal_section(payload, table, doomed, jumps)
    return payload


def save_all(ipt: IPTables) -> str:
    """iptables-save of every table that exists (without ``-t``, which would create one)."""
    tool = f"{'ip6' if ipt.ipv6 else 'ip'}tables-{ipt.backend}-save"
    proc = ipt.runner([tool])
    if proc.returncode != 0:
        raise IPTablesError(f"{tool} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class CleanupReport:
    iptables_lines: dict[str, int] = field(default_factory=dict)  # "iptables-nft" -> lines
    virtual_servers: list[VirtualServerKey] = field(default_factory=list)
    ipsets: list[str] = field(default_factory=list)
    dummy_removed: bool = False
    errors: list[str] = field(default_factory=list)


def cleanup_iptables(report: CleanupReport, runner_for: Mapping[str, IPTables] | None = None
                     ) -> None:
    """Every backend and family that works here; one that is missing holds nothing."""
    tools = runner_for or {
        f"{'ip6' if v6 else 'ip'}tables-{b}": IPTables(b, ipv6=v6)
        for b in Backend for v6 in (False, True)}
    for name, ipt in tools.items():
        try:
            text = save_all(ipt)
        except (FileNotFoundError, IPTablesError) as err:
            log.info("iptables backend unavailable", extra={"tool": name, "reason": str(err)})
            continue
        payload = render_kube_proxy_cleanup(parse_tables(text))
        if not payload:
            continue
        try:
            ipt.restore(payload)
        except IPTablesError as err:
            report.errors.append(f"{name}: {err}")
            log.error("kube-proxy cleanup failed", extra={"tool": name, "error": str(err)})
            continue
        report.iptables_lines[name] = payload.line_count
        log.info("removed kube-proxy's iptables rules",
                 extra={"tool": name, "lines": payload.line_count})


# -------------------------------------------------------------------------- IPVS


_NODE_PORT_SETS = {
    Protocol.TCP: IPSet.NODE_PORT_TCP,
    Protocol.UDP: IPSet.NODE_PORT_UDP,
    Protocol.SCTP: IPSet.NODE_PORT_SCTP,
}


def pyproxy_node_port(key: VirtualServerKey, sets: Mapping[str, KernelSet]) -> bool:
    """Whether pyproxy's own node-port ipsets list this NodePort virtual server."""
    members = sets.get(str(_NODE_PORT_SETS[key.protocol]))
    if members is None:
        return False
    for entry in members.members:
        if entry.port == key.port and (key.protocol is not Protocol.SCTP
                                       or entry.ip == key.address):
            return True
    return False


def kube_proxy_node_ports(candidates: Iterable[VirtualServerKey], kube_bound: set[str],
                          pyproxy_sets: Mapping[str, KernelSet]) -> list[VirtualServerKey]:
    """Of the virtual servers on node addresses with a port in the NodePort range, those
    that are kube-proxy's: not listed in pyproxy's own node-port sets (which exist only
    while pyproxy runs in IPVS mode, and then cover every NodePort it programs)."""
    return [key for key in sorted(candidates)
            if key.address not in kube_bound and not pyproxy_node_port(key, pyproxy_sets)]


def _link_exists(name: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def cleanup_ipvs(report: CleanupReport) -> None:
    """kube-proxy's virtual servers, ipsets and kube-ipvs0 in this network namespace;
    never pyproxy's or anyone else's."""
    try:
        with IPVSKernel(DUMMY_INTERFACE) as ours:
            our_addresses: set[str] = set()
            our_sets: dict[str, KernelSet] = {}
            try:
                state = ours.read()
                our_addresses, our_sets = state.addresses, state.ipsets
            except OSError as err:
                if err.errno not in _ABSENT:
                    raise
            # The node's addresses: all but those on either dummy interface.
            node = set(ours.local_addresses())
        # A virtual server whose address pyproxy's dummy holds too is pyproxy's as well.
        shared = [f"{a}/{128 if ':' in a else 32}" for a in our_addresses]
        had_dummy = _link_exists(KUBE_PROXY_DUMMY)
        with IPVSKernel(KUBE_PROXY_DUMMY, set_prefix=SET_PREFIXES, exclude_cidrs=shared,
                        node_port_addresses=node) as kube:
            try:
                kstate = kube.read()
            except OSError as err:
                if err.errno not in _ABSENT:
                    raise
            else:
                node_ports = kube_proxy_node_ports(kstate.virtual_servers, kstate.addresses,
                                                   our_sets)
                ops: list[Operation] = [DelService(k) for k in node_ports]
                if ops:
                    kube.apply(ops)
                report.virtual_servers = sorted(
                    [*node_ports, *(k for k in kstate.virtual_servers
                                    if k.address in kstate.addresses)])
                report.ipsets = sorted(kstate.ipsets)
        # The rest is decided by the address alone (no node-port addresses any more):
        # virtual servers on kube-ipvs0's addresses, the KUBE-* sets, kube-ipvs0 itself.
        with IPVSKernel(KUBE_PROXY_DUMMY, set_prefix=SET_PREFIXES,
                        exclude_cidrs=shared) as rest:
            rest.cleanup()
        report.dummy_removed = had_dummy
    except Exception as err:  # noqa: BLE001 - reported; the exit code says so
        report.errors.append(f"IPVS: {err}")
        log.error("kube-proxy IPVS cleanup failed", extra={"error": str(err)})
        return
    log.info("removed kube-proxy's IPVS state",
             extra={"virtual_servers": len(report.virtual_servers),
                    "ipsets": len(report.ipsets), "dummy_removed": report.dummy_removed})


def cleanup_kube_proxy() -> CleanupReport:
    """iptables first: the kernel refuses to destroy an ipset a rule still uses."""
    report = CleanupReport()
    cleanup_iptables(report)
    cleanup_ipvs(report)
    return report
