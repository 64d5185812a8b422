"""A kubeconfig for the plugin on the host, built from the agent pod's service account.

The plugin reads pods and namespaces with it (the same get/list/watch RBAC as the agent). It is JSON
(valid YAML, so any reader takes it), mode 0600, rewritten only when the token or CA changes: in watch
mode this runs every pass, so a rotated token reaches the host within a second (a stale kubeconfig
is how Istio's plugin once got stuck).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping

from node_agent.install_cni.atomic import read_bytes, write_atomic

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
FILE_NAME = "kubeconfig"


class KubeconfigError(Exception):
    pass


def api_server(environ: Mapping[str, str]) -> str:
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeconfigError("KUBERNETES_SERVICE_HOST is not set (not running in a pod?)")
    if not port.isdigit():
        raise KubeconfigError(f"KUBERNETES_SERVICE_PORT is not a port: {port!r}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"https://{host}:{port}"


def render(server: str, ca_pem: bytes, token: str) -> bytes:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": "headrace-cni", "user": {"token": token}}],
        "contexts": [{"name": "headrace-cni", "context": {"cluster": "local", "user": "headrace-cni"}}],
        "current-context": "headrace-cni",
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def write_from_service_account(path: str, sa_dir: str, environ: Mapping[str, str]) -> bool:
    """Write (or keep) the kubeconfig at `path`; True when the file changed."""
    token = read_bytes(os.path.join(sa_dir, "token"))
    ca = read_bytes(os.path.join(sa_dir, "ca.crt"))
    if not token or not ca:
        raise KubeconfigError(f"service account token or ca.crt missing in {sa_dir}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return write_atomic(path, render(api_server(environ), ca, token.decode().strip()), mode=0o600)
