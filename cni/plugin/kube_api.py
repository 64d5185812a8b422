"""The plugin's Kubernetes API pod source: the credentials of a kubeconfig (bearer token or token file,
client certificate, CA data or file, insecure-skip-tls-verify) and GETs of one pod and one namespace
over urllib + ssl. Stdlib only; json, base64, ssl and urllib are imported where used.
"""

from __future__ import annotations

import os

from cni.contract.kube_objects import Namespace, ObjectError, Pod, namespace_from_object, pod_from_object
from cni.contract.record import Record
from cni.plugin.pod_source import MAX_OBJECT_BYTES, PodSourceError, load_yaml

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import ssl
    import urllib.request
    from typing import Any


class KubeCredentials(Record):
    __slots__ = (
        "ca_data",
        "ca_file",
        "cert_data",
        "cert_file",
        "insecure",
        "key_data",
        "key_file",
        "proxy_url",
        "server",
        "token",
    )
    server: str
    ca_data: bytes | None
    ca_file: str | None
    insecure: bool
    token: str | None
    cert_data: bytes | None
    key_data: bytes | None
    cert_file: str | None
    key_file: str | None
    proxy_url: str | None

    def __init__(
        self,
        server: str,
        ca_data: bytes | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
        token: str | None = None,
        cert_data: bytes | None = None,
        key_data: bytes | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        proxy_url: str | None = None,
    ) -> None:
        self._init(
            server=server,
            ca_data=ca_data,
            ca_file=ca_file,
            insecure=insecure,
            token=token,
            cert_data=cert_data,
            key_data=key_data,
            cert_file=cert_file,
            key_file=key_file,
            proxy_url=proxy_url,
        )


def _named(items: Any, name: str, kind: str, key: str) -> dict[str, Any]:
    if not isinstance(items, list):
        raise PodSourceError(f"kubeconfig: '{kind}' must be a list")
    for item in items:
        if isinstance(item, dict) and item.get("name") == name:
            inner = item.get(key) or {}
            if not isinstance(inner, dict):
                raise PodSourceError(f"kubeconfig: {kind} {name!r} is not an object")
            return inner
    raise PodSourceError(f"kubeconfig: no {key} named {name!r}")


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise PodSourceError(f"kubeconfig: {what} must be a base64 string")
    import base64  # Kubernetes source only

    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError) as exc:
        raise PodSourceError(f"kubeconfig: {what} is not valid base64") from exc


