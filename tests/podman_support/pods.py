"""Kubernetes-shaped Pod objects for containers podman starts, and what podman tells a CNI plugin.

Podman 4.3 with the CNI backend passes `CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=<container name>` and no
namespace (measured with a recording plugin; see docs/podman.md). headrace-cni then looks the pod up in
the `default` namespace. Pairs from a `CNI_ARGS` variable in podman's own environment are appended, so
`CNI_ARGS=K8S_POD_NAMESPACE=shop` gives the pod a namespace explicitly.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

PODMAN_DEFAULT_NAMESPACE = "default"
SIDECAR_STATUS = "sidecar.istio.io/status"
SIDECAR_STATUS_VALUE = json.dumps({"containers": ["istio-proxy"], "initContainers": []})


def pod_object(
    namespace: str,
    name: str,
    *,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    node_name: str = "",
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "nodeName": node_name,
            "hostNetwork": False,
            "serviceAccountName": "default",
            "containers": [{"name": "app", "image": "local-rootfs"}],
        },
        "status": {"phase": "Pending"},
    }


def write_pod_object(objects_dir: Path, obj: dict[str, Any]) -> Path:
    """Write obj as objects_dir/pod-<namespace>-<name>.json atomically; returns the path."""
    meta = obj["metadata"]
    path = objects_dir / f"pod-{meta['namespace']}-{meta['name']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path


def parse_cni_args(value: str) -> dict[str, str]:
    """`K=V;K=V` as the CNI spec defines CNI_ARGS (later pairs win)."""
    pairs: dict[str, str] = {}
    for item in value.split(";"):
        if "=" in item:
            key, _, val = item.partition("=")
            pairs[key] = val
    return pairs
