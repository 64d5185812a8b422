"""Pods and namespaces as the agent sees them, and the thread-safe cache the pod sources fill.

Both sources (Kubernetes watch, objects dir) turn Kubernetes-shaped dicts into these records and push them
into one `PodStore`; the reconcile loop reads a consistent snapshot and is woken on every change.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_UID_RE = re.compile(r"^[0-9a-zA-Z][0-9a-zA-Z._-]{0,127}$")  # used in file names: no slashes, no dots first


class ObjectError(ValueError):
    """A Kubernetes object is malformed (missing name, wrong types)."""


@dataclass(frozen=True)
class PodRecord:
    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False
    node_name: str = ""
    ips: tuple[str, ...] = ()
    phase: str = ""
    service_account: str = "default"
    deleting: bool = False


@dataclass(frozen=True)
class NamespaceRecord:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ObjectError(f"{what} must be a mapping")
    return {str(k): str(v) for k, v in value.items()}


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ObjectError("object has no metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError("object has no metadata.name")
    return meta


def pod_from_dict(obj: Mapping[str, Any]) -> PodRecord:
    meta = _meta(obj)
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise ObjectError("metadata.namespace must be a string")
    uid = meta.get("uid")
    if not isinstance(uid, str) or not uid:
        # Lab objects may omit the uid; derive a stable one from the identity.
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"headrace:{namespace}/{meta['name']}"))
    if not _UID_RE.match(uid):
        raise ObjectError(f"pod {namespace}/{meta['name']}: invalid metadata.uid {uid[:80]!r}")
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(spec, dict) or not isinstance(status, dict):
        raise ObjectError("spec and status must be mappings")
    ips: list[str] = []
    for entry in status.get("podIPs") or []:
        if isinstance(entry, dict) and isinstance(entry.get("ip"), str) and entry["ip"] not in ips:
            ips.append(entry["ip"])
    if isinstance(status.get("podIP"), str) and status["podIP"] and status["podIP"] not in ips:
        ips.insert(0, status["podIP"])
    return PodRecord(
        uid=uid,
        namespace=namespace,
        name=str(meta["name"]),
        labels=_str_map(meta.get("labels"), "metadata.labels"),
        annotations=_str_map(meta.get("annotations"), "metadata.annotations"),
        host_network=bool(spec.get("hostNetwork", False)),
        node_name=str(spec.get("nodeName") or ""),
        ips=tuple(ips),
        phase=str(status.get("phase") or ""),
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def namespace_from_dict(obj: Mapping[str, Any]) -> NamespaceRecord:
    meta = _meta(obj)
    return NamespaceRecord(name=str(meta["name"]), labels=_str_map(meta.get("labels"), "metadata.labels"))


@dataclass(frozen=True)
class StoreSnapshot:
    pods: Mapping[str, PodRecord]
    namespaces: Mapping[str, NamespaceRecord]
    synced: bool  # every source has completed its first full list
    generation: int


class PodStore:
    """The agent's view of its node: pods by uid and namespaces by name; notifies on change."""

    def __init__(self, kinds: Iterable[str] = ("pods", "namespaces")) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, PodRecord] = {}
        self._namespaces: dict[str, NamespaceRecord] = {}
        self._pending_sync = set(kinds)
        self._generation = 0
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        self._generation += 1
        for listener in list(self._listeners):
            listener()

    def replace_pods(self, pods: Iterable[PodRecord]) -> None:
        new = {p.uid: p for p in pods}
        with self._lock:
            changed = new != self._pods or "pods" in self._pending_sync
            self._pods = new
            self._pending_sync.discard("pods")
        if changed:
            self._changed()

    def replace_namespaces(self, namespaces: Iterable[NamespaceRecord]) -> None:
        new = {n.name: n for n in namespaces}
        with self._lock:
            changed = new != self._namespaces or "namespaces" in self._pending_sync
            self._namespaces = new
            self._pending_sync.discard("namespaces")
        if changed:
            self._changed()

    def upsert_pod(self, pod: PodRecord) -> None:
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

    def upsert_namespace(self, ns: NamespaceRecord) -> None:
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
