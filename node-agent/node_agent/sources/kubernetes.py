"""Pod source: the Kubernetes API through the official client (list + watch, resume, re-list, backoff).

Two watchers run in threads: the pods of this node (field selector `spec.nodeName=<node>`) and all
namespaces. Each lists first, then watches from the list's resourceVersion, following every event's
resourceVersion (bookmarks included). The first list asks for resourceVersion "0": the API server answers
it from its watch cache, where a list without one is a consistent read from etcd of every pod of the
cluster (the field selector is applied after the read), on every node at once in a DaemonSet rollout.
A watch that ends or drops is resumed from the last version; a `410 Gone` (an HTTP status or an ERROR
watch event) forces a fresh list, a consistent one (the watch cache may be behind what the watch already
delivered). Every failure -- a 410 included, and a watch that ended within a second without an event --
is retried after an exponential backoff with jitter (`watch_policy`), reset by a healthy watch. A watch
silent for `stall_timeout` seconds is given up and resumed (see `KubernetesSource`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cni.contract.kube_objects import ObjectError, namespace_from_object, pod_from_object
from node_agent.sources.store import PodStore
from node_agent.sources.watch_policy import (
    Backoff,
    BadResponseError,
    ErrorEventError,
    GoneError,
    ShortWatchError,
    StalledError,
    WatcherFigures,
    WatchStats,
    WatchTiming,
    error_reason,
)

log = logging.getLogger("headrace.agent.k8s")

# TCP keepalive of the API connections: probes after 30 s idle, 10 s apart, the connection reset after 3
# unanswered ones (about 60 s for a peer that is gone)
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3


def keepalive_socket_options() -> list[tuple[int, int, int]]:
    """urllib3's default socket options (TCP_NODELAY: urllib3 replaces them with the list it is given)
    plus TCP keepalive."""
    from urllib3.connection import HTTPConnection  # lazy: the client's dependency

    return [*HTTPConnection.default_socket_options,
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)]


def describe(exc: BaseException) -> str:
    """One line for the log: an API error's status and (shortened) body, else the exception's text."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status:
        body = " ".join(str(getattr(exc, "body", "") or "").split())
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''}: {body[:300]}".rstrip(": ")
    return str(exc) or type(exc).__name__


def _chunks(resp: Any) -> Iterator[bytes]:
    """Data as it arrives: per HTTP chunk (API servers stream watches chunked), else whatever is read."""
    if getattr(resp, "chunked", False):
        yield from resp.stream(amt=None, decode_content=True)
        return
    while True:
        data = resp.read1(65536)
        if not data:
            return
        yield data


def _iter_lines(resp: Any) -> Iterator[bytes]:
    buf = b""
    for chunk in _chunks(resp):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


