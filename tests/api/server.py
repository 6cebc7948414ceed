"""A small, faithful Kubernetes API server stand-in for tests.

Why this exists: no kube-apiserver can be installed on the test machines, yet pyproxy has to be
proven against the real list/watch protocol as spoken by the official ``kubernetes`` client.
This module serves that protocol over plain HTTP on 127.0.0.1 (stdlib only), keeps its state
in memory, and lets a test reach in from Python to change objects and inject faults.

The contract it imitates is /work/shared/KUBE-API.md §1. Where that page and the real API
server disagree, this module follows the real server and says so in a comment.

Thread model: one ``ThreadingHTTPServer`` (daemon threads, HTTP/1.1 keep-alive). All state sits
behind one lock; watch handlers sleep on a condition variable tied to it, so a write and the
fan-out of its event to every open watch are atomic.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import ctypes
import ipaddress
import json
import math
import os
import random
import re
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

JSON = dict[str, Any]
# (namespace, name); the namespace is "" for cluster-scoped kinds.
Key = tuple[str, str]
# Aliases so annotations inside FakeKubeAPI are not shadowed by its list() method.
JSONList = list[JSON]
FieldTerms = list[tuple[str, str, str]]  # (field, "=" or "!=", value)
WatchEvents = list[tuple[str, JSON]]  # (event type, object)

__all__ = [
    "RESOURCES",
    "APIError",
    "FakeKubeAPI",
    "LabelSelector",
    "SelectorError",
    "parse_field_selector",
    "parse_label_selector",
]


# --------------------------------------------------------------------------------------------
# Resource types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One served resource type: enough to route, name and serialize it like the real server."""

    kind: str
    plural: str
    singular: str
    group: str  # "" for the core group
    namespaced: bool
    short_names: tuple[str, ...]
    # Fields a Go server serializes even for an otherwise empty object. A BOOKMARK is an empty
    # object of the watched kind, so its shape must carry these to look like the real thing.
    zero: JSON
    # Field selectors the real server accepts for this kind (others get 400).
    fields: tuple[str, ...]

    @property
    def api_version(self) -> str:
        return f"{self.group}/v1" if self.group else "v1"

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/v1" if self.group else "/api/v1"

    @property
    def qualified(self) -> str:
        """The name used in error messages, e.g. ``endpointslices.discovery.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


_NS_FIELDS = ("metadata.name", "metadata.namespace")

RESOURCES: dict[str, Resource] = {
    r.kind: r
    for r in (
        Resource(
            "Service", "services", "service", "", True, ("svc",),
            {"spec": {}, "status": {"loadBalancer": {}}}, _NS_FIELDS,
        ),
        Resource(
            "EndpointSlice", "endpointslices", "endpointslice", "discovery.k8s.io", True, (),
            # discovery/v1 declares endpoints and ports without omitempty: they come out null.
            {"addressType": "", "endpoints": None, "ports": None}, _NS_FIELDS,
        ),
        Resource(
            "Node", "nodes", "node", "", False, ("no",),
            {
                "spec": {},
                "status": {
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                    "nodeInfo": {
                        k: ""
                        for k in (
                            "machineID", "systemUUID", "bootID", "kernelVersion", "osImage",
                            "containerRuntimeVersion", "kubeletVersion", "kubeProxyVersion",
                            "operatingSystem", "architecture",
                        )
                    },
                },
            },
            # Node's field label conversion knows metadata.name, not metadata.namespace.
            ("metadata.name",),
        ),
        Resource("ConfigMap", "configmaps", "configmap", "", True, ("cm",), {}, _NS_FIELDS),
    )
}
_BY_PATH: dict[tuple[str, str], Resource] = {(r.group, r.plural): r for r in RESOURCES.values()}
_GROUPS = ("discovery.k8s.io", "events.k8s.io")
_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_REASONS = {
    400: ("BadRequest", "the server rejected our request for an unknown reason"),
    401: ("Unauthorized", "Unauthorized"),
    403: ("Forbidden", "forbidden"),
    404: ("NotFound", "the server could not find the requested resource"),
    405: ("MethodNotAllowed", "the server does not allow this method on the requested resource"),
    409: ("Conflict", "the object has been modified; please apply your changes to the latest "
                      "version and try again"),
    410: ("Expired", "The resourceVersion for the provided list is too old."),
    422: ("Invalid", "the request is invalid"),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: injected fault"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "the server was unable to return a response in the time allotted"),
}


class APIError(Exception):
    """An API failure answered as a ``Status`` body, exactly as the real server shapes it."""

    def __init__(
        self,
        code: int,
        reason: str | None = None,
        message: str | None = None,
        *,
        details: JSON | None = None,
        list_meta: JSON | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        default_reason, default_message = _REASONS.get(code, ("", "error"))
        self.code = code
        self.reason = default_reason if reason is None else reason
        self.message = default_message if message is None else message
        self.details = details
        self.list_meta = list_meta or {}
        self.headers = headers or {}
        super().__init__(f"{code} {self.reason}: {self.message}")

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": dict(self.list_meta),
            "status": "Failure",
            "message": self.message,
        }
        if self.reason:
            body["reason"] = self.reason
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


def _not_found(rt: Resource, name: str) -> APIError:
    details: JSON = {"name": name}
    if rt.group:
        details["group"] = rt.group
    details["kind"] = rt.plural
    return APIError(404, "NotFound", f'{rt.qualified} "{name}" not found', details=details)


def _invalid_list_options(errors: list[tuple[str, str, str]]) -> APIError:
    """422 for ListOptions validation, as the real handler (``errors.NewInvalid``) answers.

    KUBE-API.md's table says 400 for these cases; the real apiserver's list/watch handlers
    wrap ``ValidateListOptions`` failures in ``NewInvalid`` (422, reason Invalid). Only
    "resourceVersion with continue" is a 400, because storage raises it as a BadRequest.
    """
    texts = [f"{fld}: {kind}: {detail}" for fld, kind, detail in errors]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    reasons = {"Forbidden": "FieldValueForbidden", "Unsupported value": "FieldValueNotSupported"}
    causes = [
        {"reason": reasons.get(kind, "FieldValueInvalid"), "message": f"{kind}: {detail}",
         "field": fld}
        for fld, kind, detail in errors
    ]
    return APIError(
        422,
        "Invalid",
        f'ListOptions.meta.k8s.io "" is invalid: {joined}',
        details={"group": "meta.k8s.io", "kind": "ListOptions", "causes": causes},
    )


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------


class SelectorError(ValueError):
    """A selector the real server would refuse to parse (answered as 400 BadRequest)."""


_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_SELECTOR_OPS = ("!=", "==", "!", "=", "(", ")", ",", ">", "<")


@dataclass(frozen=True)
class Requirement:
    """One comma-separated term of a label selector."""

    key: str
    op: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            # The real server (and the doc) match an absent key for != and notin.
            return not present or value not in self.values
        if not present:
            return False
        try:
            have = int(str(value))
        except ValueError:
            return False
        want = int(self.values[0])
        return have > want if self.op == "gt" else have < want


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector: every requirement must hold (comma means AND)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Any) -> bool:
        labels = labels if isinstance(labels, dict) else {}
        return all(r.matches(labels) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


def _lex_selector(text: str) -> list[tuple[str, str]]:
    """Split a label selector into ("op", symbol) and ("id", word) tokens like k8s' lexer."""
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        two = text[i:i + 2]
        if two in ("!=", "=="):
            tokens.append(("op", two))
            i += 2
            continue
        if ch in "!=(),<>":
            tokens.append(("op", ch))
            i += 1
            continue
        j = i
        while j < len(text) and not text[j].isspace() and text[j] not in "!=(),<>":
            j += 1
        tokens.append(("id", text[i:j]))
        i = j
    return tokens


