"""Pods and namespaces as the agent sees them, and the thread-safe cache the pod sources fill.

Both sources (Kubernetes watch, objects dir) turn Kubernetes-shaped dicts into `Pod` and `Namespace` values
with the one parser, `cni.contract.kube_objects` (shared with the CNI plugin), and push them into one
`PodStore`; the reconcile loop reads a consistent snapshot and is woken on every change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cni.contract.kube_objects import Namespace, Pod


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
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        self._generation += 1
        for listener in list(self._listeners):
            listener()

    def replace_pods(self, pods: Iterable[Pod]) -> None:
        new = {p.uid: p for p in pods}
        with self._lock:
            changed = new != self._pods or "pods" in self._pending_sync
            self._pods = new
            self._pending_sync.discard("pods")
        if changed:
            self._changed()

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
            if self._pods.get(pod.uid) == pod:
                return
            self._pods[pod.uid] = pod
        self._changed()

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
