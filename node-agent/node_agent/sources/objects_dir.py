"""Pod source for the lab: a local directory of Kubernetes-shaped Namespace and Pod objects.

One JSON or YAML file per object (a `kind: List` or a multi-document YAML file works too). The directory
is polled (cheap: a stat per file) and re-read whenever a file's size or mtime changes, is added or is
removed; the whole set then replaces the store's content, so the events are the same as a Kubernetes
re-list. A file that fails to parse is reported with a warning naming it and keeps serving what it
held when it last parsed (a file caught half-written does not drop its pods); the other files are served
as usual.

Every file is read within the limits of `cni.contract.object_files`: at most 2 MiB, at most 200 000 YAML
nodes with aliases expanded (an alias bomb is refused while it is parsed, in milliseconds), JSON not
nested too deep.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cni.contract.kube_objects import Namespace, ObjectError, Pod, namespace_from_object, pod_from_object
from cni.contract.object_files import load_json, load_yaml_all, read_text
from node_agent.sources.store import PodStore

log = logging.getLogger("headrace.agent.objects")

SUFFIXES = (".json", ".yaml", ".yml")


def _documents(path: Path) -> list[Any]:
    text = read_text(str(path))
    if path.suffix == ".json":
        return [load_json(text, path.name)]
    return load_yaml_all(text, path.name)


def _objects(doc: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(doc, dict):
        return
    if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
        for item in doc.get("items") or []:
            if isinstance(item, dict):
                yield item
        return
    yield doc


def read_object_file(path: Path, node_name: str = "") -> tuple[list[Pod], list[Namespace]]:
    """The pods and namespaces of one file; pods scheduled to another node (spec.nodeName set and
    different) skipped. Raises OSError, ValueError or ObjectError for a file that cannot be used."""
    pods: list[Pod] = []
    namespaces: list[Namespace] = []
    for doc in _documents(path):
        for obj in _objects(doc):
            kind = obj.get("kind")
            if kind == "Pod":
                pod = pod_from_object(obj)
                if node_name and pod.node_name and pod.node_name != node_name:
                    continue
                pods.append(pod)
            elif kind == "Namespace":
                namespaces.append(namespace_from_object(obj))
    return pods, namespaces


FileObjects = dict[str, tuple[list[Pod], list[Namespace]]]


def read_objects_dir(directory: Path, node_name: str = "",
                     last_good: FileObjects | None = None) -> tuple[list[Pod], list[Namespace]]:
    """Parse every object file. A file that fails to parse is skipped with a warning naming it; with
    `last_good` (updated in place) it keeps serving what it held when it last parsed, so a file caught
    half-written does not make its pods disappear for a moment."""
    pods: list[Pod] = []
    namespaces: list[Namespace] = []
    seen: set[str] = set()
    for path in sorted(directory.iterdir()):
        if path.suffix not in SUFFIXES or not path.is_file() or path.name.startswith("."):
            continue
        seen.add(path.name)
        try:
            content = read_object_file(path, node_name)
        except (OSError, ValueError, ObjectError) as exc:  # ObjectFileError is a ValueError
            kept = last_good.get(path.name) if last_good is not None else None
            log.warning("skipping %s: %s%s", path.name, str(exc)[:300],
                        " (its last good content is kept)" if kept else "",
                        extra={"step": "objects-parse", "file": path.name})
            if kept is None:
                continue
            content = kept
        if last_good is not None:
            last_good[path.name] = content
        pods.extend(content[0])
        namespaces.extend(content[1])
    if last_good is not None:
        for gone in set(last_good) - seen:
            del last_good[gone]
    return pods, namespaces


def _signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in directory.iterdir():
        if path.suffix not in SUFFIXES or path.name.startswith("."):
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))


class ObjectsDirSource:
    def __init__(self, store: PodStore, directory: Path, node_name: str = "", interval: float = 0.3) -> None:
        self._store = store
        self.directory = directory
        self.node_name = node_name
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[tuple[str, int, int], ...] | None = None
        self._last_good: FileObjects = {}
        self.loads = 0

    def poll_once(self) -> bool:
        """Re-read the directory if anything changed; True when it did."""
        try:
            sig = _signature(self.directory)
        except OSError as exc:
            log.warning("objects dir unreadable: %s", exc, extra={"step": "objects-poll"})
            return False
        if sig == self._last:
            return False
        self._last = sig
        pods, namespaces = read_objects_dir(self.directory, self.node_name, self._last_good)
        self._store.replace_namespaces(namespaces)
        self._store.replace_pods(pods)
        self.loads += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="objects-dir", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