def _check_label_key(key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    ok = bool(_LABEL_NAME.fullmatch(name))
    if slash:
        ok = ok and 0 < len(prefix) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(prefix))
    if not ok:
        raise SelectorError(f"unable to parse requirement: invalid label key {key!r}")


def _check_label_value(value: str) -> None:
    if not _LABEL_VALUE.fullmatch(value):
        raise SelectorError(f"unable to parse requirement: invalid label value: {value!r}")


def parse_label_selector(text: str) -> LabelSelector:
    """Parse the full label selector grammar.

    ``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k>1``,
    ``k<1``; terms joined by commas. Raises ``SelectorError`` where the real server answers 400.
    """
    toks = _lex_selector(text)
    reqs: list[Requirement] = []
    i = 0

    def peek() -> tuple[str, str] | None:
        return toks[i] if i < len(toks) else None

    def fail(expected: str) -> SelectorError:
        got = peek()
        return SelectorError(f"found '{got[1] if got else ''}', expected: {expected}")

    if not toks:
        return LabelSelector()
    while True:
        negate = peek() == ("op", "!")
        if negate:
            i += 1
        tok = peek()
        if tok is None or tok[0] != "id":
            raise fail("!, identifier")
        key = tok[1]
        _check_label_key(key)
        i += 1
        nxt = peek()
        if negate:
            reqs.append(Requirement(key, "!"))
        elif nxt is None or nxt == ("op", ","):
            reqs.append(Requirement(key, "exists"))
        elif nxt in (("op", "="), ("op", "=="), ("op", "!=")):
            i += 1
            val = peek()
            if val is None or val == ("op", ","):
                value = ""
            elif val[0] == "id":
                value = val[1]
                i += 1
            else:
                raise fail("identifier")
            _check_label_value(value)
            reqs.append(Requirement(key, "!=" if nxt[1] == "!=" else "=", (value,)))
        elif nxt in (("op", ">"), ("op", "<")):
            i += 1
            val = peek()
            if val is None or val[0] != "id" or not re.fullmatch(r"-?[0-9]+", val[1]):
                raise SelectorError("for 'Gt', 'Lt' operators, the value must be an integer")
            i += 1
            reqs.append(Requirement(key, "gt" if nxt[1] == ">" else "lt", (val[1],)))
        elif nxt in (("id", "in"), ("id", "notin")):
            i += 1
            if peek() != ("op", "("):
                raise fail("(")
            i += 1
            values: list[str] = []
            expect_value = True
            while True:
                tok = peek()
                if tok is None:
                    raise fail(")")
                if tok == ("op", ")"):
                    if expect_value and values:
                        values.append("")  # "(a,)" has a trailing empty value, as in k8s
                    i += 1
                    break
                if tok == ("op", ","):
                    if expect_value:
                        values.append("")
                    expect_value = True
                    i += 1
                    continue
                if tok[0] != "id" or not expect_value:
                    raise fail(", or )")
                values.append(tok[1])
                expect_value = False
                i += 1
            if not values:
                raise SelectorError("for 'in', 'notin' operators, values set can't be empty")
            for v in values:
                _check_label_value(v)
            reqs.append(Requirement(key, nxt[1], tuple(values)))
        else:
            raise fail("in, notin, =, ==, !=, gt, lt")
        tok = peek()
        if tok is None:
            break
        if tok != ("op", ","):
            raise fail(",")
        i += 1
        if peek() is None:
            raise fail("!, identifier")
    return LabelSelector(tuple(reqs))


def parse_field_selector(
    text: str, allowed: Iterable[str] = _NS_FIELDS
) -> list[tuple[str, str, str]]:
    """Parse ``field=v``, ``field==v``, ``field!=v`` terms into (field, op, value).

    Only the fields in ``allowed`` are accepted; anything else is the real server's 400
    "field label not supported".
    """
    allowed = tuple(allowed)
    terms: list[tuple[str, str, str]] = []
    for raw in re.split(r"(?<!\\),", text):
        term = raw.strip()
        if not term:
            continue
        for op in ("!=", "==", "="):
            lhs, sep, rhs = term.partition(op)
            if sep:
                break
        else:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{term}'")
        name = lhs.strip()
        if name not in allowed:
            raise SelectorError(f"field label not supported: {name}")
        value = re.sub(r"\\(.)", r"\1", rhs.strip())
        terms.append((name, "!=" if op == "!=" else "=", value))
    return terms


def _field_value(obj: JSON, name: str) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get(name.split(".", 1)[1], "") or "")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _go_bool(value: str | None) -> bool | None:
    """Query-string booleans the way apimachinery converts them.

    Absent is None; "0" and "false" (any case) are False; anything else, even "", is True.
    """
    if value is None:
        return None
    return not (value == "0" or value.lower() == "false")


def _int_param(q: dict[str, str], name: str) -> int:
    raw = q.get(name, "")
    if raw == "":
        return 0
    try:
        return int(raw)
    except ValueError:
        raise APIError(400, "BadRequest", f"invalid {name}: {raw!r}") from None


def _with_type(rt: Resource, obj: JSON) -> JSON:
    """Watch events and single GETs carry kind/apiVersion; list items do not."""
    return {"kind": rt.kind, "apiVersion": rt.api_version, **obj}


def _with_rv(obj: JSON, rv: int) -> JSON:
    out = dict(obj)
    out["metadata"] = {**(obj.get("metadata") or {}), "resourceVersion": str(rv)}
    return out


# --------------------------------------------------------------------------------------------
# Internal state records
# --------------------------------------------------------------------------------------------


@dataclass
class _Event:
    """One write in the global history; enough to replay it and to undo it for old snapshots."""

    rv: int
    rt: Resource
    key: Key
    type: str  # ADDED, MODIFIED, DELETED
    obj: JSON  # new state; for DELETED the final state carrying the deletion RV
    prev: JSON | None  # state before the write (None for ADDED)


@dataclass
class _Watcher:
    rt: Resource
    namespace: str | None
    labels: LabelSelector
    fields: list[tuple[str, str, str]]
    conn: socket.socket
    queue: deque[tuple[str, JSON]] = field(default_factory=deque)
    cut: bool = False

    def matches(self, obj: JSON) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        for name, op, value in self.fields:
            if (_field_value(obj, name) == value) != (op == "="):
                return False
        return self.labels.matches(meta.get("labels"))

    def convert(self, ev: _Event) -> tuple[str, JSON] | None:
        """Turn a write into what this watcher sees, as the watch cache's cacheWatcher does.

        An update that stops matching becomes DELETED (old content, new RV); one that starts
        matching becomes ADDED.
        """
        cur = ev.type != "DELETED" and self.matches(ev.obj)
        old = ev.prev is not None and self.matches(ev.prev)
        if cur and not old:
            return "ADDED", ev.obj
        if cur and old:
            return "MODIFIED", ev.obj
        if old:
            if ev.type == "DELETED":
                return "DELETED", ev.obj
            assert ev.prev is not None
            return "DELETED", _with_rv(ev.prev, ev.rv)
        return None


