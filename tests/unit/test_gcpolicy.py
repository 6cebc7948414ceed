"""The collector is off during the first full sync, and what it built is frozen after."""

from __future__ import annotations

import gc
import subprocess
from collections.abc import Iterator, Sequence

import pytest

from pyproxy import gcpolicy
from pyproxy.iptables.plan import PlanContext
from pyproxy.iptables.restore import Backend, IPTables
from pyproxy.iptables.sync import IPTablesDataplane
from pyproxy.model import NodeInfo
from pyproxy.reconciler import Reconciler
from pyproxy.tracker import ChangeTracker, Snapshot


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if no sync had run yet; the collector's state put back after."""
    monkeypatch.setattr(gcpolicy, "_settled", False)
    was_enabled = gc.isenabled()
    gc.enable()
    gc.unfreeze()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


def test_first_sync_runs_without_collection_and_is_frozen_after() -> None:
    with gcpolicy.first_full_sync():
        assert not gc.isenabled()
        kept = [[] for _ in range(10)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(kept)


def test_later_syncs_change_nothing() -> None:
    with gcpolicy.first_full_sync():
        pass
    gc.unfreeze()
    with gcpolicy.first_full_sync():
        assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_failed_sync_freezes_nothing_and_the_next_one_still_counts() -> None:
    with pytest.raises(RuntimeError), gcpolicy.first_full_sync():
        raise RuntimeError("restore failed")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
    with gcpolicy.first_full_sync():
        assert not gc.isenabled()
    assert gc.get_freeze_count() > 0


def test_nested_the_outer_one_decides() -> None:
    with gcpolicy.first_full_sync():
        with gcpolicy.first_full_sync():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner one did not turn it back on, nor freeze
        assert gc.get_freeze_count() == 0
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0


def test_a_collector_turned_off_by_someone_else_stays_off() -> None:
    gc.disable()
    with gcpolicy.first_full_sync():
        pass
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0


class _Dataplane:
    """Records whether the collector ran during each sync; fails the first one."""

    def __init__(self) -> None:
        self.collecting: list[bool] = []

    def sync(self, snapshot: Snapshot, *, full: bool) -> None:
        self.collecting.append(gc.isenabled())
        if len(self.collecting) == 1:
            raise RuntimeError("iptables-restore failed")


def test_the_reconciler_wraps_syncs_until_one_succeeds() -> None:
    dp = _Dataplane()
    rec = Reconciler(ChangeTracker("node-a"), dp, clock=lambda: 0.0)
    with pytest.raises(RuntimeError):
        rec.sync_once()
    rec.sync_once()
    rec.sync_once(full=True)
    assert dp.collecting == [False, False, True]
    assert gc.get_freeze_count() > 0


def test_the_iptables_dataplane_wraps_its_own_syncs() -> None:
    """The benchmark, and anyone else, may call the dataplane without a reconciler."""
    collecting: list[bool] = []

    def runner(argv: Sequence[str], stdin: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        collecting.append(gc.isenabled())
        return subprocess.CompletedProcess(list(argv), 0, "", "")

    ctx = PlanContext(NodeInfo("node-a"), localhost_node_ports=False)  # no sysctl here
    dp = IPTablesDataplane(IPTables(Backend.LEGACY, runner=runner), ctx)
    empty = Snapshot({}, {}, frozenset(), frozenset())
    dp.sync(empty, full=True)
    first = len(collecting)
    dp.sync(empty, full=True)
    assert first and not any(collecting[:first])
    assert all(collecting[first:])
    assert gc.get_freeze_count() > 0
