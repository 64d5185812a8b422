"""Is our DaemonSet going away? Decides, when install-cni is told to stop, between uninstall and keep.

A pod of the DaemonSet stops for two different reasons:

- the DaemonSet is being deleted (`kubectl delete -k deploy`, a namespace deletion): nothing will put a
  new pod on this node, so our conflist entry and launcher must go, or every later pod ADD on the node
  fails (a plugin whose agent and credentials are gone);
- a rolling update, a restart, an eviction: a new pod of the same DaemonSet follows, and removing the
  entry would let pods start unredirected in between, so everything stays.

So at termination install-cni GETs its DaemonSet: present without `deletionTimestamp` means keep;
`404`, a `deletionTimestamp`, or `401`/`403` (our service account or its RBAC binding deleted first,
as a `kubectl delete -k` of the whole set does) means uninstall. Anything else (API unreachable, 5xx)
is unknown and keeps the files: the log line says to run `headrace uninstall-cni` if the DaemonSet was
deleted. The decision is a pure function (`decide`) of what the GET returned. A `404`, `401` or `403`
counts only when the DaemonSet was seen present since the process started (`OwnerCheck`). The agent
asks the same question, with its own client, before it leaves the node (`node_agent.agent.uninstall`).
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from cni.plugin.kube_api import KubeCredentials, parse_kubeconfig
from cni.plugin.pod_source import PodSourceError

KEEP = "keep"
UNINSTALL = "uninstall"
UNKNOWN = "unknown"
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Verdict:
    action: str  # KEEP, UNINSTALL or UNKNOWN
    reason: str
    status: int | None = None  # the HTTP status it was decided on (None: no answer)

    @property
    def uninstall(self) -> bool:
        return self.action == UNINSTALL

    @property
    def deleting(self) -> bool:
        """The DaemonSet itself says it is being deleted (not an absence or a refusal)."""
        return self.action == UNINSTALL and self.status == 200


def decide(status: int | None, body: bytes | None, error: str = "") -> Verdict:
    """What the GET of our DaemonSet means: `status` None when there was no HTTP answer at all."""
    if status is None:
        return Verdict(UNKNOWN, f"Kubernetes API unreachable: {error}")
    if status == 404:
        return Verdict(UNINSTALL, "the DaemonSet no longer exists", status)
    if status in (401, 403):
        return Verdict(UNINSTALL, f"HTTP {status}: our service account or its RBAC binding is gone", status)
    if status != 200:
        return Verdict(UNKNOWN, f"HTTP {status} from the Kubernetes API", status)
    try:
        obj = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        return Verdict(UNKNOWN, "the DaemonSet GET returned no JSON", status)
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return Verdict(UNKNOWN, "the DaemonSet GET returned no object metadata", status)
    if meta.get("deletionTimestamp"):
        return Verdict(UNINSTALL, f"the DaemonSet is being deleted (since {meta['deletionTimestamp']})", status)
    return Verdict(KEEP, "the DaemonSet is still there: a rolling update or a restart", status)


def ask(check: Callable[[], Verdict], attempts: int = 3, pause: float = 1.0) -> Verdict:
    """`check()` until it gives a KEEP or UNINSTALL answer, at most `attempts` times `pause` s apart (within
    the pod's grace period); the last answer, UNKNOWN when none was clear."""
    verdict = check()
    for _ in range(attempts - 1):
        if verdict.action != UNKNOWN:
            break
        time.sleep(pause)
        verdict = check()
    return verdict


class OwnerCheck:
    """The question asked at start, until the DaemonSet is seen present, and again at termination (`final`).

    A 404, 401 or 403 at termination is taken for an uninstall only when the DaemonSet was seen present since
    the start: a process that could never read it (a misspelt name, RBAC missing) would otherwise take every
    restart for an uninstall, and remove the plugin or the node's rules on each rolling update. A
    `deletionTimestamp` always counts: the DaemonSet itself says so. `unseen` hears the last answer when
    the looks at start end without seeing it."""

    START_DELAYS: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # before each look at start

    def __init__(self, check: Callable[[], Verdict], pause: float = 1.0,
                 unseen: Callable[[Verdict], None] | None = None) -> None:
        self.check = check
        self.pause = pause
        self.unseen = unseen
        self.seen = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._look, name="owner-check", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _look(self) -> None:
        verdict = Verdict(UNKNOWN, "not asked")
        for delay in self.START_DELAYS:
            if self._stop.wait(delay):
                return
            verdict = self.check()
            if verdict.action == KEEP:
                self.seen.set()
                return
        if self.unseen is not None:
            self.unseen(verdict)

    def final(self) -> Verdict:
        """At termination: the answer (asked up to three times while unclear, see `ask`), an uninstall not
        backed by a sighting since the start turned into UNKNOWN."""
        self._stop.set()
        verdict = ask(self.check, pause=self.pause)
        if verdict.uninstall and not (verdict.deleting or self.seen.is_set()):
            return Verdict(UNKNOWN, f"{verdict.reason}; but the DaemonSet was never seen since the start (a wrong "
                           "name, or RBAC that never let us read it?)", verdict.status)
        return verdict


def daemonset_path(namespace: str, name: str) -> str:
    q = urllib.parse.quote
    return f"/apis/apps/v1/namespaces/{q(namespace, safe='')}/daemonsets/{q(name, safe='')}"


def _ssl_context(creds: KubeCredentials) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if creds.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif creds.ca_data:
        ctx.load_verify_locations(cadata=creds.ca_data.decode("ascii", "replace"))
    elif creds.ca_file:
        ctx.load_verify_locations(cafile=creds.ca_file)
    if creds.cert_file:
        ctx.load_cert_chain(creds.cert_file, creds.key_file)
    return ctx


def check_daemonset(kubeconfig_path: str, namespace: str, name: str, timeout: float = 5.0) -> Verdict:
    """GET the DaemonSet with the kubeconfig's credentials (bearer token or client cert files) and decide."""
    try:
        with open(kubeconfig_path, encoding="utf-8") as fh:
            creds = parse_kubeconfig(fh.read(MAX_BODY), os.path.dirname(kubeconfig_path), kubeconfig_path)
    except (OSError, UnicodeDecodeError, ValueError, PodSourceError) as exc:
        return Verdict(UNKNOWN, f"kubeconfig {kubeconfig_path} unusable: {exc}")
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if creds.server.startswith("https://"):
        try:
            handlers.append(urllib.request.HTTPSHandler(context=_ssl_context(creds)))
        except (OSError, ssl.SSLError) as exc:
            return Verdict(UNKNOWN, f"cannot load the cluster CA: {exc}")
    headers = {"Accept": "application/json", "User-Agent": "headrace-install-cni"}
    if creds.token:
        headers["Authorization"] = f"Bearer {creds.token}"
    url = creds.server.rstrip("/") + daemonset_path(namespace, name)
    request = urllib.request.Request(url, headers=headers, method="GET")  # noqa: S310 - http(s) from kubeconfig
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as resp:
            return decide(resp.status, resp.read(MAX_BODY))
    except urllib.error.HTTPError as exc:
        return decide(exc.code, None)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return decide(None, None, str(getattr(exc, "reason", exc)))
