"""The sync loop's timing policy, with a fake clock and a fake dataplane (no kernel here)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from pyproxy.reconciler import Reconciler
from pyproxy.tracker import ChangeTracker, Snapshot
from tests.kernel import cluster


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordingDataplane:
    syncs: list[tuple[bool, frozenset[tuple[str, str]]]] = field(default_factory=list)
    fail: int = 0

    def sync(self, snapshot: Snapshot, *, full: bool) -> Any:
        self.syncs.append((full, snapshot.changed))
        if self.fail:
            self.fail -= 1
            raise RuntimeError("iptables-restore failed")
        return {"full": full}


@dataclass
class Observer:
    events: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def change_queued(self, at: float) -> None:
        self.events.append("queued")

    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None:
        self.events.append("full" if full else "partial")
        self.latencies.extend(finished - t for t in change_times)

    def sync_failed(self, error: BaseException, *, full: bool) -> None:
        self.events.append("failed")


def make() -> tuple[Reconciler, RecordingDataplane, FakeClock, Observer]:
    clock = FakeClock()
    dp = RecordingDataplane()
    obs = Observer()
    tracker = ChangeTracker(cluster.NODE)
    rec = Reconciler(tracker, dp, min_sync_period=1.0, sync_period=30.0, clock=clock,
                     observers=[obs])
    return rec, dp, clock, obs


def feed(rec: Reconciler, name: str = "web") -> None:
    svc = next(o for o in cluster.objects() if o["metadata"]["name"] == name)
    with rec.lock:
        rec.tracker.set_service(svc)
    rec.changed()


def test_first_sync_is_full_then_partial_until_sync_period() -> None:
    rec, dp, clock, _ = make()
    assert rec._due(clock()) is None
    rec.sync_once()
    feed(rec)
    clock.now += 0.5
    assert rec._due(clock()) == pytest.approx(0.5)  # minSyncPeriod holds the change back
    clock.now += 0.5
    assert rec._due(clock()) is None
    rec.sync_once()
    assert [full for full, _ in dp.syncs] == [True, False]
    assert dp.syncs[1][1] == {("t", "web")}
    clock.now += 30
    assert rec._due(clock()) is None  # syncPeriod elapsed: a full sync is due
    rec.sync_once()
    assert dp.syncs[-1][0] is True


def test_nothing_due_waits_for_the_next_full_sync() -> None:
    rec, _, clock, _ = make()
    rec.sync_once()
    clock.now += 10
    assert rec._due(clock()) == pytest.approx(20)


def test_failure_forces_full_sync_with_backoff_and_keeps_changes() -> None:
    rec, dp, clock, obs = make()
    rec.sync_once()
    feed(rec)
    clock.now += 1
    dp.fail = 2
    with pytest.raises(RuntimeError):
        rec.sync_once()
    first_retry = rec._due(clock())
    assert first_retry is not None and first_retry >= 1.0
    clock.now += first_retry
    with pytest.raises(RuntimeError):
        rec.sync_once()
    second_retry = rec._due(clock())
    assert second_retry is not None and second_retry > first_retry  # exponential
    clock.now += second_retry
    rec.sync_once()
    assert [full for full, _ in dp.syncs] == [True, False, True, True]
    assert obs.events.count("failed") == 2
    # The change queued before the failures is reported with the successful sync.
    assert len(obs.latencies) == 1 and obs.latencies[0] >= 1.0


def test_flapping_change_collapses() -> None:
    rec, dp, clock, _ = make()
    feed(rec)
    rec.sync_once()
    svc = next(o for o in cluster.objects() if o["metadata"]["name"] == "web")
    with rec.lock:
        rec.tracker.delete_service("t", "web")
        rec.tracker.set_service(svc)
    clock.now += 1
    rec.sync_once(full=False)
    assert dp.syncs[-1][1] == frozenset()


def test_set_periods_takes_effect() -> None:
    rec, _, clock, _ = make()
    rec.sync_once()
    rec.set_periods(0.0, 5.0)
    clock.now += 5
    assert rec._due(clock()) is None


def test_run_loop_syncs_changes_and_stops() -> None:
    tracker = ChangeTracker(cluster.NODE)
    dp = RecordingDataplane()
    rec = Reconciler(tracker, dp, min_sync_period=0.0, sync_period=30.0)
    stop = threading.Event()
    t = threading.Thread(target=rec.run, args=(stop,))
    t.start()
    try:
        feed(rec)
        for _ in range(200):
            if any(("t", "web") in changed for _, changed in dp.syncs):
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        rec._wake.set()
        t.join(5)
    assert not t.is_alive()
    assert any(("t", "web") in changed for _, changed in dp.syncs)


def test_not_ready_means_no_sync() -> None:
    tracker = ChangeTracker(cluster.NODE)
    dp = RecordingDataplane()
    ready = threading.Event()
    rec = Reconciler(tracker, dp, min_sync_period=0.0, ready=ready.is_set)
    stop = threading.Event()
    t = threading.Thread(target=rec.run, args=(stop,))
    t.start()
    try:
        threading.Event().wait(0.3)
        assert dp.syncs == []  # sources have not listed yet: program nothing
        ready.set()
        for _ in range(200):
            if dp.syncs:
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        t.join(5)
    assert dp.syncs and dp.syncs[0][0] is True


def test_changes_waiting_when_a_periodic_resync_is_due_go_first() -> None:
    # A periodic resync reads the whole table; a change must not wait behind it.
    rec, dp, clock, _ = make()
    rec.sync_once()
    clock.now += 30
    feed(rec)
    rec.sync_once()
    assert dp.syncs[-1] == (False, frozenset({("t", "web")}))
    clock.now += 1
    assert rec._due(clock()) is None
    rec.sync_once()
    assert dp.syncs[-1][0] is True
