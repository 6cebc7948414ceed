"""The sync loop: owns timing, nothing else.

Sources call `changed()` whenever the tracker took a change. The loop batches
changes so that syncs start at most once per minSyncPeriod, runs a full sync
every syncPeriod (which repairs drift), partial syncs in between, and after a
failed sync retries with backoff and makes the next sync a full one — the
policy kube-proxy's BoundedFrequencyRunner and `syncProxyRules` implement.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyproxy import gcpolicy
from pyproxy.tracker import ChangeTracker, Snapshot

log = logging.getLogger(__name__)


class Dataplane(Protocol):
    def sync(self, snapshot: Snapshot, *, full: bool) -> Any: ...


class SyncObserver(Protocol):
    """Health and metrics hang off these calls; the loop never knows who listens."""

    def change_queued(self, at: float) -> None: ...
    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None: ...
    def sync_failed(self, error: BaseException, *, full: bool) -> None: ...


class QuietObserver:
    """An observer that ignores what it does not override."""

    def change_queued(self, at: float) -> None:
        return None

    def sync_succeeded(self, result: Any, *, full: bool, started: float, finished: float,
                       change_times: list[float]) -> None:
        return None

    def sync_failed(self, error: BaseException, *, full: bool) -> None:
        return None


@dataclass
class Reconciler:
    tracker: ChangeTracker
    dataplane: Dataplane
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    max_retry_delay: float = 30.0
    ready: Callable[[], bool] = lambda: True
    clock: Callable[[], float] = time.monotonic
    observers: list[SyncObserver] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _need_full: bool = True
    _last_start: float = float("-inf")
    _next_full: float = 0.0
    _retry_at: float | None = None
    _failures: int = 0
    applied_once: bool = False  # a sync has succeeded: the kernel holds our rules
    _change_times: list[float] = field(default_factory=list)

    # -- called by sources (any thread) ---------------------------------------

    def changed(self) -> None:
        """A source fed the tracker a change; sync soon (under the rate limit)."""
        now = self.clock()
        with self.lock:
            self._change_times.append(now)
        for obs in self.observers:
            obs.change_queued(now)
        self._wake.set()

    def request_full_sync(self) -> None:
        with self.lock:
            self._need_full = True
        self._wake.set()

    def set_periods(self, min_sync_period: float, sync_period: float) -> None:
        with self.lock:
            self.min_sync_period, self.sync_period = min_sync_period, sync_period
            self._next_full = min(self._next_full, self._last_start + sync_period)
        self._wake.set()

    # -- the loop ------------------------------------------------------------

    def sync_once(self, *, full: bool | None = None) -> Any:
        """One sync now; raises what the dataplane raised (after bookkeeping)."""
        with self.lock:
            now = self.clock()
            if full is None:
                # A periodic resync reads the whole kernel table (seconds at 10,000
                # services): changes waiting for it go first, in a quick partial sync.
                waiting = bool(self._change_times) or self.tracker.pending
                full = self._need_full or (now >= self._next_full and not waiting)
            self._last_start = now
            changes, self._change_times = self._change_times, []
            snapshot = self.tracker.checkout()
            try:
                # The first full sync builds what the process keeps: no automatic
                # collection during it, frozen after (pyproxy.gcpolicy). A dataplane
                # that does the same inside is fine: the inner one does nothing.
                with gcpolicy.first_full_sync():
                    result = self.dataplane.sync(snapshot, full=full)
            except Exception as err:
                self._need_full = True
                self._failures += 1
                self._change_times = changes + self._change_times
                delay = min(self.max_retry_delay,
                            max(self.min_sync_period, 0.5) * 2 ** (self._failures - 1))
                self._retry_at = now + delay
                log.error("sync failed; retrying with a full sync",
                          extra={"full": full, "retry_in": round(delay, 2), "error": str(err)})
                for obs in self.observers:
                    obs.sync_failed(err, full=full)
                raise
            finished = self.clock()
            self._failures = 0
            self._retry_at = None
            self.applied_once = True
            if full:
                self._need_full = False
                self._next_full = now + self.sync_period
        for obs in self.observers:
            obs.sync_succeeded(result, full=full, started=now, finished=finished,
                               change_times=changes)
        return result

    def _due(self, now: float) -> float | None:
        """Seconds until the next sync may run, or None to sync now."""
        with self.lock:
            earliest = self._last_start + self.min_sync_period
            if self._retry_at is not None:
                earliest = max(earliest, self._retry_at)
                wanted = True
            else:
                wanted = (self._need_full or bool(self._change_times) or self.tracker.pending
                          or now >= self._next_full)
            if not wanted:
                return max(0.0, self._next_full - now)
            return None if now >= earliest else earliest - now

    def run(self, stop: threading.Event) -> None:
        """Sync until `stop` is set. Never raises for a failed sync: it retries."""
        while not stop.is_set():
            if not self.ready():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            wait = self._due(self.clock())
            if wait is not None:
                self._wake.wait(min(wait, 1.0))
                self._wake.clear()
                continue
            # A failure is logged, and retried, by sync_once's own bookkeeping.
            with contextlib.suppress(Exception):
                self.sync_once()
