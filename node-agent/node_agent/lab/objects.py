"""Kubernetes-shaped Namespace and Pod objects for a lab objects dir, and their atomic writer.

The agent's objects-dir source and the plugin's pod source read these files; a file is replaced in one
rename, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

AMBIENT_LABEL = "istio.io/dataplane-mode"


def ns_object(name: str, ambient: bool = False, labels: dict[str, str] | None = None, uid: str = "") -> dict[str, Any]:
    """A Namespace; ``ambient`` adds the ambient dataplane-mode label to ``labels``."""
    all_labels = dict(labels or {})
    if ambient:
        all_labels[AMBIENT_LABEL] = "ambient"
    meta: dict[str, Any] = {"name": name, "labels": all_labels}
    if uid:
        meta["uid"] = uid
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def pod_object(
    ns: str,
    name: str,
    uid: str,
    ips: list[str],
    labels: dict[str, str] | None = None,
    node: str = "",
    *,
    annotations: dict[str, str] | None = None,
    host_network: bool = False,
    container: str = "c",
) -> dict[str, Any]:
    """A running Pod with these IPs (``status.podIP`` is the first, when there is one)."""
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid, "labels": labels or {}}
    if annotations is not None:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": container, "image": container}]}
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]}
    if ips:
        status["podIP"] = ips[0]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def write_object(directory: Path, filename: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` as ``directory/filename`` in one rename."""
    tmp = directory / f".{filename}.tmp"
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, directory / filename)
