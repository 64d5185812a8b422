"""Pod source for the lab: a local directory of Kubernetes-shaped Namespace and Pod objects.

One JSON or YAML file per object (a `kind: List` or a multi-document YAML file works too). The directory
is watched with inotify (`dir_events`): a file written, renamed into place or removed is re-read at once,
alone (a burst of writes is gathered first; the other files are not looked at), and every file's stat is
compared again every `rescan` seconds as a backstop (then only files whose size or mtime changed are
parsed again). Without inotify it is polled every `interval`. The whole set then replaces the store's
content, so the events are the same as a Kubernetes re-list. A file that fails to parse is reported with
a warning naming it and keeps serving what it held when it last parsed (a file caught half-written does
not drop its pods; its close or rename is another event, and then it is read whole); the other files are
served as usual. Hidden files (an editor's or tool's temporary file before the rename) are ignored.

Every file is read within the limits of `cni.contract.object_files`: at most 2 MiB, at most 200 000 YAML
nodes with aliases expanded (an alias bomb is refused while it is parsed, in milliseconds), JSON not
nested too deep.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cni.contract.kube_objects import Namespace, ObjectError, Pod, namespace_from_object, pod_from_object
from cni.contract.object_files import load_json, load_yaml_all, read_text
from node_agent.sources.dir_events import DirEvents
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


Signature = tuple[tuple[str, int, int], ...]


def _signature(directory: Path) -> Signature:
    out = []
    for path in directory.iterdir():
        if path.suffix not in SUFFIXES or path.name.startswith("."):
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        out.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))


class ObjectsDirSource:
    def __init__(self, store: PodStore, directory: Path, node_name: str = "", interval: float = 0.3,
                 rescan: float = 10.0, use_inotify: bool = True) -> None:
        """interval: the poll without inotify; rescan: the backstop look at every file with inotify."""
        self._store = store
        self.directory = directory
        self.node_name = node_name
        self.interval = interval
        self.rescan = rescan
        self._use_inotify = use_inotify
        self._events: DirEvents | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: Signature | None = None
        self._files: dict[str, tuple[int, int]] = {}  # name -> (mtime, size) when last read
        self._last_good: FileObjects = {}
        self._pod_files: dict[tuple[str, str], str] = {}  # (namespace, name) -> the file it was read from
        self.loads = 0

    @property
    def using_inotify(self) -> bool:
        return self._events is not None

    def poll_once(self, named: Iterable[str] = ()) -> bool:
        """Re-read what changed (and the files named by an event, whatever their stat says); True when
        anything did."""
        forced = {n for n in named if Path(n).suffix in SUFFIXES and not n.startswith(".")}
        try:
            sig = _signature(self.directory)
        except OSError as exc:
            log.warning("objects dir unreadable: %s", exc, extra={"step": "objects-poll"})
            return False
        if sig == self._last and not forced:
            return False
        self._last = sig
        stale = [(name, (mtime, size)) for name, mtime, size in sig
                 if name in forced or self._files.get(name) != (mtime, size)]
        present = {name for name, _m, _s in sig}
        gone = (set(self._last_good) | set(self._files)) - present
        if not stale and not gone and self.loads:
            return False  # what changed was read already (an event named it)
        for name, seen in stale:
            self._read_file(name, seen)
        for name in gone:
            self._last_good.pop(name, None)
            self._files.pop(name, None)
        self._publish()
        return True

    def read_named(self, named: Iterable[str]) -> bool:
        """Re-read only the files an event named (written, renamed in, removed), without looking at the
        others: an event costs one file, not the directory. True when any was a candidate."""
        names = {n for n in named if Path(n).suffix in SUFFIXES and not n.startswith(".") and "/" not in n}
        for name in sorted(names):
            try:
                st = (self.directory / name).stat()
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                self._last_good.pop(name, None)
                self._files.pop(name, None)
                continue
            self._read_file(name, (st.st_mtime_ns, st.st_size))
        if names:
            self._publish()
        return bool(names)

    def _publish(self) -> None:
        """Every file's last good content into the store (replaced whole: the events of a re-list)."""
        pods: list[Pod] = []
        namespaces: list[Namespace] = []
        pod_files: dict[tuple[str, str], str] = {}
        for name in sorted(self._last_good):
            pods.extend(self._last_good[name][0])
            namespaces.extend(self._last_good[name][1])
            for p in self._last_good[name][0]:
                pod_files.setdefault((p.namespace, p.name), name)
        self._pod_files = pod_files  # replaced whole: file_of reads it from another thread
        self._store.replace_namespaces(namespaces)
        self._store.replace_pods(pods)
        self.loads += 1

    def file_of(self, namespace: str, name: str) -> str | None:
        """The file the pod was last read from (any thread), or None."""
        return self._pod_files.get((namespace, name))

    def _read_file(self, name: str, seen: tuple[int, int]) -> None:
        self._files[name] = seen
        try:
            self._last_good[name] = read_object_file(self.directory / name, self.node_name)
        except (OSError, ValueError, ObjectError) as exc:  # ObjectFileError is a ValueError
            kept = name in self._last_good
            log.warning("skipping %s: %s%s", name, str(exc)[:300], " (its last good content is kept)" if kept else "",
                        extra={"step": "objects-parse", "file": name})

    def _run(self) -> None:
        next_rescan = time.monotonic() + self.rescan
        while not self._stop.is_set():
            events = self._events
            if events is None:
                self._stop.wait(self.interval)
                self.poll_once()
                continue
            names = events.wait(max(0.0, next_rescan - time.monotonic()))  # `stop` wakes it
            if self._stop.is_set():
                return
            if names is None or time.monotonic() >= next_rescan:
                self.poll_once(names or ())  # every file's stat compared with the one last read
                next_rescan = time.monotonic() + self.rescan
            elif names:
                self.read_named(names)

    def start(self) -> None:
        if self._use_inotify:
            self._events = DirEvents.open(str(self.directory))
        if self._events is not None:
            log.info("objects dir watched (inotify; every file's stat again every %g s)", self.rescan,
                     extra={"step": "objects-watch"})
        elif self._use_inotify:
            log.warning("inotify unavailable: the objects dir is polled every %g s", self.interval,
                        extra={"step": "objects-watch"})
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="objects-dir", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._events is not None:
            self._events.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._events is not None:
            self._events.close()
            self._events = None
