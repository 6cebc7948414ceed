"""Current Services and EndpointSlices, and which Services changed since the last sync.

As kube-proxy's change trackers: a Service that changed and changed back
between two syncs is not reported, so flapping costs nothing. Sources feed raw
API dicts; invalid ones are reported once, named, and treated as absent, so
what is programmed always equals what `pyproxy plan` computes from the same
objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyproxy.model import (
    Endpoint,
    EndpointSlice,
    InvalidObject,
    IPFamily,
    Service,
    ServicePort,
    ServicePortName,
    merge_endpoints,
    parse_endpoint_slice,
    parse_service,
)

log = logging.getLogger(__name__)

ServiceKey = tuple[str, str]  # (namespace, name)
PortMap = dict[ServicePortName, ServicePort]
EndpointsMap = dict[ServicePortName, tuple[Endpoint, ...]]
# One Service's ports and their endpoints as a checkout hands them out, sorted by port name.
Handed = tuple[tuple[ServicePortName, ServicePort, tuple[Endpoint, ...]], ...]


def report_invalid(err: InvalidObject) -> None:
    log.warning(
        "skipping invalid object",
        extra={"kind": err.kind, "object": err.key, "field": err.field_path,
               "reason": err.message},
    )


@dataclass(frozen=True)
class Snapshot:
    """What a planner needs: every service port and its endpoints, plus what changed."""

    services: Mapping[ServicePortName, ServicePort]
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]]
    changed: frozenset[ServiceKey]
    # The service ports of the changed Services, before and after: what a planner redoes.
    changed_ports: frozenset[ServicePortName] = frozenset()


@dataclass
class ChangeTracker:
    node_name: str
    family: IPFamily = IPFamily.IPv4
    on_invalid: Callable[[InvalidObject], None] = report_invalid
    _services: dict[ServiceKey, Service] = field(default_factory=dict)
    _slices: dict[ServiceKey, dict[str, EndpointSlice]] = field(default_factory=dict)
    _slice_owner: dict[tuple[str, str], ServiceKey] = field(default_factory=dict)
    _pending: set[ServiceKey] = field(default_factory=set)
    # What the last checkout handed out, per service: the collapse baseline. One tuple per
    # Service, not a dict of ports and a dict of endpoints (~4 MB more at 10,000 Services).
    _handed: dict[ServiceKey, Handed] = field(default_factory=dict)
    _all_ports: PortMap = field(default_factory=dict)
    _all_eps: EndpointsMap = field(default_factory=dict)

    # -- feeding -----------------------------------------------------------

    def set_service(self, obj: Any) -> None:
        key = _key_of(obj)
        try:
            svc = parse_service(obj)
        except InvalidObject as err:
            self.on_invalid(err)
            svc = None
        if key is None:
            return
        if svc is None:
            self.delete_service(*key)
            return
        key = svc.key  # the same names, as the model holds them (the object's are let go)
        if self._services.get(key) != svc:
            self._services[key] = svc
            self._pending.add(key)

    def delete_service(self, namespace: str, name: str) -> None:
        if self._services.pop((namespace, name), None) is not None:
            self._pending.add((namespace, name))

    def set_slice(self, obj: Any) -> None:
        key = _key_of(obj)
        try:
            sl = parse_endpoint_slice(obj)
        except InvalidObject as err:
            self.on_invalid(err)
            sl = None
        if key is None:
            return
        if sl is None or sl.family is not self.family:
            self.delete_slice(*key)
            return
        key = (sl.namespace, sl.name)  # as in set_service
        owner = self._slice_owner.get(key)
        if owner is not None and owner != sl.service_key:
            self.delete_slice(*key)  # the slice moved to another Service
        slices = self._slices.setdefault(sl.service_key, {})
        if slices.get(sl.name) != sl:
            slices[sl.name] = sl
            self._slice_owner[key] = sl.service_key
            self._pending.add(sl.service_key)

    def delete_slice(self, namespace: str, name: str) -> None:
        owner = self._slice_owner.pop((namespace, name), None)
        if owner is None:
            return
        slices = self._slices.get(owner, {})
        if slices.pop(name, None) is not None:
            self._pending.add(owner)
        if not slices:
            self._slices.pop(owner, None)

    def replace(self, services: Iterable[Any], slices: Iterable[Any]) -> None:
        """Make the current state exactly these objects (a manifests reload)."""
        self.replace_services(services)
        self.replace_slices(slices)

    def replace_services(self, objects: Iterable[Any]) -> None:
        """Services are exactly these now (a relist): the rest were deleted meanwhile."""
        seen: set[ServiceKey] = set()
        for obj in objects:
            self.set_service(obj)
            key = _key_of(obj)
            if key is not None:
                seen.add(key)
        for key in [k for k in self._services if k not in seen]:
            self.delete_service(*key)

    def replace_slices(self, objects: Iterable[Any]) -> None:
        seen: set[tuple[str, str]] = set()
        for obj in objects:
            self.set_slice(obj)
            key = _key_of(obj)
            if key is not None:
                seen.add(key)
        for key in [k for k in self._slice_owner if k not in seen]:
            self.delete_slice(*key)

    # -- draining ----------------------------------------------------------

    def checkout_all(self) -> Snapshot:
        """A checkout for a full sync of a new dataplane: every port counts as changed."""
        snap = self.checkout()
        return Snapshot(snap.services, snap.endpoints, frozenset(self._handed),
                        frozenset(snap.services))

    @property
    def snapshot(self) -> Snapshot:
        """What the last checkout handed out (without taking pending changes)."""
        return Snapshot(self._all_ports, self._all_eps, frozenset())

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def checkout(self) -> Snapshot:
        """Fold pending changes into the snapshot; report the services that really changed."""
        changed: set[ServiceKey] = set()
        changed_ports: set[ServicePortName] = set()
        for key in self._pending:
            now, before = self._compute(key), self._handed.get(key, ())
            if now == before:
                continue
            for spn, _, _ in before:
                changed_ports.add(spn)
                self._all_ports.pop(spn, None)
                self._all_eps.pop(spn, None)
            for spn, port, eps in now:
                changed_ports.add(spn)
                self._all_ports[spn] = port
                self._all_eps[spn] = eps
            if now:
                self._handed[key] = now
            else:
                self._handed.pop(key, None)
            changed.add(key)
        self._pending.clear()
        return Snapshot(self._all_ports, self._all_eps, frozenset(changed),
                        frozenset(changed_ports))

    def _compute(self, key: ServiceKey) -> Handed:
        svc = self._services.get(key)
        if svc is None:
            return ()
        by_port = merge_endpoints(self._slices.get(key, {}).values(), self.node_name)
        return tuple(sorted(
            ((sp.name, sp, by_port.get((sp.name.port, sp.protocol), ()))
             for sp in svc.ports_for(self.family)),
            key=_port_name))


def _port_name(handed: tuple[ServicePortName, ServicePort, tuple[Endpoint, ...]]
               ) -> ServicePortName:
    return handed[0]


def _key_of(obj: Any) -> tuple[str, str] | None:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    ns, name = meta.get("namespace"), meta.get("name")
    if not isinstance(ns, str) or not isinstance(name, str):
        return None
    return (ns, name)
