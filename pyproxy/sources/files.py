"""A directory of YAML manifests as a source of Services, EndpointSlices and Nodes.

For standalone runs, the demo, `pyproxy plan` and `pyproxy trace`: the same
objects the API would serve, read from files. Multi-document files and
``kind: List`` both work; a file that does not parse is named and skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class Manifests:
    services: list[dict[str, Any]] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def node(self, name: str) -> dict[str, Any] | None:
        for obj in self.nodes:
            meta = obj.get("metadata")
            if isinstance(meta, Mapping) and meta.get("name") == name:
                return obj
        return None


def _files(directory: Path) -> list[Path]:
    if directory.is_file():
        return [directory]
    # Hidden paths are skipped: a mounted ConfigMap keeps a copy of every file
    # under `..<timestamp>/`, which would otherwise be read twice.
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _objects(doc: Any) -> Iterator[Any]:
    # `kind: List`, and the typed lists (ServiceList, ...) that `kubectl get -o yaml` writes.
    if isinstance(doc, Mapping) and str(doc.get("kind", "")).endswith("List"):
        # A saved API LIST response's items carry no `kind`: the typed list names it.
        item_kind = str(doc["kind"])[: -len("List")]
        for item in doc.get("items") or []:
            if item_kind and isinstance(item, Mapping) and "kind" not in item:
                item = {**item, "kind": item_kind}
            yield from _objects(item)
    elif doc is not None:
        yield doc


def load(directory: str | os.PathLike[str]) -> Manifests:
    """Read every manifest under ``directory`` (or one file)."""
    root = Path(directory)
    out = Manifests()
    if not root.exists():
        raise FileNotFoundError(f"manifests directory {root} does not exist")
    for path in _files(root):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            msg = f"{path}: cannot read: {err}"
            log.warning("skipping unreadable manifest", extra={"file": str(path),
                                                                "reason": str(err)})
            out.errors.append(msg)
            continue
        for doc in docs:
            for obj in _objects(doc):
                if not isinstance(obj, Mapping):
                    out.errors.append(f"{path}: a document is not a mapping")
                    log.warning("skipping non-object document", extra={"file": str(path)})
                    continue
                kind = obj.get("kind")
                if kind == "Service":
                    out.services.append(dict(obj))
                elif kind == "EndpointSlice":
                    out.slices.append(dict(obj))
                elif kind == "Node":
                    out.nodes.append(dict(obj))
    return out


def fingerprint(directory: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detection for `run` without --once: names, sizes and mtimes."""
    root = Path(directory)
    entries = []
    for path in _files(root) if root.exists() else []:
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(entries)
