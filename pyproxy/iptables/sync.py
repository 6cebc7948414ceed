"""The iptables dataplane: plan, diff against the kernel, restore. Thin glue, no policy.

A full sync reads what the kernel holds (iptables-save) and rewrites only the
chains that differ from the plan, so it repairs drift and, when nothing
drifted, writes nothing. A partial sync diffs against what this process last
wrote, so it never reads the kernel. Either way one transaction carries a
service's chains together with the dispatch rules that point at them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pyproxy import sysctl
from pyproxy.iptables.plan import Plan, PlanContext, Planner
from pyproxy.iptables.restore import IPTables
from pyproxy.iptables.ruleset import Ruleset, Table, parse_save, render, render_cleanup
from pyproxy.model import IPFamily
from pyproxy.tracker import Snapshot

log = logging.getLogger(__name__)


@dataclass
class SyncResult:
    full: bool
    lines_written: int
    plan: Plan
    plan_seconds: float
    apply_seconds: float


@dataclass
class IPTablesDataplane:
    iptables: IPTables
    ctx: PlanContext
    planner: Planner = field(init=False)
    applied: Ruleset | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.planner = Planner(self.ctx)

    def set_context(self, ctx: PlanContext) -> None:
        """New node facts or masquerade settings: everything must be re-planned."""
        self.ctx = ctx
        self.planner = Planner(ctx)
        self.applied = None

    def sync(self, snapshot: Snapshot, *, full: bool) -> SyncResult:
        if full and self.ctx.localhost_node_ports and self.ctx.family is IPFamily.IPv4:
            # NodePorts on 127.0.0.1 are DNATed off the host: allowed only with route_localnet.
            sysctl.ensure("net.ipv4.conf.all.route_localnet", 1)
        t0 = time.perf_counter()
        planned = self.planner.plan(snapshot.services, snapshot.endpoints)
        t1 = time.perf_counter()
        full = full or self.applied is None
        existing = parse_save(self.iptables.save()) if full else self.applied
        assert existing is not None
        payload = render(planned.ruleset, existing, only=())
        if payload:
            try:
                self.iptables.restore(payload)
            except Exception:
                self.applied = None  # unknown kernel state: the next sync must be full
                raise
        self.applied = planned.ruleset
        t2 = time.perf_counter()
        log.debug("iptables sync", extra={"full": full, "lines": len(payload.lines)})
        return SyncResult(full, len(payload.lines), planned, t1 - t0, t2 - t1)

    def rule_counts(self) -> dict[Table, int]:
        rs = self.applied or Ruleset()
        return {t: rs.rule_count(t) for t in (Table.FILTER, Table.NAT)}

    def cleanup(self) -> int:
        """Remove every chain and jump rule pyproxy owns; returns the lines written."""
        payload = render_cleanup(parse_save(self.iptables.save()))
        self.iptables.restore(payload)
        self.applied = None
        return len(payload.lines)
