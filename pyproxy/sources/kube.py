"""List+watch informers on the official `kubernetes` client.

Error policy, explicit (after kopf's watching.py and client-go's reflector):

- a paginated list, then a watch from the list's resourceVersion with bookmarks;
- a watch that ends normally (server timeout) is re-opened from the last
  resourceVersion at once;
- 410 Gone/Expired, on the watch or in the middle of a paginated list: drop the
  resourceVersion and relist (at once, no backoff);
- anything else (connection refused, read timeout, cut stream, 429, 5xx,
  malformed headers): back off with jitter (tenacity), honouring Retry-After,
  and re-watch from the last resourceVersion. The backoff grows with
  consecutive failures only: a list or a watch event in between starts it
  over, so a few faults spread over hours never leave an informer waiting
  30 s. While the API server refuses connections the backoff stays under
  ``UNREACHABLE_MAX_BACKOFF`` (a refused connect costs the server nothing), so
  changes made after it returns are seen within about a second;
- urllib3's own retries are switched off so that this policy is the only one.

Handlers get raw dicts; they never see client models. While the API server is
away nothing is delivered, so the programmed rules stay as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import tenacity
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

# kube-proxy's selector: no headless Services, no Services meant for another proxy.
HEADLESS = "service.kubernetes.io/headless"
PROXY_NAME = "service.kubernetes.io/service-proxy-name"
PAGE_SIZE = 500
CONNECT_TIMEOUT = 10.0
UNREACHABLE_MAX_BACKOFF = 1.0


def proxy_label_selector(service_proxy_name: str | None) -> str:
    if service_proxy_name:
        return f"!{HEADLESS},{PROXY_NAME}={service_proxy_name}"
    return f"!{HEADLESS},!{PROXY_NAME}"


class Handler(Protocol):
    def replace(self, objects: Iterable[dict[str, Any]]) -> None: ...
    def apply(self, event_type: str, obj: dict[str, Any]) -> None: ...


class Gone(Exception):
    """The resourceVersion (or continue token) is too old: relist."""


class ContinueExpired(Exception):
    """The continue token expired in the middle of a list: list again from the start."""


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """A client whose only retry policy is ours (urllib3's retries switched off)."""
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.retries = False
    return client.ApiClient(cfg)


def _unreachable(err: BaseException | None) -> bool:
    """The API server could not be connected to at all (down, restarting, refused)."""
    if isinstance(err, urllib3.exceptions.MaxRetryError):
        err = err.reason
    return isinstance(err, urllib3.exceptions.NewConnectionError | ConnectionRefusedError)


def _retry_after(err: BaseException) -> float | None:
    if isinstance(err, ApiException) and err.headers:
        value = err.headers.get("Retry-After")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None
    return None


@dataclass
class Informer:
    """Keeps one handler in step with one resource collection."""

    name: str
    list_fn: Callable[..., Any]
    handler: Handler
    label_selector: str | None = None
    field_selector: str | None = None
    page_size: int = PAGE_SIZE
    watch_timeout: tuple[int, int] = (300, 600)  # server-side, seconds (as client-go)
    read_timeout_margin: float = 60.0
    max_backoff: float = 30.0
    unreachable_max_backoff: float = UNREACHABLE_MAX_BACKOFF
    on_event: Callable[[], None] = lambda: None
    # Hand a list to the handler a page at a time rather than whole: at 10,000
    # EndpointSlices the raw objects of a whole list were the agent's peak memory.
    stream_list: bool = False
    synced: threading.Event = field(default_factory=threading.Event)
    resource_version: str | None = None
    listed_version: str = ""  # the last complete list's resourceVersion (iter_list)
    errors: int = 0
    failures: int = 0  # consecutive failures since the last progress (list or event)

    def _selectors(self) -> dict[str, str]:
        out = {}
        if self.label_selector:
            out["label_selector"] = self.label_selector
        if self.field_selector:
            out["field_selector"] = self.field_selector
        return out

    # -- one list ---------------------------------------------------------------

    def iter_list(self) -> Iterator[dict[str, Any]]:
        """A consistent paginated list, an object at a time as its pages arrive.

        Only one page is held at once. The list's resourceVersion is in
        ``listed_version`` once the iterator is exhausted; ContinueExpired if the
        continue token expires part way (the caller lists again from scratch).
        """
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, **self._selectors()}
            if token:
                kwargs["_continue"] = token
            try:
                resp = self.list_fn(_preload_content=False,
                                    _request_timeout=(CONNECT_TIMEOUT, 60), **kwargs)
            except ApiException as err:
                if err.status == 410 and token:
                    raise ContinueExpired(str(err)) from err
                raise
            body = json.loads(resp.data)
            del resp
            meta = body.get("metadata") or {}
            token = meta.get("continue") or None
            if not token:
                self.listed_version = meta.get("resourceVersion", "")
            yield from body.get("items") or []
            if not token:
                return

    def relist(self) -> tuple[int, str]:
        """List into the handler's replace (streamed if ``stream_list``): (count, version).

        If the continue token expires part way, the objects handed over so far
        stay set (nothing is deleted by an unfinished replace), and a fresh
        replace from the start follows, so what the list no longer holds goes.
        """
        while True:
            count = 0

            def counted(objects: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
                nonlocal count
                for obj in objects:
                    count += 1
                    yield obj

            try:
                if self.stream_list:
                    self.handler.replace(counted(self.iter_list()))
                else:
                    self.handler.replace(list(counted(self.iter_list())))
                return count, self.listed_version
            except ContinueExpired:
                log.info("continue token expired; relisting", extra={"informer": self.name})

    # -- one watch ----------------------------------------------------------------

    def watch_once(self, stop: threading.Event) -> None:
        assert self.resource_version is not None
        timeout = random.randint(*self.watch_timeout)
        w = watch.Watch()
        stream = w.stream(
            self.list_fn,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(CONNECT_TIMEOUT, timeout + self.read_timeout_margin),
            **self._selectors(),
        )
        try:
            for event in stream:
                obj = event.get("raw_object", event.get("object"))
                kind = event.get("type")
                if not isinstance(obj, dict):
                    continue
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self.resource_version = rv
                self.failures = 0
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.handler.apply(kind, obj)
                    self.on_event()
                elif kind != "BOOKMARK":
                    log.warning("unknown watch event type", extra={"informer": self.name,
                                                                   "type": kind})
                if stop.is_set():
                    w.stop()
                    break
        except ApiException as err:
            if err.status == 410:
                raise Gone(str(err)) from err
            raise

    # -- the loop -------------------------------------------------------------------

    def _session(self, stop: threading.Event) -> None:
        if self.resource_version is None:
            count, rv = self.relist()
            self.resource_version = rv
            self.failures = 0
            self.synced.set()
            self.on_event()
            log.info("listed", extra={"informer": self.name, "items": count,
                                      "resource_version": rv})
        self.watch_once(stop)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome else None
        if isinstance(err, Gone):
            return 0.0
        hinted = _retry_after(err) if err else None
        # Exponential in the failures since the last progress, not in tenacity's attempt
        # number, which counts every failure since the informer started.
        cap = self.unreachable_max_backoff if _unreachable(err) else self.max_backoff
        high = min(cap, 0.8 * 2 ** max(0, self.failures))
        backoff = random.uniform(0, high)
        return max(hinted, backoff) if hinted is not None else backoff

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        self.errors += 1
        if isinstance(err, Gone):
            self.resource_version = None
            log.info("resourceVersion too old; relisting", extra={"informer": self.name})
            return
        self.failures += 1
        log.warning("list/watch failed; backing off", extra={
            "informer": self.name, "error": f"{type(err).__name__}: {err}",
            "retry_in": round(state.upcoming_sleep, 2)})

    def run(self, stop: threading.Event) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(
                (ApiException, Gone, urllib3.exceptions.HTTPError, OSError, ValueError)),
            wait=self._wait,
            stop=lambda _state: stop.is_set(),
            sleep=lambda seconds: None if stop.wait(seconds) else None,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        while not stop.is_set():
            try:
                retrying(self._session, stop)
            except Exception as err:  # only reached once stop is set
                if not stop.is_set():
                    log.error("informer stopped", extra={"informer": self.name,
                                                         "error": str(err)})
                return

    def start(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name=f"informer-{self.name}",
                             daemon=True)
        t.start()
        return t


@dataclass
class CallbackHandler:
    """Adapts plain callables (set, delete, replace) to the Handler protocol."""

    on_set: Callable[[dict[str, Any]], None]
    on_delete: Callable[[dict[str, Any]], None]
    on_replace: Callable[[Iterable[dict[str, Any]]], None]
    lock: AbstractContextManager[Any] = field(default_factory=contextlib.nullcontext)

    def replace(self, objects: Iterable[dict[str, Any]]) -> None:
        with self.lock:
            self.on_replace(self._unlocked_between(objects))

    def _unlocked_between(self, objects: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Each object is handed over under the lock, which is let go while the next comes.

        A streamed list fetches its next page inside ``next()``, up to a read
        timeout from a slow API server: syncs and /state must not wait on that.
        Between objects a sync may run and see the replace half done, as it may
        between watch events; the initial list is gated by ``synced`` anyway.
        """
        it = iter(objects)
        while True:
            self.lock.__exit__(None, None, None)
            try:
                obj = next(it, None)
            finally:
                self.lock.__enter__()
            if obj is None:
                return
            yield obj

    def apply(self, event_type: str, obj: dict[str, Any]) -> None:
        with self.lock:
            if event_type == "DELETED":
                self.on_delete(obj)
            else:
                self.on_set(obj)


def all_synced(informers: Iterable[Informer]) -> Callable[[], bool]:
    items = list(informers)
    return lambda: all(i.synced.is_set() for i in items)
