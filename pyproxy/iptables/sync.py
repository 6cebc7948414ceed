"""The iptables dataplane: plan, diff against the kernel, restore. Thin glue, no policy.

A full sync reads what the kernel holds (iptables-save) and rewrites only the
chains that differ from the plan, so it repairs drift and, when nothing
drifted, writes nothing. A partial sync diffs against what this process last
wrote, so it never reads the kernel. Either way one transaction carries a
service's chains together with the dispatch rules that point at them.

On nf_tables a full sync skips the read when the kernel's generation id
proves that no commit but pyproxy's own happened since it last read
(pyproxy.iptables.generation): iptables-nft-save of 10,000 services takes
seconds, the proof about a millisecond. Anyone else's commit, to any table,
makes the next full sync read again.

After a successful write, stale UDP/SCTP conntrack entries are deleted
(pyproxy.conntrack), as kube-proxy does; a failure there is logged and never
fails the sync.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyproxy import gcpolicy, sysctl
from pyproxy.conntrack import StaleFlowCleaner
from pyproxy.iptables.generation import commits
from pyproxy.iptables.plan import Plan, PlanContext, Planner
from pyproxy.iptables.restore import Backend, IPTables
from pyproxy.iptables.ruleset import (
    RestorePayload,
    Ruleset,
    Table,
    parse_save,
    pending,
    render_cleanup,
)
from pyproxy.model import IPFamily
from pyproxy.tracker import Snapshot

log = logging.getLogger(__name__)

# Below this many lines one nf_tables transaction is cheaper than several; above it,
# transactions are split by dispatch shard (see Pending.transactions).
SINGLE_TRANSACTION_LINES = 5000


@dataclass
class SyncResult:
    full: bool
    lines_written: int
    plan: Plan
    plan_seconds: float
    apply_seconds: float
    transactions: int = 1
    kernel_read: bool = False  # a full sync that read the kernel (not proven unchanged)
    conntrack_deleted: int = 0  # stale UDP/SCTP entries deleted after the write
    conntrack_failed: bool = False  # the cleanup raised (logged; the rules were written)


@dataclass
class IPTablesDataplane:
    iptables: IPTables
    ctx: PlanContext
    planner: Planner = field(init=False)
    applied: Ruleset | None = field(default=None, init=False)
    # The nf_tables generation at which the kernel is known to hold ``applied``.
    verified_generation: int | None = field(default=None, init=False)
    # Its own copy of the UDP state last applied (the tracker's maps are live).
    conntrack: StaleFlowCleaner | None = None

    def __post_init__(self) -> None:
        self.planner = Planner(self.ctx)
        if self.conntrack is None:
            self.conntrack = StaleFlowCleaner(self.ctx.node, self.ctx.family)

    def set_context(self, ctx: PlanContext) -> None:
        """New node facts or masquerade settings: everything must be re-planned."""
        self.ctx = ctx
        self.planner = Planner(ctx)
        self.applied = None
        self.verified_generation = None
        if self.conntrack is not None:
            self.conntrack.set_node(ctx.node)

    def sync(self, snapshot: Snapshot, *, full: bool) -> SyncResult:
        # The first full sync builds most of what the process keeps (pyproxy.gcpolicy).
        with gcpolicy.first_full_sync():
            return self._sync(snapshot, full=full)

    def _sync(self, snapshot: Snapshot, *, full: bool) -> SyncResult:
        if full and self.ctx.localhost_node_ports and self.ctx.family is IPFamily.IPv4:
            # NodePorts on 127.0.0.1 are DNATed off the host: allowed only with route_localnet.
            sysctl.ensure("net.ipv4.conf.all.route_localnet", 1)
        full = full or self.applied is None
        t0 = time.perf_counter()
        planned = self.planner.plan(snapshot.services, snapshot.endpoints,
                                    None if full else snapshot.changed_ports)
        t1 = time.perf_counter()
        generation = self.iptables.generation()
        # The kernel holds ``applied`` unless someone committed since pyproxy's last write.
        unchanged = generation is not None and generation == self.verified_generation
        kernel_read = full and not unchanged
        if kernel_read:
            existing = parse_save(self.iptables.save_lines(), like=planned.ruleset)
            touched = None
        elif full:
            assert self.applied is not None
            existing, touched = self.applied, None
        else:
            assert self.applied is not None
            existing, touched = self.applied, planned.touched
        todo = pending(planned.ruleset, existing, only=(), chains=touched)
        # legacy rewrites the whole table on every restore, so one transaction is cheapest
        # there (rendered as iptables-restore reads it); nf_tables pays for large
        # transactions, so big ones are split by shard, rendered one at a time.
        payloads: Iterable[RestorePayload]
        if self.iptables.backend is not Backend.NFT:
            payloads = [todo.stream()]
        elif todo.line_count > SINGLE_TRANSACTION_LINES:
            payloads = todo.transactions()
        else:
            payloads = [todo.render()]
        lines = transactions = ours = 0
        try:
            for payload in payloads:
                self.iptables.restore(payload)
                lines += payload.line_count
                transactions += 1
                if generation is not None:  # nf_tables: count what moves the generation
                    ours += commits(payload.pieces)
        except Exception:
            self.applied = None  # unknown kernel state: the next sync must be full
            self.verified_generation = None
            if self.conntrack is not None:
                self.conntrack.forget()  # and the next conntrack cleanup must reconcile
            raise
        self._remember(planned.ruleset, touched)
        self.verified_generation = self._verify(generation, kernel_read or unchanged, ours)
        t2 = time.perf_counter()
        deleted, failed = self._delete_stale_flows(snapshot, full)
        log.debug("iptables sync", extra={"full": full, "lines": lines,
                                          "transactions": transactions})
        return SyncResult(full, lines, planned, t1 - t0, t2 - t1, transactions,
                          kernel_read=kernel_read,
                          conntrack_deleted=deleted, conntrack_failed=failed)

    def _verify(self, before: int | None, known: bool, ours: int) -> int | None:
        """The generation at which the kernel now holds ``applied``, if that is proven.

        Proven when the kernel held ``applied``'s predecessor at ``before`` (it was
        just read, or proven unchanged) and the generation moved by exactly our own
        commits since: any other commit in between makes the count differ.
        """
        if before is None or not known:  # legacy has no generation: skip counting
            return None
        after = self.iptables.generation()
        return after if after is not None and after == before + ours else None

    def _remember(self, desired: Ruleset, touched: frozenset[tuple[Table, str]] | None) -> None:
        """What the kernel now holds, for the next partial sync: updated in place."""
        if touched is None or self.applied is None:
            self.applied = desired.copy()
            return
        for table, chain in touched:
            rules = desired.table(table).get(chain)
            if rules is None:
                self.applied.table(table).pop(chain, None)
            else:
                self.applied.table(table)[chain] = rules

    def _delete_stale_flows(self, snapshot: Snapshot, full: bool) -> tuple[int, bool]:
        """After the rules are in place, never before; never fails the sync."""
        if self.conntrack is None:
            return 0, False
        try:
            changed = None if full else snapshot.changed_ports
            return self.conntrack.after_sync(snapshot.services, snapshot.endpoints,
                                             changed).deleted, False
        except Exception as err:
            log.warning("could not delete stale conntrack entries; will reconcile next sync",
                        extra={"error": f"{type(err).__name__}: {err}"})
            return 0, True

    def rule_counts(self) -> dict[Table, int]:
        rs = self.applied or Ruleset()
        return {t: rs.rule_count(t) for t in (Table.FILTER, Table.NAT)}

    def cleanup(self) -> int:
        """Remove every chain and jump rule pyproxy owns; returns the lines written."""
        payload = render_cleanup(parse_save(self.iptables.save()))
        self.iptables.restore(payload)
        self.applied = None
        self.verified_generation = None
        return payload.line_count
