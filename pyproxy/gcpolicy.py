"""Python's cyclic garbage collector around the sync that builds pyproxy's state.

The first full sync turns the cluster's Services into the planner's cache, the
desired ruleset and the copy kept for the next partial sync: at 10,000
services, hundreds of thousands of container objects that live as long as the
process. While they are built the heap grows by more than a quarter several
times over, and each time CPython runs a full collection over everything,
the tracker's model included: ~0.4 s of the first sync at 10,000 services,
spent finding that objects about to be kept are alive.

So until a full sync has succeeded, automatic collection is off while one
runs, and what the process holds afterwards is frozen (`gc.freeze`: moved out
of the collector's generations and never scanned again; reference counting
still frees what is dropped later). Every later sync runs with the collector as
usual, over the little it allocates. The one cost: cyclic garbage made during
that first sync (by any thread) is frozen too and never freed, once.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_settled = False  # a full sync has succeeded in this process: nothing more to do


@contextlib.contextmanager
def first_full_sync() -> Iterator[None]:
    """Wrap a full sync (a partial one is fine too: it is never the first).

    A no-op once a sync has succeeded, and when the collector is already off:
    inside another `first_full_sync` (the reconciler's, around a dataplane's),
    or where someone else turned it off, whose choice stands.
    """
    global _settled
    with _lock:
        if _settled or not gc.isenabled():
            owner = False
        else:
            gc.disable()
            owner = True
    if not owner:
        yield
        return
    try:
        yield
    except BaseException:
        gc.enable()  # a failed sync keeps nothing worth freezing: collect as usual
        raise
    with _lock:
        gc.freeze()
        gc.enable()
        _settled = True