@dataclass
class _Fault:
    remaining: int
    path_contains: str | None
    status: int | None = None
    hang: float | None = None
    retry_after: float | None = None
    reason: str | None = None
    message: str | None = None


_CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this "
    "response to retrieve the remainder of the results. Continuing with the provided token "
    "results in an inconsistent list - objects that were created, modified, or deleted between "
    "the time the first chunk was returned and now may show up in the list."
)

_WATCH_POLL = 0.25  # how often an idle watch checks whether its client went away


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class FakeKubeAPI:
    """An in-memory Kubernetes API server for tests, plus a thread-safe Python control API.

    Serves list/watch for Services, EndpointSlices, Nodes and ConfigMaps, accepts Events, and
    answers discovery, over plain HTTP on 127.0.0.1. Objects are stored as the JSON dicts the
    tests give, with only the defaulting the real apiserver applies (no validation), so a test
    can store a malformed Service on purpose.

    Knobs (all keyword-only):
      history_size: how many writes the event history keeps; a watch or exact list from an RV
        older than the history gets 410 Expired.
      continue_ttl: seconds a continue token stays valid (the real ~5 min is etcd compaction).
      bookmark_interval: seconds between BOOKMARKs on watches that asked for them (real: ~60).
      bookmark_before_timeout: the last bookmark comes this long before timeoutSeconds, as the
        watch cache does (it skips bookmarks altogether once that moment is past).
      future_rv_wait: how long a request for a not-yet-reached RV waits before 504.
      watch_timeout_range: stream length in seconds when timeoutSeconds is not given.
      service_cidrs: where missing Service clusterIPs are allocated from (IPv4 and IPv6).
      require_auth: answer 401 unless the request carries the kubeconfig's bearer token.
      start_rv: the first global resourceVersion.
    """

    token = "fake-kube-api-token"

    def __init__(
        self,
        *,
        history_size: int = 1000,
        continue_ttl: float = 300.0,
        bookmark_interval: float = 1.0,
        bookmark_before_timeout: float = 2.0,
        future_rv_wait: float = 1.0,
        watch_timeout_range: tuple[float, float] = (1800.0, 3600.0),
        service_cidrs: tuple[str, ...] = ("198.19.0.0/16", "fd00:198:19::/112"),
        require_auth: bool = False,
        start_rv: int = 1000,
        port: int = 0,
        netns: str | None = None,
    ) -> None:
        self.history_size = history_size
        self.continue_ttl = continue_ttl
        self.bookmark_interval = bookmark_interval
        self.bookmark_before_timeout = bookmark_before_timeout
        self.future_rv_wait = future_rv_wait
        self.watch_timeout_range = watch_timeout_range
        self.service_cidrs = tuple(ipaddress.ip_network(c) for c in service_cidrs)
        self.require_auth = require_auth
        self.version_info: JSON = {
            "major": "1", "minor": "33", "gitVersion": "v1.33.0",
            "gitCommit": "0" * 40, "gitTreeState": "clean",
            "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2",
            "compiler": "gc", "platform": "linux/amd64",
        }

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._objects: dict[str, dict[Key, JSON]] = {k: {} for k in RESOURCES}
        self._rv = start_rv
        self._floor = start_rv  # history holds every write with rv > floor
        self._epoch = 0  # bumped by compact(): every continue token issued before expires
        self._history: deque[_Event] = deque()
        self._watchers: list[_Watcher] = []
        self._faults: list[_Fault] = []
        self._requests: list[tuple[str, str]] = []
        self._events: list[JSON] = []
        self._conns: set[socket.socket] = set()
        self._release = threading.Event()  # wakes hung requests on go_down()/stop()

        self._port = port
        self.netns = netns
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._started = False

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeKubeAPI:
        """Bind 127.0.0.1 (an ephemeral port unless one was given) and serve in a thread."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        self._listen()
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection. Safe to call twice."""
        if self._httpd is not None:
            self.go_down()
        self._started = False

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: str | Path) -> Path:
        """Write an ordinary kubeconfig (server=url, a user with a dummy bearer token)."""
        path = Path(path)
        path.write_text(
            "apiVersion: v1\n"
            "kind: Config\n"
            "clusters:\n"
            "- name: fake\n"
            "  cluster:\n"
            f"    server: {self.url}\n"
            "contexts:\n"
            "- name: fake\n"
            "  context:\n"
            "    cluster: fake\n"
            "    namespace: default\n"
            "    user: fake\n"
            "current-context: fake\n"
            "preferences: {}\n"
            "users:\n"
            "- name: fake\n"
            "  user:\n"
            f"    token: {self.token}\n"
        )
        return path

    def _listen(self) -> None:
        def bind() -> _HTTPServer:
            return _HTTPServer(("127.0.0.1", self._port), _Handler)

        # In a network namespace, the server listens on that namespace's loopback, so a
        # pyproxy running there (and only there) reaches it like an API server.
        httpd = bind() if self.netns is None else in_netns(self.netns, bind)
        httpd.api = self
        self._port = httpd.server_address[1]
        thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fake-kube-api:{self._port}", daemon=True,
        )
        with self._lock:
            self._httpd = httpd
            self._release = threading.Event()
        self._thread = thread
        thread.start()

    # ---- faults ----------------------------------------------------------------------------

    def go_down(self) -> None:
        """Stop listening and drop every connection: clients get "connection refused".

        State (objects, RV, history) is kept for ``come_up()``.
        """
        with self._lock:
            httpd, self._httpd = self._httpd, None
            conns = list(self._conns)
            for w in self._watchers:
                w.cut = True
            self._release.set()
            self._cond.notify_all()
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        for conn in conns:
            _abort(conn)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def come_up(self) -> None:
        """Listen again on the same port after ``go_down()``, with state intact."""
        if self._httpd is not None:
            return
        self._listen()

    def cut_streams(self) -> int:
        """Abort every open watch without the terminating chunk; return how many were cut.

        The official client surfaces this as urllib3 ``ProtocolError``.
        """
        with self._lock:
            victims = [w for w in self._watchers if not w.cut]
            for w in victims:
                w.cut = True
                _abort(w.conn)
            self._cond.notify_all()
        return len(victims)

    def fail_next(
        self,
        n: int,
        status: int,
        *,
        retry_after: float | None = None,
        path_contains: str | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with a Status of code ``status``.

        ``retry_after`` adds a ``Retry-After`` header: whole numbers are sent as integers, other
        values verbatim (urllib3 cannot parse "0.5", which is a way to test InvalidHeader).
        ``path_contains`` restricts the fault to requests whose path+query contains it.
        """
        with self._lock:
            self._faults.append(_Fault(n, path_contains, status=status, retry_after=retry_after,
                                       reason=reason, message=message))

    def hang_next(self, n: int, seconds: float, path_contains: str | None = None) -> None:
        """Accept the next ``n`` matching requests, stay silent ``seconds``, then answer.

        A client with a shorter read timeout sees a timeout; a patient one a slow response.
        """
        with self._lock:
            self._faults.append(_Fault(n, path_contains, hang=seconds))

    def compact(self) -> None:
        """Drop the event history and expire all continue tokens, like an etcd compaction.

        Afterwards a watch or exact list from any RV below the current one gets 410.
        """
        with self._lock:
            self._history.clear()
            self._floor = self._rv
            self._epoch += 1

    # ---- observation -----------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request seen so far as (method, raw path+query), oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def events(self) -> list[JSON]:
        """Bodies of the Events clients posted (they are otherwise dropped)."""
        with self._lock:
            return copy.deepcopy(self._events)

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion."""
        with self._lock:
            return str(self._rv)

    def watch_count(self, kind: str | None = None) -> int:
        """How many watch streams are open (for ``kind`` only, if given)."""
        with self._lock:
            return sum(1 for w in self._watchers if not w.cut and kind in (None, w.rt.kind))

    def wait_for_watches(self, n: int = 1, kind: str | None = None, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` watches (of ``kind``) are open; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.watch_count(kind) < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # ---- object control API ----------------------------------------------------------------

    def create(self, obj: JSON) -> JSON:
        """Store a new object (``obj["kind"]`` says which); return it as the server holds it.

        Raises ValueError if it already exists.
        """
        rt, key = self._identify(obj)
        with self._lock:
            return _with_type(rt, copy.deepcopy(self._create(rt, key, obj)))

    def update(self, obj: JSON) -> JSON:
        """Replace an existing object (spec, status and all; any RV in it is ignored).

        A no-op update writes nothing and bumps no RV, like the real server. Raises KeyError
        if the object does not exist.
        """
        rt, key = self._identify(obj)
        with self._lock:
            return _with_type(rt, copy.deepcopy(self._update(rt, key, obj)))

    def apply(self, obj: JSON) -> JSON:
        """Create the object, or update it if it exists."""
        rt, key = self._identify(obj)
        with self._lock:
            if key in self._objects[rt.kind]:
                stored = self._update(rt, key, obj)
            else:
                stored = self._create(rt, key, obj)
            return _with_type(rt, copy.deepcopy(stored))

    def delete(self, kind: str, namespace: str | None, name: str) -> JSON:
        """Delete an object; return its final state (with the deletion RV). KeyError if absent."""
        rt = _resource(kind)
        key = ((namespace or "default") if rt.namespaced else "", name)
        with self._lock:
            return _with_type(rt, copy.deepcopy(self._delete(rt, key)))

    def get(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        """The stored object (with kind/apiVersion), or None."""
        rt = _resource(kind)
        key = ((namespace or "default") if rt.namespaced else "", name)
        with self._lock:
            obj = self._objects[rt.kind].get(key)
            return None if obj is None else _with_type(rt, copy.deepcopy(obj))

    def list(self, kind: str) -> JSONList:
        """All stored objects of ``kind`` in key order (with kind/apiVersion)."""
        rt = _resource(kind)
        with self._lock:
            objs = [self._objects[rt.kind][k] for k in sorted(self._objects[rt.kind])]
            return [_with_type(rt, copy.deepcopy(o)) for o in objs]

    # ---- store internals (call with the lock held) -----------------------------------------

    @staticmethod
    def _identify(obj: JSON) -> tuple[Resource, Key]:
        rt = _resource(str(obj.get("kind", "")))
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not name or not isinstance(name, str):
            raise ValueError("object needs metadata.name")
        ns = str(meta.get("namespace") or "default") if rt.namespaced else ""
        return rt, (ns, name)

    def _prepare(self, rt: Resource, key: Key, obj: JSON, old: JSON | None) -> JSON:
        new = copy.deepcopy(obj)
        new.pop("kind", None)
        new.pop("apiVersion", None)
        meta = new.get("metadata")
        meta = dict(meta) if isinstance(meta, dict) else {}
        new = {"metadata": meta, **{k: v for k, v in new.items() if k != "metadata"}}
        if rt.namespaced:
            meta["namespace"] = key[0]
        else:
            meta.pop("namespace", None)
        if old is None:
            meta["uid"] = meta.get("uid") or str(uuid.uuid4())
            meta["creationTimestamp"] = meta.get("creationTimestamp") or _now_rfc3339()
            if rt.kind in ("Service", "EndpointSlice"):
                meta["generation"] = 1
        else:
            old_meta = old["metadata"]
            for k in ("uid", "creationTimestamp", "generation"):
                if k in old_meta:
                    meta[k] = old_meta[k]
                else:
                    meta.pop(k, None)
        meta.pop("resourceVersion", None)
        if rt.kind == "Service":
            self._default_service(new, key, old)
        elif rt.kind == "EndpointSlice":
            _default_endpointslice(new)
        return new

    def _create(self, rt: Resource, key: Key, obj: JSON) -> JSON:
        if key in self._objects[rt.kind]:
            raise ValueError(f'{rt.qualified} "{key[1]}" already exists')
        new = self._prepare(rt, key, obj, None)
        return self._commit(rt, key, "ADDED", new, None)

    def _update(self, rt: Resource, key: Key, obj: JSON) -> JSON:
        old = self._objects[rt.kind].get(key)
        if old is None:
            raise KeyError(f'{rt.qualified} "{key[1]}" not found')
        new = self._prepare(rt, key, obj, old)
        old_meta = {k: v for k, v in old["metadata"].items() if k != "resourceVersion"}
        if new == {**old, "metadata": old_meta}:
            return old  # no-op: etcd is not written, no RV, no event
        if rt.kind in ("Service", "EndpointSlice"):
            def body(o: JSON) -> JSON:
                skip = ("metadata", "status") if rt.kind == "Service" else ("metadata",)
                return {k: v for k, v in o.items() if k not in skip}
            if body(new) != body(old):
                new["metadata"]["generation"] = int(old["metadata"].get("generation", 0)) + 1
        return self._commit(rt, key, "MODIFIED", new, old)

    def _delete(self, rt: Resource, key: Key) -> JSON:
        old = self._objects[rt.kind].get(key)
        if old is None:
            raise KeyError(f'{rt.qualified} "{key[1]}" not found')
        del self._objects[rt.kind][key]
        self._rv += 1
        final = _with_rv(old, self._rv)
        self._record(_Event(self._rv, rt, key, "DELETED", final, old))
        return final

    def _commit(self, rt: Resource, key: Key, etype: str, new: JSON, old: JSON | None) -> JSON:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[rt.kind][key] = new
        self._record(_Event(self._rv, rt, key, etype, new, old))
        return new

    def _record(self, ev: _Event) -> None:
        self._history.append(ev)
        while len(self._history) > self.history_size:
            self._floor = self._history.popleft().rv
        for w in self._watchers:
            if w.rt is ev.rt and not w.cut:
                out = w.convert(ev)
                if out is not None:
                    w.queue.append(out)
        self._cond.notify_all()

    def _state_at(self, rt: Resource, rv: int) -> dict[Key, JSON]:
        """The objects of ``rt`` as of revision ``rv`` (needs rv >= floor): undo later writes."""
        state = dict(self._objects[rt.kind])
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            if ev.rt is not rt:
                continue
            if ev.prev is None:
                state.pop(ev.key, None)
            else:
                state[ev.key] = ev.prev
        return state

    def _wait_for_rv(self, rv: int) -> None:
        """A future RV waits a little for the store to catch up, then 504 like the cacher."""
        if rv <= self._rv:
            return
        if not self._cond.wait_for(lambda: self._rv >= rv, timeout=self.future_rv_wait):
            raise APIError(
                504, "Timeout", f"Too large resource version: {rv}, current: {self._rv}",
                details={
                    "causes": [{"reason": "ResourceVersionTooLarge",
                                "message": "Too large resource version"}],
                    "retryAfterSeconds": 1,
                },
            )

    # ---- Service defaulting ----------------------------------------------------------------

    def _default_service(self, svc: JSON, key: Key, old: JSON | None) -> None:
        """Apply the apiserver's Service defaulting and allocation, never rejecting anything.

        Why: kube-proxy dereferences fields the real server always fills (notably
        sessionAffinityConfig.clientIP.timeoutSeconds for ClientIP), so tests must see them.
        Malformed values are stored untouched: tests use them to prove the proxy skips them.
        """
        spec = svc.get("spec")
        if spec is None:
            spec = svc["spec"] = {}
        if not isinstance(spec, dict):
            return
        old_spec = (old or {}).get("spec")
        old_spec = old_spec if isinstance(old_spec, dict) else {}
        if spec.get("type") in (None, ""):
            spec["type"] = "ClusterIP"
        stype = spec["type"]
        if spec.get("sessionAffinity") in (None, ""):
            spec["sessionAffinity"] = "None"
        if spec["sessionAffinity"] == "None":
            spec.pop("sessionAffinityConfig", None)
        elif spec["sessionAffinity"] == "ClientIP":
            cfg = spec.get("sessionAffinityConfig")
            if not isinstance(cfg, dict):
                cfg = spec["sessionAffinityConfig"] = {}
            cip = cfg.get("clientIP")
            if not isinstance(cip, dict):
                cip = cfg["clientIP"] = {}
            if cip.get("timeoutSeconds") is None:
                cip["timeoutSeconds"] = 10800
        ports = spec.get("ports")
        ports = [p for p in ports if isinstance(p, dict)] if isinstance(ports, list) else []
        for p in ports:
            if p.get("protocol") in (None, ""):
                p["protocol"] = "TCP"
            if p.get("targetPort") in (None, 0, "") and "port" in p:
                p["targetPort"] = p["port"]
        if stype != "ExternalName":
            if spec.get("internalTrafficPolicy") in (None, ""):
                spec["internalTrafficPolicy"] = "Cluster"
            self._default_cluster_ips(spec, old_spec)
        if stype in ("NodePort", "LoadBalancer"):
            if spec.get("externalTrafficPolicy") in (None, ""):
                spec["externalTrafficPolicy"] = "Cluster"
            if stype == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is None:
                spec["allocateLoadBalancerNodePorts"] = True
            self._default_node_ports(spec, old_spec, key, ports)
        status = svc.get("status")
        if status is None:
            svc["status"] = {"loadBalancer": {}}
        elif isinstance(status, dict) and status.get("loadBalancer") is None:
            status["loadBalancer"] = {}

    def _default_cluster_ips(self, spec: JSON, old_spec: JSON) -> None:
        # An update that omits the allocated fields keeps them, as the real registry does.
        if "clusterIP" not in spec and "clusterIPs" not in spec:
            for k in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                if k in old_spec and k not in spec:
                    spec[k] = copy.deepcopy(old_spec[k])
        if "clusterIP" not in spec and not spec.get("clusterIPs"):
            families = spec.get("ipFamilies")
            wanted = families if isinstance(families, list) and families else [None]
            if spec.get("ipFamilyPolicy") in (None, "", "SingleStack"):
                wanted = wanted[:1]
            ips = [ip for ip in (self._allocate_ip(f) for f in wanted) if ip]
            if ips:
                spec["clusterIPs"] = ips
        cip, cips = spec.get("clusterIP"), spec.get("clusterIPs")
        if isinstance(cip, str) and cip and "clusterIPs" not in spec:
            spec["clusterIPs"] = [cip]
        elif isinstance(cips, list) and cips and "clusterIP" not in spec:
            spec["clusterIP"] = cips[0]
        cips = spec.get("clusterIPs")
        if "ipFamilies" not in spec and isinstance(cips, list) and cips:
            fams: list[str] = []
            for ip in cips:
                if ip == "None":
                    fams = ["IPv4"]
                    break
                try:
                    fams.append(f"IPv{ipaddress.ip_address(str(ip)).version}")
                except ValueError:
                    fams = []
                    break
            if fams:
                spec["ipFamilies"] = fams
        if spec.get("ipFamilyPolicy") in (None, ""):
            fams_now = spec.get("ipFamilies")
            two = isinstance(fams_now, list) and len(fams_now) > 1
            spec["ipFamilyPolicy"] = "PreferDualStack" if two else "SingleStack"

    def _allocate_ip(self, family: str | None) -> str | None:
        used: set[str] = set()
        for svc in self._objects["Service"].values():
            spec = svc.get("spec")
            if isinstance(spec, dict):
                used.add(str(spec.get("clusterIP")))
                if isinstance(spec.get("clusterIPs"), list):
                    used.update(str(ip) for ip in spec["clusterIPs"])
        for net in self.service_cidrs:
            if family not in (None, f"IPv{net.version}"):
                continue
            for i, ip in enumerate(net.hosts()):
                if i > 65536:
                    break
                if i and str(ip) not in used:  # skip the first host, like the real allocator
                    return str(ip)
        return None

    def _default_node_ports(
        self, spec: JSON, old_spec: JSON, key: Key, ports: JSONList
    ) -> None:
        used: set[Any] = set()
        for k, svc in self._objects["Service"].items():
            s = svc.get("spec")
            if k == key or not isinstance(s, dict):
                continue
            used.add(s.get("healthCheckNodePort"))
            for p in s.get("ports") or []:
                if isinstance(p, dict):
                    used.add(p.get("nodePort"))
        for p in ports:
            used.add(p.get("nodePort"))
        old_ports = {
            (p.get("port"), p.get("protocol")): p.get("nodePort")
            for p in old_spec.get("ports") or [] if isinstance(p, dict)
        }

        def allocate() -> int:
            port = next(n for n in range(30000, 32768) if n not in used)
            used.add(port)
            return port

        if spec["type"] == "NodePort" or spec.get("allocateLoadBalancerNodePorts") is not False:
            for p in ports:
                if p.get("nodePort") in (None, 0):
                    p["nodePort"] = old_ports.get((p.get("port"), p.get("protocol"))) or allocate()
        if (
            spec["type"] == "LoadBalancer"
            and spec.get("externalTrafficPolicy") == "Local"
            and spec.get("healthCheckNodePort") in (None, 0)
        ):
            spec["healthCheckNodePort"] = old_spec.get("healthCheckNodePort") or allocate()

    # ---- HTTP-side operations (called from handler threads) --------------------------------

    def _log_request(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and (
                    fault.path_contains is None or fault.path_contains in path
                ):
                    fault.remaining -= 1
                    self._faults = [f for f in self._faults if f.remaining > 0]
                    return fault
        return None

    def _selectors(
        self, rt: Resource, q: dict[str, str]
    ) -> tuple[LabelSelector, FieldTerms]:
        try:
            return (
                parse_label_selector(q.get("labelSelector", "")),
                parse_field_selector(q.get("fieldSelector", ""), rt.fields),
            )
        except SelectorError as e:
            raise APIError(400, "BadRequest", str(e)) from None

    def _encode_continue(self, rt: Resource, rv: int, start: str, taken: float) -> str:
        token = {"v": "meta.k8s.io/v1", "rv": rv, "start": start,
                 "kind": rt.kind, "epoch": self._epoch, "taken": taken}
        return base64.urlsafe_b64encode(_dumps(token)).decode().rstrip("=")

    @staticmethod
    def _decode_continue(rt: Resource, raw: str) -> JSON:
        try:
            token = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            if (
                not isinstance(token, dict)
                or token.get("v") != "meta.k8s.io/v1"
                or token.get("kind") != rt.kind
                or not isinstance(token.get("rv"), int)
                or not isinstance(token.get("start"), str)
                or not token["start"]
            ):
                raise ValueError("unrecognized token")
        except (ValueError, binascii.Error) as e:
            raise APIError(400, "BadRequest", f"continue key is not valid: {e}") from None
        return token

    def _list(self, rt: Resource, ns: str | None, q: dict[str, str]) -> JSON:
        """LIST with the resourceVersion/resourceVersionMatch/limit/continue semantics."""
        labels, fields = self._selectors(rt, q)
        rv_s = q.get("resourceVersion", "")
        rvm = q.get("resourceVersionMatch", "")
        cont = q.get("continue", "")
        limit = max(_int_param(q, "limit"), 0)
        errs: FieldTerms = []
        if rvm:
            if not rv_s:
                errs.append(("resourceVersionMatch", "Forbidden", "resourceVersionMatch is "
                             "forbidden unless resourceVersion is provided"))
            if cont:
                errs.append(("resourceVersionMatch", "Forbidden",
                             "resourceVersionMatch is forbidden when continue is provided"))
            if rvm not in ("Exact", "NotOlderThan"):
                errs.append(("resourceVersionMatch", "Unsupported value",
                             f'"{rvm}": supported values: "Exact", "NotOlderThan", ""'))
            elif rvm == "Exact" and rv_s == "0":
                errs.append(("resourceVersionMatch", "Forbidden",
                             'resourceVersionMatch "exact" is forbidden for resourceVersion "0"'))
        if q.get("sendInitialEvents") is not None:
            errs.append(("sendInitialEvents", "Forbidden",
                         "sendInitialEvents is forbidden for list"))
        if errs:
            raise _invalid_list_options(errs)
        if cont and rv_s not in ("", "0"):
            raise APIError(400, "BadRequest",
                           "specifying resource version is not allowed when using continue")
        rv_n = 0
        if rv_s not in ("", "0"):
            try:
                rv_n = int(rv_s)
                if rv_n < 0:
                    raise ValueError
            except ValueError:
                raise APIError(400, "BadRequest", f"invalid resource version: {rv_s!r}") from None
        start = ""
        with self._lock:
            now = time.monotonic()
            if cont:
                token = self._decode_continue(rt, cont)
                snap, start, taken = token["rv"], token["start"], float(token.get("taken", now))
                expired = (
                    token.get("epoch") != self._epoch
                    or now - taken > self.continue_ttl
                    or 0 <= snap < self._floor
                )
                if expired:
                    fresh = self._encode_continue(rt, -1, start, now)
                    raise APIError(410, "Expired", _CONTINUE_EXPIRED,
                                   list_meta={"continue": fresh})
                if snap < 0:  # an inconsistent continuation: carry on from the latest state
                    snap, taken = self._rv, now
            elif rv_s == "":
                snap, taken = self._rv, now
            elif rv_s == "0":
                snap, taken, limit = self._rv, now, 0  # the watch cache ignores limit for RV=0
            else:
                self._wait_for_rv(rv_n)
                exact = rvm == "Exact" or (rvm == "" and limit > 0)
                if exact and rv_n < self._floor:
                    raise APIError(410, "Expired",
                                   "The resourceVersion for the provided list is too old.")
                snap, taken = (rv_n if exact else self._rv), now
            state = self._state_at(rt, snap) if snap < self._rv else self._objects[rt.kind]
            keyed = sorted(
                ((f"{k[0]}/{k[1]}" if rt.namespaced else k[1], obj)
                 for k, obj in state.items() if ns is None or k[0] == ns),
                key=lambda pair: pair[0],
            )
            items: JSONList = []
            examined = 0
            for sort_key, obj in keyed:
                if limit and len(items) >= limit:
                    break
                if sort_key < start:
                    examined += 1
                    continue
                examined += 1
                if labels.matches((obj.get("metadata") or {}).get("labels")) and all(
                    (_field_value(obj, n) == v) == (op == "=") for n, op, v in fields
                ):
                    items.append(obj)
            remaining = len(keyed) - examined
            meta: JSON = {"resourceVersion": str(snap)}
            if limit and remaining > 0:
                last = keyed[examined - 1][0]
                meta["continue"] = self._encode_continue(rt, snap, last + "\x00", taken)
                if not labels and not fields:
                    meta["remainingItemCount"] = remaining
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta,
                "items": items}

    def _open_watch(
        self, rt: Resource, ns: str | None, q: dict[str, str], conn: socket.socket
    ) -> tuple[_Watcher | None, WatchEvents, JSON]:
        """Validate a watch and register it atomically with its initial events.

        Returns (watcher or None if the RV is too old, initial events, options).
        """
        labels, fields = self._selectors(rt, q)
        rv_s = q.get("resourceVersion", "")
        rvm = q.get("resourceVersionMatch", "")
        send_initial = _go_bool(q.get("sendInitialEvents"))
        bookmarks = bool(_go_bool(q.get("allowWatchBookmarks")))
        timeout = _int_param(q, "timeoutSeconds")
        errs: FieldTerms = []
        if send_initial is not None and rvm != "NotOlderThan":
            errs.append(("resourceVersionMatch", "Forbidden",
                         "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"))
        if rvm:
            if send_initial is None:
                errs.append(("resourceVersionMatch", "Forbidden",
                             "resourceVersionMatch is forbidden for watch unless "
                             "sendInitialEvents is provided"))
            if rvm != "NotOlderThan":
                errs.append(("resourceVersionMatch", "Unsupported value",
                             f'"{rvm}": supported values: "NotOlderThan"'))
        if errs:
            raise _invalid_list_options(errs)
        rv_n: int | None = None
        if rv_s not in ("", "0"):
            try:
                rv_n = int(rv_s)
                if rv_n < 0:
                    raise ValueError
            except ValueError:
                raise APIError(400, "BadRequest", f"invalid resource version: {rv_s!r}") from None
        opts: JSON = {
            "bookmarks": bookmarks,
            "timeout": timeout if timeout > 0 else random.uniform(*self.watch_timeout_range),
        }
        w = _Watcher(rt, ns, labels, fields, conn)
        initial: WatchEvents = []
        with self._lock:
            if rv_n is not None:
                self._wait_for_rv(rv_n)
            state_now = send_initial is True or (send_initial is None and rv_n is None)
            if state_now:
                for k in sorted(self._objects[rt.kind]):
                    obj = self._objects[rt.kind][k]
                    if w.matches(obj):
                        initial.append(("ADDED", obj))
                if send_initial and bookmarks:
                    mark = self._bookmark(rt, self._rv)
                    mark["metadata"]["annotations"] = {"k8s.io/initial-events-end": "true"}
                    initial.append(("BOOKMARK", mark))
            elif rv_n is not None:
                if rv_n < self._floor:
                    opts["expired"] = APIError(
                        410, "Expired", f"too old resource version: {rv_n} ({self._floor})"
                    ).status()
                    return None, [], opts
                for ev in self._history:
                    if ev.rv > rv_n and ev.rt is rt:
                        out = w.convert(ev)
                        if out is not None:
                            initial.append(out)
            self._watchers.append(w)
        return w, initial, opts

    def _close_watch(self, w: _Watcher) -> None:
        with self._lock:
            if w in self._watchers:
                self._watchers.remove(w)

    @staticmethod
    def _bookmark(rt: Resource, rv: int) -> JSON:
        return {"kind": rt.kind, "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(rv)}, **copy.deepcopy(rt.zero)}

    def _next_bookmark(self, now: float, deadline: float) -> float | None:
        """When the next BOOKMARK is due, following the cacheWatcher's nextBookmarkTime."""
        when = min(now + self.bookmark_interval, deadline - self.bookmark_before_timeout)
        return None if when < now else when

    def _drain(self, w: _Watcher, wait: float) -> tuple[WatchEvents, bool, int]:
        """Wait up to ``wait`` for events; return (events, cut, current RV) atomically."""
        with self._cond:
            if not w.queue and not w.cut and wait > 0:
                self._cond.wait(wait)
            events = list(w.queue)
            w.queue.clear()
            return events, w.cut, self._rv

    def _post_event(self, ns: str, body: JSON, group: str) -> JSON:
        obj = dict(body) if isinstance(body, dict) else {}
        meta = dict(obj.get("metadata") or {})
        meta.setdefault("name", f"{meta.get('generateName', 'event.')}{uuid.uuid4().hex[:10]}")
        meta["namespace"] = ns
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now_rfc3339())
        with self._lock:
            meta["resourceVersion"] = str(self._rv)
            obj["metadata"] = meta
            obj["kind"] = "Event"
            obj["apiVersion"] = f"{group}/v1" if group else "v1"
            self._events.append(copy.deepcopy(obj))
        return obj


def _resource(kind: str) -> Resource:
    try:
        return RESOURCES[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(RESOURCES)}") from None


def _default_endpointslice(eps: JSON) -> None:
    """discovery/v1 defaulting, and the null-ness a real server shows.

    ``endpoints`` and ``ports`` have no omitempty and storage is protobuf, so an empty or
    missing list comes back as JSON null; kube-proxy must cope with that.
    """
    for name in ("endpoints", "ports"):
        if eps.get(name) in (None, []):
            eps[name] = None
    for p in eps.get("ports") or []:
        if isinstance(p, dict):
            if p.get("name") is None:
                p["name"] = ""
            if p.get("protocol") is None:
                p["protocol"] = "TCP"


def _abort(conn: socket.socket) -> None:
    """Cut a connection at once (FIN both ways) so the peer sees it without our help."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------------------------
# Discovery documents
# --------------------------------------------------------------------------------------------


def _api_resource(rt: Resource, name: str | None = None) -> JSON:
    return {
        "name": name or rt.plural,
        "singularName": "" if name else rt.singular,
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": ["get", "patch", "update"] if name else list(_VERBS),
        **({"shortNames": list(rt.short_names)} if rt.short_names and not name else {}),
    }


def _event_resource() -> JSON:
    return {"name": "events", "singularName": "event", "namespaced": True, "kind": "Event",
            "verbs": list(_VERBS), "shortNames": ["ev"]}


def _resource_list(group: str) -> JSON:
    resources: list[JSON] = []
    for rt in sorted(RESOURCES.values(), key=lambda r: r.plural):
        if rt.group == group:
            resources.append(_api_resource(rt))
            if rt.kind in ("Service", "Node"):
                resources.append(_api_resource(rt, f"{rt.plural}/status"))
    if group in ("", "events.k8s.io"):
        resources.append(_event_resource())
        resources.sort(key=lambda r: r["name"])
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/v1" if group else "v1", "resources": resources}


def _api_group(group: str) -> JSON:
    gv = {"groupVersion": f"{group}/v1", "version": "v1"}
    return {"name": group, "versions": [gv], "preferredVersion": gv}


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


def in_netns(name: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a thread switched into network namespace ``name``.

    Sockets keep the namespace they were created in, so a listening socket made
    here serves that namespace while the rest of the test process stays where
    it is. setns() applies to the calling thread only, hence the throwaway thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[_T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with open(f"/run/netns/{name}", "rb") as f:
                if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    t = threading.Thread(target=run, name=f"netns-{name}")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


class _HTTPServer(ThreadingHTTPServer):
    """Daemon handler threads that are never joined: a hung watch must not block go_down()."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    api: FakeKubeAPI

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # clients and fault injection drop connections all the time
        traceback.print_exc()


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP/1.1 connection's requests to the FakeKubeAPI."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    # -- connection bookkeeping (so go_down() can drop every connection) --

    def setup(self) -> None:
        super().setup()
        with self.server.api._lock:
            self.server.api._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.api._lock:
            self.server.api._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet; the request log is ``FakeKubeAPI.requests``."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- responses --

    def _send_json(self, code: int, body: JSON, headers: dict[str, str] | None = None) -> None:
        data = _dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _read_body(self) -> JSON | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0:
            return None
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "BadRequest", "the request body is not valid JSON") from None
        return body if isinstance(body, dict) else None

    # -- dispatch --

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        api._log_request(method, self.path)
        try:
            try:
                body = self._read_body()
            except APIError as e:
                self._send_json(e.code, e.status())
                return
            fault = api._take_fault(self.path)
            if fault is not None and fault.hang is not None and api._release.wait(fault.hang):
                self.close_connection = True  # the server went down while we hung
                return
            if fault is not None and fault.status is not None:
                self._send_fault(fault)
                return
            if api.require_auth and self.headers.get("Authorization") != f"Bearer {api.token}":
                raise APIError(401, "Unauthorized", "Unauthorized")
            split = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            self._route(method, split.path, q, body)
        except APIError as e:
            with contextlib.suppress(OSError):
                self._send_json(e.code, e.status(), e.headers)
        except OSError:
            self.close_connection = True

    def _send_fault(self, fault: _Fault) -> None:
        assert fault.status is not None
        headers: dict[str, str] = {}
        details: JSON | None = None
        if fault.retry_after is not None:
            ra = fault.retry_after
            headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            details = {"retryAfterSeconds": math.ceil(ra)}
        err = APIError(fault.status, fault.reason, fault.message, details=details,
                       headers=headers)
        self._send_json(err.code, err.status(), err.headers)

    def _route(self, method: str, path: str, q: dict[str, str], body: JSON | None) -> None:
        parts = [p for p in path.split("/") if p]
        if method == "GET":
            doc = self._discovery(parts)
            if doc is not None:
                if isinstance(doc, str):
                    self._send_text(200, doc)
                else:
                    self._send_json(200, doc)
                return
        if len(parts) >= 2 and parts[0] == "api" and parts[1] == "v1":
            group, rest = "", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis" and parts[1] in _GROUPS and parts[2] == "v1":
            group, rest = parts[1], parts[3:]
        else:
            raise APIError(404)
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise APIError(404)
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if plural == "events" and group in ("", "events.k8s.io") and ns is not None:
            self._events(method, group, ns, name, body)
            return
        rt = _BY_PATH.get((group, plural))
        if rt is None or sub not in (None, "status"):
            raise APIError(404)
        if (ns is not None and not rt.namespaced) or (ns is None and name and rt.namespaced):
            raise APIError(404)
        if name is None:
            self._collection(method, rt, ns, q, body)
        else:
            self._item(method, rt, ns or "", name, body)

    def _discovery(self, parts: list[str]) -> JSON | str | None:
        api = self.server.api
        if parts == ["version"]:
            return dict(api.version_info)
        if len(parts) == 1 and parts[0] in ("healthz", "livez", "readyz"):
            return "ok"
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{api.port}"}]}
        if parts == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [_api_group(g) for g in _GROUPS]}
        if parts == ["api", "v1"]:
            return _resource_list("")
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in _GROUPS:
            return {"kind": "APIGroup", "apiVersion": "v1", **_api_group(parts[1])}
        if len(parts) == 3 and parts[0] == "apis" and parts[1] in _GROUPS and parts[2] == "v1":
            return _resource_list(parts[1])
        if not parts:
            return {"paths": ["/api", "/api/v1", "/apis", "/healthz", "/version"]
                    + [f"/apis/{g}" for g in _GROUPS] + [f"/apis/{g}/v1" for g in _GROUPS]}
        return None

    def _collection(
        self, method: str, rt: Resource, ns: str | None, q: dict[str, str], body: JSON | None
    ) -> None:
        api = self.server.api
        if method == "GET":
            if _go_bool(q.get("watch")):
                self._watch(rt, ns, q)
            else:
                self._send_json(200, api._list(rt, ns, q))
            return
        if method == "POST" and body is not None and (ns is not None or not rt.namespaced):
            meta = dict(body.get("metadata") or {})
            if rt.namespaced:
                meta["namespace"] = ns
            obj = {**body, "kind": rt.kind, "metadata": meta}
            try:
                created = api.create(obj)
            except ValueError as e:
                raise APIError(409, "AlreadyExists", str(e),
                               details={"name": meta.get("name"), "kind": rt.plural}) from None
            self._send_json(201, created)
            return
        raise APIError(405)

    def _item(self, method: str, rt: Resource, ns: str, name: str, body: JSON | None) -> None:
        api = self.server.api
        try:
            if method == "GET":
                obj = api.get(rt.kind, ns, name)
                if obj is None:
                    raise KeyError(name)
                self._send_json(200, obj)
            elif method == "PUT" and body is not None:
                meta = {**(body.get("metadata") or {}), "name": name}
                if rt.namespaced:
                    meta["namespace"] = ns
                self._send_json(200, api.update({**body, "kind": rt.kind, "metadata": meta}))
            elif method == "DELETE":
                self._send_json(200, api.delete(rt.kind, ns, name))
            else:
                raise APIError(405)
        except KeyError:
            raise _not_found(rt, name) from None

    def _events(
        self, method: str, group: str, ns: str, name: str | None, body: JSON | None
    ) -> None:
        """Events are accepted and dropped: kube-proxy only ever writes them."""
        api = self.server.api
        if method == "GET":
            if name is not None:
                raise APIError(404, "NotFound", f'events "{name}" not found')
            self._send_json(200, {"kind": "EventList", "apiVersion": f"{group}/v1" if group
                                  else "v1", "metadata": {"resourceVersion": api.resource_version},
                                  "items": []})
        elif method == "POST" and name is None:
            self._send_json(201, api._post_event(ns, body or {}, group))
        elif method in ("PUT", "PATCH") and name is not None:
            obj = {**(body or {}), "metadata": {**((body or {}).get("metadata") or {}),
                                                "name": name}}
            self._send_json(200, api._post_event(ns, obj, group))
        elif method == "DELETE" and name is not None:
            self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Success", "details": {"name": name, "kind": "events"}})
        else:
            raise APIError(405)

    def _watch(self, rt: Resource, ns: str | None, q: dict[str, str]) -> None:
        """Serve one watch stream: chunked, newline-delimited JSON, flushed per event."""
        api = self.server.api
        started = time.monotonic()
        watcher, initial, opts = api._open_watch(rt, ns, q, self.connection)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if watcher is None:
                self._chunk(_dumps({"type": "ERROR", "object": opts["expired"]}) + b"\n")
                self._chunk(b"")
                return
            for etype, obj in initial:
                self._emit(rt, etype, obj)
            if self._stream(api, rt, watcher, started, opts):
                self._chunk(b"")  # clean end: the terminating zero-length chunk
            else:
                self.close_connection = True
        except OSError:
            self.close_connection = True
        finally:
            if watcher is not None:
                api._close_watch(watcher)

    def _emit(self, rt: Resource, etype: str, obj: JSON) -> None:
        if etype != "BOOKMARK":
            obj = _with_type(rt, obj)
        self._chunk(_dumps({"type": etype, "object": obj}) + b"\n")

    def _stream(
        self, api: FakeKubeAPI, rt: Resource, w: _Watcher, started: float, opts: JSON
    ) -> bool:
        """Pump events until timeout (True: end cleanly) or a cut/closed client (False)."""
        deadline = started + float(opts["timeout"])
        now = time.monotonic()
        next_mark = api._next_bookmark(now, deadline) if opts["bookmarks"] else None
        next_poll = now + _WATCH_POLL
        while True:
            now = time.monotonic()
            wake = min(deadline, next_poll, next_mark if next_mark is not None else deadline)
            events, cut, rv = api._drain(w, wake - now)
            if cut:
                return False
            for etype, obj in events:
                self._emit(rt, etype, obj)
            now = time.monotonic()
            if now >= deadline:
                return True
            if next_mark is not None and now >= next_mark:
                # Every event up to rv was drained in the same critical section: safe to mark.
                self._emit(rt, "BOOKMARK", api._bookmark(rt, rv))
                next_mark = api._next_bookmark(now, deadline)
            if now >= next_poll:
                next_poll = now + _WATCH_POLL
                if self._client_gone():
                    return False

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
