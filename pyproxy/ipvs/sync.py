"""The IPVS dataplane: plan, diff against what the kernel holds, apply. Thin glue, no policy.

A full sync reads pyproxy's whole IPVS state back (virtual servers, dummy
addresses, ipsets) and repairs whatever differs; a partial sync reads back only
the virtual servers the change concerns (plus any still draining). The ipsets
and virtual servers are applied before the iptables rules that match on them,
and the iptables part goes through the same diff-then-restore path as iptables
mode, so a switch from iptables mode rewrites the shared PYPROXY- chains and
drops iptables mode's per-service chains in one transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from pyproxy import sysctl
from pyproxy.iptables.restore import IPTables
from pyproxy.iptables.ruleset import Ruleset, Table, parse_save, render
from pyproxy.ipvs.diff import Scope, apply_to, diff, pending
from pyproxy.ipvs.netlink import IPVSKernel
from pyproxy.ipvs.plan import (
    IPVSContext,
    IPVSPlan,
    VirtualServerKey,
    node_port_addresses,
    plan,
)
from pyproxy.model import IPFamily
from pyproxy.tracker import Snapshot

log = logging.getLogger(__name__)

# Upstream's IPVS-mode sysctls (pkg/proxy/ipvs/proxier.go), each written only when it differs.
SYSCTLS = {
    "net.ipv4.ip_forward": 1,
    "net.ipv4.conf.all.route_localnet": 1,
    "net.ipv4.vs.conntrack": 1,  # so iptables SNAT/MASQUERADE sees IPVS traffic
    "net.ipv4.vs.conn_reuse_mode": 0,
    "net.ipv4.vs.expire_nodest_conn": 1,  # drop connections to deleted real servers at once
    "net.ipv4.vs.expire_quiescent_template": 1,  # and persistence to weight-0 ones
}
STRICT_ARP = {"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2}


@dataclass
class IPVSSyncResult:
    full: bool
    lines_written: int  # iptables lines plus IPVS/ipset/address operations
    plan: IPVSPlan
    operations: int
    plan_seconds: float
    apply_seconds: float

    @property
    def rule_counts(self) -> dict[str, int]:
        return {str(t): self.plan.ruleset.rule_count(t) for t in (Table.FILTER, Table.NAT)}


@dataclass
class IPVSDataplane:
    iptables: IPTables
    kernel: IPVSKernel
    ctx: IPVSContext
    strict_arp: bool = False
    timeouts: tuple[int, int, int] = (0, 0, 0)  # tcp, tcpfin, udp seconds; 0 keeps the kernel's
    last: IPVSPlan | None = field(default=None, init=False)
    draining: frozenset[VirtualServerKey] = field(default=frozenset(), init=False)
    applied: Ruleset | None = field(default=None, init=False)

    def set_context(self, ctx: IPVSContext) -> None:
        self.ctx = ctx
        self.last = None
        self.applied = None

    def _prepare(self) -> None:
        """Once per full sync: sysctls, the dummy interface, and where NodePorts listen."""
        for name, value in SYSCTLS.items():
            sysctl.ensure(name, value)
        if self.strict_arp:
            for name, value in STRICT_ARP.items():
                sysctl.ensure(name, value)
        self.kernel.ensure_dummy()
        self.kernel.set_timeouts(*self.timeouts)
        addresses = node_port_addresses(self.kernel.local_addresses())
        if addresses != self.ctx.node_port_addresses:
            self.ctx = replace(self.ctx, node_port_addresses=addresses)
            self.kernel.set_node_port_addresses(str(a) for a in addresses)

    def sync(self, snapshot: Snapshot, *, full: bool) -> IPVSSyncResult:
        full = full or self.last is None or self.applied is None
        if full:
            self._prepare()
        t0 = time.perf_counter()
        desired = plan(snapshot.services, snapshot.endpoints, self.ctx)
        t1 = time.perf_counter()
        try:
            if full:
                state = self.kernel.read()
            else:
                assert self.last is not None
                # What changed, plus real servers still draining from earlier syncs.
                scope = Scope.between(self.last, desired) | Scope(self.draining)
                state = self.kernel.read(scope)
            ops = diff(desired, state, ipv6=self.ctx.family is IPFamily.IPv6)
            self.kernel.apply(ops)
            self.draining = pending(desired, apply_to(state, ops))
            existing = parse_save(self.iptables.save()) if full else self.applied
            assert existing is not None
            payload = render(desired.ruleset, existing, only=())
            self.iptables.restore(payload)
        except Exception:
            self.last = self.applied = None  # unknown kernel state: the next sync is full
            raise
        self.last, self.applied = desired, desired.ruleset
        t2 = time.perf_counter()
        log.debug("ipvs sync", extra={"full": full, "operations": len(ops),
                                      "lines": payload.line_count})
        for op in ops[:50]:
            log.debug("ipvs operation", extra={"operation": repr(op)})
        for line in payload.lines[:50]:
            log.debug("iptables line", extra={"line": line})
        return IPVSSyncResult(full, payload.line_count + len(ops), desired, len(ops),
                              t1 - t0, t2 - t1)

    def cleanup(self) -> None:
        """Remove pyproxy's IPVS state (virtual servers, ipsets, dummy interface).

        The iptables rules that match on the ipsets must be gone first (the
        kernel refuses to destroy a set in use): callers clean those up, or a
        switch to iptables mode has already replaced them.
        """
        self.kernel.cleanup()
        self.last = self.applied = None
