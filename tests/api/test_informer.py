"""The informer's list, streamed a page at a time into the handler, against the tests' API server.

Streaming keeps the agent's memory flat at 10,000 EndpointSlices, but a list
can now fail half handed over: the continue token expires between pages. The
handler must then end up exactly where a whole list would have left it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from pyproxy.sources import kube
from tests.api.server import FakeKubeAPI
from tests.api.test_server import svc


class Store:
    """A handler with the tracker's replace semantics: set each object, then drop the rest."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.pages_seen: list[int] = []  # how many objects the store held as each arrived

    def replace(self, objects: Iterable[dict[str, Any]]) -> None:
        seen = set()
        for obj in objects:
            name = obj["metadata"]["name"]
            self.objects[name] = obj
            seen.add(name)
            self.pages_seen.append(len(self.objects))
        for name in set(self.objects) - seen:
            del self.objects[name]

    def apply(self, event_type: str, obj: dict[str, Any]) -> None:
        raise AssertionError("no watch in these tests")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeKubeAPI, client.CoreV1Api]]:
    with FakeKubeAPI() as server:
        for i in range(7):
            server.create(svc(f"s{i}"))
        api_client = kube.api_client(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
        yield server, client.CoreV1Api(api_client)
        api_client.close()


def test_a_streamed_list_reaches_the_handler_before_it_ends(
        api: tuple[FakeKubeAPI, client.CoreV1Api]) -> None:
    server, core = api
    store = Store()
    informer = kube.Informer("services", core.list_service_for_all_namespaces, store,
                             page_size=2, stream_list=True)
    count, version = informer.relist()
    assert count == 7 and sorted(store.objects) == [f"s{i}" for i in range(7)]
    assert version  # the list's resourceVersion, for the watch that follows
    assert store.pages_seen == [1, 2, 3, 4, 5, 6, 7]  # handed over as it came


def test_an_expired_continue_token_mid_stream_lists_again_and_drops_the_deleted(
        api: tuple[FakeKubeAPI, client.CoreV1Api]) -> None:
    server, core = api
    store = Store()
    real_list = core.list_service_for_all_namespaces
    calls = 0

    def list_fn(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # between the first and second page: s0 goes, and every token expires
            server.delete("Service", "default", "s0")
            server.compact()
        return real_list(**kwargs)

    informer = kube.Informer("services", list_fn, store, page_size=2, stream_list=True)
    count, _ = informer.relist()
    assert count == 6
    assert sorted(store.objects) == [f"s{i}" for i in range(1, 7)]  # s0 was handed over, then went
    assert calls > 4  # the first list failed part way and a second one ran from the start


def test_the_handlers_lock_is_let_go_while_the_next_page_is_fetched(
        api: tuple[FakeKubeAPI, client.CoreV1Api]) -> None:
    server, core = api
    lock = threading.RLock()
    store = Store()
    free_while_fetching: list[bool] = []
    real_list = core.list_service_for_all_namespaces

    def list_fn(**kwargs: Any) -> Any:
        # What a sync (another thread) would find while this page is on its way.
        took: list[bool] = []

        def sync() -> None:
            took.append(lock.acquire(timeout=2))
            if took[0]:
                lock.release()

        other = threading.Thread(target=sync)
        other.start()
        other.join()
        free_while_fetching.append(took[0])
        return real_list(**kwargs)

    handler = kube.CallbackHandler(lambda _o: None, lambda _o: None, store.replace, lock)
    informer = kube.Informer("services", list_fn, handler, page_size=3, stream_list=True)
    count, _ = informer.relist()
    assert count == 7 and len(store.objects) == 7
    assert free_while_fetching == [True, True, True]  # every page, the first included
