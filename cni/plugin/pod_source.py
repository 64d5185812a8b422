"""Pod and namespace metadata for the plugin: a local objects directory or the Kubernetes API
(``cni.plugin.kube_api``, imported only when a kubeconfig is configured).

Stdlib only at import time. YAML (objects files named *.yaml / *.yml, or a YAML kubeconfig) is parsed by a
lazy ``import yaml``. Objects become records through the one parser, ``cni.contract.kube_objects``.
"""

from __future__ import annotations

import os

from cni.contract import jsoncodec
from cni.contract.kube_objects import Namespace, ObjectError, Pod, namespace_from_object, pod_from_object

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # typing: for the type checker only
    from typing import Any, Protocol

MAX_OBJECT_BYTES = 4 * 1024 * 1024
OBJECT_SUFFIXES = (".json", ".yaml", ".yml")


class PodSourceError(Exception):
    """The pod source could not answer (unreachable, unreadable, malformed, forbidden)."""


if TYPE_CHECKING:

    class PodSource(Protocol):
        """``authoritative``: a missing pod is an error (Kubernetes) rather than "not ours" (objects dir)."""

        authoritative: bool

        def get_pod(self, namespace: str, name: str) -> Pod | None: ...

        def get_namespace(self, name: str) -> Namespace | None: ...


def load_yaml(text: str, origin: str) -> Any:
    """One YAML document, within the limits of `cni.contract.object_files` (size, aliases expanded)."""
    try:
        from cni.contract.object_files import ObjectFileError
        from cni.contract.object_files import load_yaml as load_bounded  # imports PyYAML: only for YAML
    except ImportError as exc:  # pragma: no cover - pyyaml is a declared dependency
        raise PodSourceError(f"{origin}: YAML needs PyYAML, which is not installed") from exc
    try:
        return load_bounded(text, origin)
    except ObjectFileError as exc:
        raise PodSourceError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------------
# objects directory


class ObjectsDirSource:
    """A directory of Namespace and Pod objects, one JSON or YAML file each (flat, no subdirectories).

    A file is parsed only when its text mentions the wanted name (so YAML and big directories cost
    little); a file that mentions it but cannot be parsed is an error, never a silent "not found".
    """

    authoritative = False

    def __init__(self, path: str) -> None:
        self.path = path

    def _candidates(self, needles: tuple[str, ...]) -> list[tuple[str, Any]]:
        try:
            names = sorted(os.listdir(self.path))
        except OSError as exc:
            raise PodSourceError(f"objects_dir {self.path!r} is not readable: {exc.strerror}") from exc
        found: list[tuple[str, Any]] = []
        for entry in names:
            if not entry.endswith(OBJECT_SUFFIXES) or entry.startswith("."):
                continue
            full = os.path.join(self.path, entry)
            try:
                if not os.path.isfile(full) or os.path.getsize(full) > MAX_OBJECT_BYTES:
                    continue
                with open(full, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError):
                continue
            if not all(n in text for n in needles):
                continue
            if entry.endswith(".json"):
                try:
                    obj = jsoncodec.loads(text)
                except RecursionError as exc:
                    raise PodSourceError(f"{full}: invalid JSON: nested too deep") from exc
                except ValueError as exc:
                    raise PodSourceError(f"{full}: invalid JSON: {exc}") from exc
            else:
                obj = load_yaml(text, full)
            found.append((full, obj))
        return found

    def get_pod(self, namespace: str, name: str) -> Pod | None:
        matches: list[tuple[str, Pod]] = []
        for full, obj in self._candidates((name,)):
            if not isinstance(obj, dict) or obj.get("kind") != "Pod":
                continue
            try:
                pod = pod_from_object(obj)
            except ObjectError as exc:
                raise PodSourceError(f"{full}: {exc}") from exc
            if pod.namespace == namespace and pod.name == name:
                matches.append((full, pod))
        if len(matches) > 1:
            files = ", ".join(m[0] for m in matches)
            raise PodSourceError(f"more than one object for pod {namespace}/{name}: {files}")
        return matches[0][1] if matches else None

    def get_namespace(self, name: str) -> Namespace | None:
        for full, obj in self._candidates((name,)):
            if not isinstance(obj, dict) or obj.get("kind") != "Namespace":
                continue
            try:
                ns = namespace_from_object(obj)
            except ObjectError as exc:
                raise PodSourceError(f"{full}: {exc}") from exc
            if ns.name == name:
                return ns
        return None


def from_config(kubeconfig: str | None, objects_dir: str | None, timeout: float) -> PodSource:
    if kubeconfig:
        from cni.plugin.kube_api import KubeApiSource

        return KubeApiSource(kubeconfig, timeout)
    if objects_dir:
        return ObjectsDirSource(objects_dir)
    raise PodSourceError("no pod source configured (kubeconfig or objects_dir)")
