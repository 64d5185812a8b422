"""The pod a plugin request names, as the agent knows it: from its pod cache (by uid, else by namespace and
name), and with a direct lookup (the plugin's own pod source code) when the cache does not have the pod,
or not the namespace whose labels decide its mode."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cni.contract import membership
from cni.contract.kube_objects import Namespace, Pod
from node_agent.sources.store import StoreSnapshot

Lookup = Callable[[str, str], tuple[Pod | None, Namespace | None]]


def cached(snap: StoreSnapshot, uid: str, namespace: str, name: str) -> tuple[Pod | None, Namespace | None]:
    """The pod (by uid when given, else by name) and its namespace, each None when not cached."""
    pod = snap.pods.get(uid) if uid else None
    if pod is None:
        pod = next((p for p in snap.pods.values() if p.namespace == namespace and p.name == name), None)
    return pod, (snap.namespaces.get(pod.namespace) if pod is not None else None)


def matches(pod: Pod | None, uid: str, namespace: str, name: str) -> bool:
    """The pod has that namespace and name, and that uid when both sides know it for sure."""
    if pod is None or pod.namespace != namespace or pod.name != name:
        return False
    return not (uid and pod.authoritative_uid and pod.uid != uid)


def find(snap: StoreSnapshot, lookup: Lookup | None, uid: str, namespace: str, name: str,
         exclude_namespaces: Iterable[str], looked_up: Callable[[], None] = lambda: None,
         ) -> tuple[Pod | None, Namespace | None]:
    """The pod (None when the agent cannot tell) and its namespace (None when unknown; a namespace whose
    labels do not matter is not looked up). `looked_up` is called when the cache did not do."""
    pod, ns = cached(snap, uid, namespace, name)
    ok = matches(pod, uid, namespace, name)
    if ok and ns is None and pod is not None and not membership.namespace_needed(
            pod.namespace, pod.labels, pod.annotations, pod.host_network, exclude_namespaces):
        return pod, None
    if (not ok or ns is None) and lookup is not None:
        looked_up()
        pod, ns = lookup(namespace, name)
    return (pod, ns) if matches(pod, uid, namespace, name) else (None, None)