class _Watcher:
    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
        extra: dict[str, Any],
        timing: WatchTiming,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind = kind
        self._list_fn = list_fn
        self._on_list = on_list
        self._on_event = on_event
        self._stop = stop
        self._extra = extra
        self._timing = timing
        self._backoff = backoff
        self._clock = clock
        self.stats = WatchStats(clock)
        self.resource_version = ""
        self._need_list = True
        self._consistent_list = False  # after a 410: the next list without resourceVersion
        self._watch_start: float | None = None  # of the watch of the current attempt (None: none yet)
        self._watch_events = 0
        self._resp: Any = None
        self._lock = threading.Lock()

    @property
    def lists(self) -> int:
        return self.stats.figures().lists

    @property
    def watches(self) -> int:
        return self.stats.figures().watches

    def _call(self, **kwargs: Any) -> Any:
        return self._list_fn(_preload_content=False, **self._extra, **kwargs)

    def relist(self) -> None:
        version = None if self._consistent_list else "0"  # "0": from the API server's watch cache
        resp = self._call(resource_version=version, _request_timeout=self._timing.list_timeout)
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = (body.get("items") or []) if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise BadResponseError(f"{self.kind} list: no list of items")
        self._on_list(items)
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self._need_list = self._consistent_list = False
        self.stats.listed()
        log.info("listed", extra={"step": f"{self.kind}-list", "count": len(items),
                                  "consistent": version is None})

    def watch_once(self) -> None:
        from urllib3.exceptions import ReadTimeoutError  # lazy: the client's dependency

        self._watch_start, self._watch_events = self._clock(), 0
        self.stats.watch_opened()
        resp = self._call(
            watch=True,
            resource_version=self.resource_version or None,
            allow_watch_bookmarks=True,
            timeout_seconds=self._timing.watch_timeout,
            _request_timeout=(10, self._timing.stall_timeout),  # read: the longest silence between chunks
        )
        with self._lock:
            self._resp = resp
        try:
            for line in _iter_lines(resp):
                if self._stop.is_set():
                    return
                self._handle(line)
        except (ReadTimeoutError, TimeoutError) as exc:
            raise StalledError(f"watch silent for {self._timing.stall_timeout:g}s") from exc
        finally:
            with self._lock:
                self._resp = None
            resp.release_conn()

    def _handle(self, line: bytes) -> None:
        event = json.loads(line)
        if not (isinstance(event, dict) and isinstance(event.get("type"), str)
                and isinstance(event.get("object"), dict)):
            raise BadResponseError(f"{self.kind} watch: not a watch event: {line[:200]!r}")
        etype, obj = event["type"], event["object"]
        if etype == "ERROR":
            message = str(obj.get("message", obj))
            if obj.get("code") == 410:
                raise GoneError(message or "resourceVersion too old")
            raise ErrorEventError(obj.get("code"), f"watch error event: {message}")
        self._watch_events += 1
        self.stats.synced()
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("unknown watch event", extra={"step": f"{self.kind}-watch", "type": etype})
            return
        self._on_event(etype, obj)
        if rv:
            self.resource_version = str(rv)

    def interrupt(self) -> None:
        with self._lock:
            resp = self._resp
        if resp is not None:
            try:
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
            except Exception:  # noqa: S110 - best effort on shutdown
                pass

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._attempt()
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._retry_after(exc)

    def _attempt(self) -> None:
        """A list when one is needed, then one watch until it ends. A watch that ended at once without an
        event is a failure (ShortWatchError); one that delivered events or lasted resets the backoff."""
        self._watch_start = None
        if self._need_list:
            self.relist()
        self.watch_once()
        if self._stop.is_set() or self._watch_start is None:
            return
        duration = self._clock() - self._watch_start
        if self._timing.is_short(duration, self._watch_events):
            raise ShortWatchError(f"watch ended after {duration:.3f}s without an event")
        if self._timing.is_healthy(duration, self._watch_events):
            self._backoff.reset()

    def _retry_after(self, exc: Exception) -> None:
        reason = error_reason(exc)
        if reason == "gone":
            self._need_list = self._consistent_list = True
        start = self._watch_start
        if start is not None and self._timing.is_healthy(self._clock() - start, self._watch_events):
            self._backoff.reset()  # a watch that served well before it failed: start over from the shortest
        self.stats.failed(reason)
        delay = self._backoff.next_delay()
        gone = reason == "gone"
        log.log(logging.INFO if gone else logging.WARNING,
                "kubernetes %s: %s; %s in %.1fs", self.kind, describe(exc), "re-listing" if gone else "retrying",
                delay, extra={"step": f"{self.kind}-{'gone' if gone else 'error'}", "reason": reason,
                              "delay": round(delay, 3)})
        self._stop.wait(delay)


def load_client_config(cfg: Any, kubeconfig: Path | None) -> None:
    """Fill a client Configuration: from the kubeconfig file when one is given, else in-cluster (the
    pod's service account). In-cluster, the client re-reads the projected token file before it expires
    (`try_refresh_token`), so a rotated service-account token is picked up without a restart."""
    from kubernetes import config  # lazy: heavy import

    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg, persist_config=False)
    else:
        config.load_incluster_config(client_configuration=cfg, try_refresh_token=True)


