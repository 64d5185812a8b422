"""Pod sources (cni.plugin.pod_source, cni.plugin.kube_api): an objects dir, and the Kubernetes API served
by a real local HTTP(S) server (http.server in a thread, real API JSON, a self-signed certificate made with openssl)."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cni.plugin.kube_api import KubeApiSource, parse_kubeconfig
from cni.plugin.pod_source import ObjectsDirSource, PodSourceError

POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "web-0",
        "namespace": "shop",
        "uid": "11111111-2222-3333-4444-555555555555",
        "labels": {"app": "web"},
        "annotations": {"sidecar.istio.io/status": "{}", "traffic.sidecar.istio.io/excludeOutboundPorts": "22"},
        "resourceVersion": "42",
        "creationTimestamp": "2026-01-01T00:00:00Z",
    },
    "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "nginx"}]},
    "status": {"phase": "Pending"},
}
NAMESPACE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Namespace",
    "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}},
    "spec": {"finalizers": ["kubernetes"]},
    "status": {"phase": "Active"},
}
NOT_FOUND = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'pods "nope" not found',
    "reason": "NotFound",
    "details": {"name": "nope", "kind": "pods"},
    "code": 404,
}


# ---------------------------------------------------------------------------------------------------
# objects dir


def test_objects_dir_json(tmp_path: Path) -> None:
    (tmp_path / "pod.json").write_text(json.dumps(POD))
    (tmp_path / "ns.json").write_text(json.dumps(NAMESPACE))
    (tmp_path / "other.json").write_text(json.dumps({**POD, "metadata": {**POD["metadata"], "namespace": "x"}}))
    (tmp_path / "notes.txt").write_text("web-0 shop")
    src = ObjectsDirSource(str(tmp_path))
    pod = src.get_pod("shop", "web-0")
    assert pod is not None and pod.uid.startswith("1111") and pod.labels == {"app": "web"}
    assert "sidecar.istio.io/status" in pod.annotations and pod.node_name == "n1" and not pod.host_network
    ns = src.get_namespace("shop")
    assert ns is not None and ns.labels["istio.io/dataplane-mode"] == "ambient"
    assert src.get_pod("shop", "web-1") is None and src.get_namespace("other") is None


def test_objects_dir_yaml_is_parsed_lazily(tmp_path: Path) -> None:
    (tmp_path / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: api\n  namespace: shop\n"
        "  labels:\n    istio.io/dataplane-mode: ambient\nspec:\n  hostNetwork: true\n"
    )
    (tmp_path / "ns.yml").write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n")
    code = (
        "import sys; from cni.plugin.pod_source import ObjectsDirSource as S; s=S(sys.argv[1]);"
        "assert s.get_pod('shop','web') is None; print('yaml' in sys.modules);"
        "p=s.get_pod('shop','api'); print('yaml' in sys.modules, p.host_network, dict(p.labels));"
        "print(s.get_namespace('shop'))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "False"  # no YAML file mentions 'web': yaml never imported
    assert lines[1] == "True True {'istio.io/dataplane-mode': 'ambient'}"
    assert "name='shop'" in lines[2]


def test_objects_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(PodSourceError, match="not readable"):
        ObjectsDirSource(str(tmp_path / "missing")).get_pod("a", "b")
    (tmp_path / "broken.json").write_text('{"kind": "Pod", "metadata": {"name": "web"')
    with pytest.raises(PodSourceError, match="invalid JSON"):
        ObjectsDirSource(str(tmp_path)).get_pod("shop", "web")
    (tmp_path / "broken.json").unlink()
    (tmp_path / "a.json").write_text(json.dumps(POD))
    (tmp_path / "b.json").write_text(json.dumps(POD))
    with pytest.raises(PodSourceError, match="more than one"):
        ObjectsDirSource(str(tmp_path)).get_pod("shop", "web-0")
    (tmp_path / "b.json").write_text(json.dumps({**POD, "metadata": {**POD["metadata"], "labels": {"a": 1}}}))
    with pytest.raises(PodSourceError, match="map of strings"):
        ObjectsDirSource(str(tmp_path)).get_pod("shop", "web-0")


# ---------------------------------------------------------------------------------------------------
# a fake API server


class ApiHandler(BaseHTTPRequestHandler):
    objects: dict[str, dict[str, Any]] = {}
    token: str | None = None
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            self._send(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
        elif self.path in self.objects:
            self._send(200, self.objects[self.path])
        else:
            self._send(404, NOT_FOUND)

    def _send(self, code: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def serve(handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scheme = "https" if tls else "http"
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def make_handler(token: str | None = None) -> type[ApiHandler]:
    class H(ApiHandler):
        pass

    H.objects = {"/api/v1/namespaces/shop/pods/web-0": POD, "/api/v1/namespaces/shop": NAMESPACE}
    H.token = token
    H.seen = []
    return H


def kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any], as_yaml: bool = False) -> str:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "ctx",
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
    }
    if as_yaml:
        import yaml

        path.write_text(yaml.safe_dump(cfg))
    else:
        path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture
def http_api() -> Iterator[tuple[str, type[ApiHandler]]]:
    handler = make_handler(token="s3cret")
    for url in serve(handler):
        yield url, handler


def test_kube_api_http_with_token(tmp_path: Path, http_api: tuple[str, type[ApiHandler]]) -> None:
    url, handler = http_api
    kc = kubeconfig(tmp_path / "kubeconfig", {"server": url}, {"token": "s3cret"})
    src = KubeApiSource(kc, timeout=2)
    pod = src.get_pod("shop", "web-0")
    assert pod is not None and pod.uid == POD["metadata"]["uid"] and pod.annotations == POD["metadata"]["annotations"]
    ns = src.get_namespace("shop")
    assert ns is not None and ns.labels == {"istio.io/dataplane-mode": "ambient"}
    assert src.get_pod("shop", "nope") is None
    assert handler.seen[0] == ("/api/v1/namespaces/shop/pods/web-0", "Bearer s3cret")


def test_kube_api_token_file_yaml_kubeconfig(tmp_path: Path, http_api: tuple[str, type[ApiHandler]]) -> None:
    url, _ = http_api
    (tmp_path / "token").write_text("s3cret\n")
    kc = kubeconfig(tmp_path / "kubeconfig", {"server": url}, {"tokenFile": "token"}, as_yaml=True)
    assert KubeApiSource(kc, timeout=2).get_pod("shop", "web-0") is not None


def test_kube_api_forbidden_and_unreachable(tmp_path: Path, http_api: tuple[str, type[ApiHandler]]) -> None:
    url, _ = http_api
    kc = kubeconfig(tmp_path / "k1", {"server": url}, {"token": "wrong"})
    with pytest.raises(PodSourceError, match=r"HTTP 401.*RBAC"):
        KubeApiSource(kc, timeout=2).get_pod("shop", "web-0")
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    kc2 = kubeconfig(tmp_path / "k2", {"server": f"http://127.0.0.1:{port}"}, {})
    with pytest.raises(PodSourceError, match="unreachable"):
        KubeApiSource(kc2, timeout=2).get_pod("shop", "web-0")


def test_kube_api_timeout(tmp_path: Path) -> None:
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts at the kernel level, never answers
    try:
        kc = kubeconfig(tmp_path / "k", {"server": f"http://127.0.0.1:{listener.getsockname()[1]}"}, {})
        start = time.monotonic()
        with pytest.raises(PodSourceError, match="unreachable"):
            KubeApiSource(kc, timeout=0.5).get_pod("shop", "web-0")
        assert time.monotonic() - start < 3
    finally:
        listener.close()


def test_kubeconfig_parsing_errors(tmp_path: Path) -> None:
    with pytest.raises(PodSourceError, match="not readable"):
        KubeApiSource(str(tmp_path / "none")).credentials()
    with pytest.raises(PodSourceError, match="http"):
        parse_kubeconfig(
            json.dumps(
                {
                    "clusters": [{"name": "c", "cluster": {"server": "ftp://x"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c"}}],
                }
            ),
            str(tmp_path),
        )
    with pytest.raises(PodSourceError, match="exec"):
        parse_kubeconfig(
            json.dumps(
                {
                    "current-context": "x",
                    "clusters": [{"name": "c", "cluster": {"server": "https://x"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}],
                }
            ),
            str(tmp_path),
        )
    with pytest.raises(PodSourceError, match="base64"):
        parse_kubeconfig(
            json.dumps(
                {
                    "current-context": "x",
                    "clusters": [{"name": "c", "cluster": {"server": "https://x", "certificate-authority-data": "%%"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c"}}],
                }
            ),
            str(tmp_path),
        )


# ---------------------------------------------------------------------------------------------------
# TLS


def openssl_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_api(tmp_path: Path) -> Iterator[tuple[str, Path, Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    server_cert, server_key = openssl_cert(tmp_path, "server")
    client_cert, client_key = openssl_cert(tmp_path, "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_cert, server_key)
    ctx.verify_mode = ssl.CERT_REQUIRED  # client certificate authentication
    ctx.load_verify_locations(cafile=str(client_cert))
    for url in serve(make_handler(), ctx):
        yield url, server_cert, client_cert, client_key


def test_kube_api_tls_with_ca_data_and_client_cert_data(tmp_path: Path, tls_api: tuple[str, Path, Path, Path]) -> None:
    url, server_cert, client_cert, client_key = tls_api

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    kc = kubeconfig(
        tmp_path / "kc",
        {"server": url, "certificate-authority-data": b64(server_cert)},
        {"client-certificate-data": b64(client_cert), "client-key-data": b64(client_key)},
    )
    pod = KubeApiSource(kc, timeout=3).get_pod("shop", "web-0")
    assert pod is not None and pod.name == "web-0"


def test_kube_api_tls_with_files(tmp_path: Path, tls_api: tuple[str, Path, Path, Path]) -> None:
    url, server_cert, client_cert, client_key = tls_api
    kc = kubeconfig(
        tmp_path / "kc",
        {"server": url, "certificate-authority": str(server_cert)},
        {"client-certificate": str(client_cert), "client-key": str(client_key)},
    )
    assert KubeApiSource(kc, timeout=3).get_namespace("shop") is not None


def test_kube_api_tls_untrusted_and_insecure(tmp_path: Path, tls_api: tuple[str, Path, Path, Path]) -> None:
    url, _server_cert, client_cert, client_key = tls_api
    user = {"client-certificate": str(client_cert), "client-key": str(client_key)}
    other_ca, _ = openssl_cert(tmp_path, "other")
    kc = kubeconfig(tmp_path / "kc", {"server": url, "certificate-authority": str(other_ca)}, user)
    with pytest.raises(PodSourceError, match=r"unreachable.*CERTIFICATE_VERIFY_FAILED"):
        KubeApiSource(kc, timeout=3).get_pod("shop", "web-0")
    kc2 = kubeconfig(tmp_path / "kc2", {"server": url, "insecure-skip-tls-verify": True}, user)
    assert KubeApiSource(kc2, timeout=3).get_pod("shop", "web-0") is not None
