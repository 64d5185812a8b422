"""Pods and namespaces as the agent sees them, and the thread-safe cache the pod sources fill.

Both sources (Kubernetes watch, objects dir) turn Kubernetes-shaped dicts into `Pod` and `Namespace` values
with the one parser, `cni.contract.kube_objects` (shared with the CNI plugin), and push them into one
`PodStore`; the reconcile loop reads a consistent snapshot and is woken on every change that matters to
it. A change of a pod's `ambient.istio.io/redirection` annotation alone (what the agent itself writes
back once a pod is enrolled) is quiet: only listeners subscribed with `quiet=True` (the annotation
writer) hear of it, so each write-back does not start another reconcile pass over every pod.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cni.contract.kube_objects import Namespace, Pod

QUIET_ANNOTATIONS = frozenset({"ambient.istio.io/redirection"})  # written back by the agent itself


def quiet_change(old: Pod, new: Pod) -> bool:
    """The two differ only in QUIET_ANNOTATIONS (pure)."""
    def loud(p: Pod) -> dict[str, str]:
        return {k: v for k, v in p.annotations.items() if k not in QUIET_ANNOTATIONS}

    return old.with_annotations({}) == new.with_annotations({}) and loud(old) == loud(new)


@dataclass(frozen=True)
class StoreSnapshot:
    pods: Mapping[str, Pod]
    namespaces: Mapping[str, Namespace]
    synced: bool  # every source has completed its first full list
    generation: int


class PodStore:
    """The agent's view of its node: pods by uid and namespaces by name; notifies on change."""

    def __init__(self, kinds: Iterable[str] = ("pods", "namespaces")) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, Pod] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._pending_sync = set(kinds)
        self._generation = 0
        self._listeners: list[tuple[Callable[[], None], bool]] = []

    def subscribe(self, listener: Callable[[], None], *, quiet: bool = False) -> None:
        """listener() after every change; `quiet`: also after quiet ones (see the module text)."""
        self._listeners.append((listener, quiet))

    def _changed(self, quiet: bool = False) -> None:
        self._generation += 1
        for listener, hears_quiet in list(self._listeners):
            if hears_quiet or not quiet:
                listener()

    def replace_pods(self, pods: Iterable[Pod]) -> None:
        new = {p.uid: p for p in pods}
        with self._lock:
            first = "pods" in self._pending_sync
            changed = new != self._pods or first
            quiet = changed and not first and new.keys() == self._pods.keys() and all(
                quiet_change(self._pods[uid], pod) for uid, pod in new.items() if self._pods[uid] != pod)
            self._pods = new
            self._pending_sync.discard("pods")
        if changed:
            self._changed(quiet)

    def replace_namespaces(self, namespaces: Iterable[Namespace]) -> None:
        new = {n.name: n for n in namespaces}
        with self._lock:
            changed = new != self._namespaces or "namespaces" in self._pending_sync
            self._namespaces = new
            self._pending_sync.discard("namespaces")
        if changed:
            self._changed()

    def upsert_pod(self, pod: Pod) -> None:
        with self._lock:
            old = self._pods.get(pod.uid)
            if old == pod:
                return
            self._pods[pod.uid] = pod
        self._changed(old is not None and quiet_change(old, pod))

    def delete_pod(self, uid: str) -> None:
        with self._lock:
            if self._pods.pop(uid, None) is None:
                return
        self._changed()

    def upsert_namespace(self, ns: Namespace) -> None:
        with self._lock:
            if self._namespaces.get(ns.name) == ns:
                return
            self._namespaces[ns.name] = ns
        self._changed()

    def delete_namespace(self, name: str) -> None:
        with self._lock:
            if self._namespaces.pop(name, None) is None:
                return
        self._changed()

    def snapshot(self) -> StoreSnapshot:
        with self._lock:
            return StoreSnapshot(
                pods=dict(self._pods),
                namespaces=dict(self._namespaces),
                synced=not self._pending_sync,
                generation=self._generation,
            )

    @property
    def synced(self) -> bool:
        with self._lock:
            return not self._pending_sync