class KubernetesSource:
    """Fills a PodStore from the Kubernetes API: in-cluster config, or the API server of a kubeconfig.

    A dead watch is noticed well before the server's `watch_timeout` (a half-open connection behind a load
    balancer would otherwise hide label changes and opt-outs for minutes), by two means:
    - TCP keepalive on every connection (`keepalive_socket_options`): keeps an idle flow alive in NAT
      tables and load balancers whose idle timeout (often 4 to 6 minutes) is shorter than a watch, and
      resets a connection whose peer is gone within about a minute. It cannot tell a peer that answers
      the probes but sends nothing (a proxy whose upstream connection died, a stuck API server), hence
    - a read timeout of `stall_timeout` seconds between two received chunks of a watch. The watch asks
      for bookmarks, which the API server sends on a quiet watch about once a minute, so 90 s of silence
      means a dead stream; the watch is then resumed from the last resourceVersion (no list). A server that
      sends no bookmarks costs one such resumed watch per 90 s of quiet, no more.
    The server-side `watch_timeout` is unchanged: it ends a healthy watch normally."""

    def __init__(
        self,
        store: PodStore,
        kubeconfig: Path | None,
        node_name: str,
        *,
        watch_timeout: int = 300,
        stall_timeout: float = 90.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        from kubernetes import client  # lazy: heavy import

        self._store = store
        self._stop = threading.Event()
        cfg = client.Configuration()
        load_client_config(cfg, kubeconfig)
        cfg.socket_options = keepalive_socket_options()
        self._api_client = client.ApiClient(cfg)
        api = self._api = client.CoreV1Api(self._api_client)
        self.node_name = node_name
        timing = WatchTiming(watch_timeout=watch_timeout, stall_timeout=stall_timeout)
        self.pods = _Watcher(
            "pods", api.list_pod_for_all_namespaces, self._pods_listed, self._pod_event, self._stop,
            {"field_selector": f"spec.nodeName={node_name}"}, timing, Backoff(backoff_initial, backoff_max),
        )
        self.namespaces = _Watcher(
            "namespaces", api.list_namespace, self._namespaces_listed, self._namespace_event, self._stop,
            {}, timing, Backoff(backoff_initial, backoff_max),
        )
        self._threads: list[threading.Thread] = []

    def figures(self) -> dict[str, WatcherFigures]:
        """Each watcher's figures (`resource` label of the agent's headrace_agent_kube_* metrics)."""
        return {w.kind: w.stats.figures() for w in (self.pods, self.namespaces)}

    def _pods_listed(self, items: list[dict[str, Any]]) -> None:
        pods = []
        for item in items:
            try:
                pods.append(pod_from_object(item))
            except ObjectError as exc:
                log.warning("skipping malformed pod: %s", exc, extra={"step": "pods-list"})
        self._store.replace_pods(pods)

    def _pod_event(self, etype: str, obj: dict[str, Any]) -> None:
        try:
            pod = pod_from_object(obj)
        except ObjectError as exc:
            log.warning("skipping malformed pod event: %s", exc, extra={"step": "pods-watch"})
            return
        if etype == "DELETED":
            self._store.delete_pod(pod.uid)
        else:
            self._store.upsert_pod(pod)

    def _namespaces_listed(self, items: list[dict[str, Any]]) -> None:
        nss = []
        for item in items:
            try:
                nss.append(namespace_from_object(item))
            except ObjectError as exc:
                log.warning("skipping malformed namespace: %s", exc, extra={"step": "namespaces-list"})
        self._store.replace_namespaces(nss)

    def _namespace_event(self, etype: str, obj: dict[str, Any]) -> None:
        try:
            ns = namespace_from_object(obj)
        except ObjectError as exc:
            log.warning("skipping malformed namespace event: %s", exc, extra={"step": "namespaces-watch"})
            return
        if etype == "DELETED":
            self._store.delete_namespace(ns.name)
        else:
            self._store.upsert_namespace(ns)

    def patch_redirection(self, namespace: str, name: str, enabled: bool) -> None:
        """Set or remove the ambient redirection annotation: a merge patch of the pod's status subresource
        (RBAC: patch pods/status only). A pod that is gone is not an error."""
        from kubernetes.client.exceptions import ApiException  # lazy: heavy import

        from node_agent.sources.redirection_mark import merge_patch

        try:
            resp = self._api.patch_namespaced_pod_status(name, namespace, merge_patch(enabled),
                                                         _content_type="application/merge-patch+json",
                                                         _request_timeout=10, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return
        resp.read()  # the pod as stored: not needed (the watch brings it), but a body left unread would
        resp.release_conn()  # be taken for the next response on this pooled connection

    def start(self) -> None:
        for watcher in (self.pods, self.namespaces):
            t = threading.Thread(target=watcher.run, name=f"k8s-{watcher.kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for watcher in (self.pods, self.namespaces):
            watcher.interrupt()
        for t in self._threads:
            t.join(timeout)
        self._api_client.close()