def parse_kubeconfig(text: str, base_dir: str, origin: str = "kubeconfig") -> KubeCredentials:
    """The server and credentials of the current context (JSON natively, YAML through PyYAML)."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        import json  # Kubernetes source only

        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PodSourceError(f"{origin}: invalid JSON: {exc}") from exc
    else:
        cfg = load_yaml(text, origin)
    if not isinstance(cfg, dict):
        raise PodSourceError(f"{origin}: not a kubeconfig object")
    contexts = cfg.get("contexts") or []
    current = cfg.get("current-context")
    if not current:
        if isinstance(contexts, list) and len(contexts) == 1 and isinstance(contexts[0], dict):
            current = contexts[0].get("name")
        if not current:
            raise PodSourceError(f"{origin}: no current-context")
    context = _named(contexts, str(current), "contexts", "context")
    cluster = _named(cfg.get("clusters") or [], str(context.get("cluster")), "clusters", "cluster")
    user: dict[str, Any] = {}
    if context.get("user"):
        user = _named(cfg.get("users") or [], str(context["user"]), "users", "user")

    def path(value: Any, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise PodSourceError(f"kubeconfig: {what} must be a path")
        return value if os.path.isabs(value) else os.path.join(base_dir, value)

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise PodSourceError(f"{origin}: cluster server must be an http(s) URL")
    if "exec" in user or "auth-provider" in user:
        raise PodSourceError(f"{origin}: exec and auth-provider credentials are not supported by headrace-cni")
    token: str | None = None
    if user.get("token"):
        token = str(user["token"])
    elif user.get("tokenFile"):
        token_file = path(user["tokenFile"], "tokenFile")
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise PodSourceError(f"{origin}: token file {token_file!r}: {exc.strerror}") from exc
    proxy = cluster.get("proxy-url")
    return KubeCredentials(
        server=server.rstrip("/"),
        ca_data=_b64(cluster["certificate-authority-data"], "certificate-authority-data")
        if cluster.get("certificate-authority-data")
        else None,
        ca_file=path(cluster["certificate-authority"], "certificate-authority")
        if cluster.get("certificate-authority")
        else None,
        insecure=cluster.get("insecure-skip-tls-verify") is True,
        token=token,
        cert_data=_b64(user["client-certificate-data"], "client-certificate-data")
        if user.get("client-certificate-data")
        else None,
        key_data=_b64(user["client-key-data"], "client-key-data") if user.get("client-key-data") else None,
        cert_file=path(user["client-certificate"], "client-certificate") if user.get("client-certificate") else None,
        key_file=path(user["client-key"], "client-key") if user.get("client-key") else None,
        proxy_url=proxy if isinstance(proxy, str) and proxy else None,
    )


def _ssl_context(creds: KubeCredentials) -> ssl.SSLContext:
    import shutil
    import ssl
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if creds.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif creds.ca_data or creds.ca_file:
        try:
            if creds.ca_data:
                ctx.load_verify_locations(cadata=creds.ca_data.decode("ascii", "replace"))
            if creds.ca_file:
                ctx.load_verify_locations(cafile=creds.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise PodSourceError(f"kubeconfig: cannot load the cluster CA: {exc}") from exc
    else:
        ctx.load_default_certs()
    cert_file, key_file = creds.cert_file, creds.key_file
    tmpdir = None
    try:
        if creds.cert_data or creds.key_data:
            tmpdir = tempfile.mkdtemp(prefix="headrace-cni-")  # mode 0700
            if creds.cert_data:
                cert_file = os.path.join(tmpdir, "cert.pem")
                _write_private(cert_file, creds.cert_data)
            if creds.key_data:
                key_file = os.path.join(tmpdir, "key.pem")
                _write_private(key_file, creds.key_data)
        if cert_file:
            try:
                ctx.load_cert_chain(cert_file, key_file)
            except (OSError, ssl.SSLError) as exc:
                raise PodSourceError(f"kubeconfig: cannot load the client certificate: {exc}") from exc
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return ctx


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class KubeApiSource:
    """GET /api/v1/namespaces/NS/pods/NAME and /api/v1/namespaces/NS with the kubeconfig's credentials."""

    authoritative = True

    def __init__(self, kubeconfig: str, timeout: float = 5.0) -> None:
        self.kubeconfig = kubeconfig
        self.timeout = timeout
        self._creds: KubeCredentials | None = None
        self._opener: urllib.request.OpenerDirector | None = None

    def credentials(self) -> KubeCredentials:
        if self._creds is None:
            try:
                with open(self.kubeconfig, encoding="utf-8") as fh:
                    text = fh.read(MAX_OBJECT_BYTES)
            except (OSError, UnicodeDecodeError) as exc:
                raise PodSourceError(f"kubeconfig {self.kubeconfig!r} is not readable: {exc}") from exc
            self._creds = parse_kubeconfig(text, os.path.dirname(self.kubeconfig), self.kubeconfig)
        return self._creds

    def _get(self, api_path: str) -> dict[str, Any] | None:
        import urllib.error
        import urllib.request

        creds = self.credentials()
        if self._opener is None:
            proxies = {"http": creds.proxy_url, "https": creds.proxy_url} if creds.proxy_url else {}
            handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler(proxies)]
            if creds.server.startswith("https://"):
                handlers.append(urllib.request.HTTPSHandler(context=_ssl_context(creds)))
            self._opener = urllib.request.build_opener(*handlers)
        headers = {"Accept": "application/json", "User-Agent": "headrace-cni"}
        if creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        url = creds.server + api_path
        request = urllib.request.Request(url, headers=headers, method="GET")  # noqa: S310 - http(s) only
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                body = resp.read(MAX_OBJECT_BYTES + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            hint = " (check the plugin's RBAC: get pods and namespaces)" if exc.code in (401, 403) else ""
            raise PodSourceError(f"Kubernetes API GET {api_path}: HTTP {exc.code} {exc.reason}{hint}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PodSourceError(f"Kubernetes API at {creds.server} unreachable: {reason}") from exc
        if len(body) > MAX_OBJECT_BYTES:
            raise PodSourceError(f"Kubernetes API GET {api_path}: response too large")
        import json  # Kubernetes source only

        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PodSourceError(f"Kubernetes API GET {api_path}: response is not JSON") from exc
        if not isinstance(obj, dict):
            raise PodSourceError(f"Kubernetes API GET {api_path}: response is not an object")
        return obj

    def get_pod(self, namespace: str, name: str) -> Pod | None:
        from urllib.parse import quote

        obj = self._get(f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}")
        if obj is None:
            return None
        if obj.get("kind") not in (None, "Pod"):
            raise PodSourceError(f"Kubernetes API returned a {obj.get('kind')!r} for pod {namespace}/{name}")
        try:
            return pod_from_object(obj)
        except ObjectError as exc:
            raise PodSourceError(f"Kubernetes API: {exc}") from exc

    def get_namespace(self, name: str) -> Namespace | None:
        from urllib.parse import quote

        obj = self._get(f"/api/v1/namespaces/{quote(name, safe='')}")
        if obj is None:
            return None
        if obj.get("kind") not in (None, "Namespace"):
            raise PodSourceError(f"Kubernetes API returned a {obj.get('kind')!r} for namespace {name}")
        try:
            return namespace_from_object(obj)
        except ObjectError as exc:
            raise PodSourceError(f"Kubernetes API: {exc}") from exc
