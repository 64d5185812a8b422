"""Kubernetes Pod and Namespace objects (decoded JSON/YAML) -> ``Pod`` / ``Namespace`` records.

The one parser of Kubernetes objects: the CNI plugin (its pod sources, on the ADD hot path) and the node
agent (its Kubernetes watch and objects-dir sources) both use it. Standard library only, and nothing
costly at import time (no ``re``, ``typing``, ``dataclasses``, ``uuid``).

Field rules:

- ``metadata.name`` is a non-empty string; ``metadata.namespace`` a string, ``default`` when absent.
- ``metadata.labels`` / ``metadata.annotations`` are maps of strings (as the API server enforces).
- ``spec.hostNetwork`` counts only when it is the boolean ``true``; ``spec.nodeName`` and the service
  account (``spec.serviceAccountName``, else the legacy ``spec.serviceAccount``, else ``default``) are
  strings; the IPs are ``status.podIPs`` in order, without duplicates, with ``status.podIP`` in front
  when the list lacks it.

The uid rule: a pod's uid is ``metadata.uid`` when the object has a non-empty one; it must be 1-128
characters of ``[0-9A-Za-z._-]`` starting with a letter or digit (the agent names files after it).
An object without a uid (hand-written objects-dir files) gets a stable uid derived from its identity,
``uuid5(NAMESPACE_URL, "headrace:<namespace>/<name>")``, so the agent and the plugin name the pod the
same way, and the record says so (``uid_derived``). A derived uid is never an authority: the plugin
does not compare it with the runtime's ``K8S_POD_UID`` and prefers the runtime's uid for its events.
"""

from __future__ import annotations

from types import MappingProxyType

from cni.contract.pod_uid import valid_uid as valid_uid  # re-exported: the uid rule lives there
from cni.contract.record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

_EMPTY: Mapping[str, str] = MappingProxyType({})


class ObjectError(ValueError):
    """A Kubernetes object is malformed (not an object, no name, fields of the wrong type, a bad uid)."""


def derived_uid(namespace: str, name: str) -> str:
    """The stable uid of a pod object that has none (the same in the plugin and the agent)."""
    import uuid  # only for objects without a uid: never on the plugin's usual path

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"headrace:{namespace}/{name}"))


class Namespace(Record):
    __slots__ = ("labels", "name")
    name: str
    labels: Mapping[str, str]

    def __init__(self, name: str, labels: Mapping[str, str] = _EMPTY) -> None:
        self._init(name=name, labels=labels)


class Pod(Record):
    __slots__ = (
        "annotations",
        "deleting",
        "host_network",
        "ips",
        "labels",
        "name",
        "namespace",
        "node_name",
        "phase",
        "service_account",
        "uid",
        "uid_derived",
    )
    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    host_network: bool
    node_name: str
    ips: tuple[str, ...]
    phase: str
    service_account: str
    deleting: bool
    uid_derived: bool

    def __init__(
        self,
        *,
        uid: str,
        namespace: str,
        name: str,
        labels: Mapping[str, str] = _EMPTY,
        annotations: Mapping[str, str] = _EMPTY,
        host_network: bool = False,
        node_name: str = "",
        ips: tuple[str, ...] = (),
        phase: str = "",
        service_account: str = "default",
        deleting: bool = False,
        uid_derived: bool = False,
    ) -> None:
        self._init(
            uid=uid,
            namespace=namespace,
            name=name,
            labels=labels,
            annotations=annotations,
            host_network=host_network,
            node_name=node_name,
            ips=ips,
            phase=phase,
            service_account=service_account,
            deleting=deleting,
            uid_derived=uid_derived,
        )

    def with_ips(self, ips: tuple[str, ...]) -> Pod:
        """The same pod with these IPs (a CNI ADD brings them before the object's status has them)."""
        return self._with(ips=ips)

    def with_annotations(self, annotations: Mapping[str, str]) -> Pod:
        """The same pod with these annotations."""
        return self._with(annotations=annotations)

    def _with(self, **changes: Any) -> Pod:
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return Pod(**fields)

    @property
    def authoritative_uid(self) -> str:
        """The uid from the object itself; empty when it was derived."""
        return "" if self.uid_derived else self.uid


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ObjectError(f"{what} must be a map of strings")
    return dict(value)


def _section(obj: dict[str, Any], key: str, kind: str) -> dict[str, Any]:
    value = obj.get(key) or {}
    if not isinstance(value, dict):
        raise ObjectError(f"{kind} {key} is not an object")
    return value


def _metadata(obj: Any, kind: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ObjectError(f"{kind} object is not a JSON/YAML object")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ObjectError(f"{kind} object has no metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{kind} object has no metadata.name")
    return meta


def _str_field(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _pod_ips(status: dict[str, Any]) -> tuple[str, ...]:
    ips: list[str] = []
    for entry in status.get("podIPs") or ():
        if isinstance(entry, dict) and isinstance(entry.get("ip"), str) and entry["ip"] and entry["ip"] not in ips:
            ips.append(entry["ip"])
    first = status.get("podIP")
    if isinstance(first, str) and first and first not in ips:
        ips.insert(0, first)
    return tuple(ips)


def pod_from_object(obj: Any) -> Pod:
    """A Pod object -> ``Pod``; ``ObjectError`` when it is malformed."""
    meta = _metadata(obj, "Pod")
    name: str = meta["name"]
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise ObjectError(f"Pod {name}: metadata.namespace must be a string")
    spec = _section(obj, "spec", "Pod")
    status = _section(obj, "status", "Pod")
    uid = meta.get("uid")
    derived = uid is None or uid == ""
    if derived:
        uid = derived_uid(namespace, name)
    elif not isinstance(uid, str) or not valid_uid(uid):
        raise ObjectError(f"pod {namespace}/{name}: invalid metadata.uid {str(uid)[:80]!r}")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount")
    return Pod(
        uid=uid,
        namespace=namespace,
        name=name,
        labels=_str_map(meta.get("labels"), "Pod metadata.labels"),
        annotations=_str_map(meta.get("annotations"), "Pod metadata.annotations"),
        host_network=spec.get("hostNetwork") is True,
        node_name=_str_field(spec.get("nodeName")),
        ips=_pod_ips(status),
        phase=_str_field(status.get("phase")),
        service_account=account if isinstance(account, str) and account else "default",
        deleting=bool(meta.get("deletionTimestamp")),
        uid_derived=derived,
    )


def namespace_from_object(obj: Any) -> Namespace:
    """A Namespace object -> ``Namespace``; ``ObjectError`` when it is malformed."""
    meta = _metadata(obj, "Namespace")
    return Namespace(name=meta["name"], labels=_str_map(meta.get("labels"), "Namespace metadata.labels"))
