"""Pod source: the Kubernetes API through the official client (list + watch, resume, re-list, backoff).

Two watchers run in threads: the pods of this node (field selector `spec.nodeName=<node>`) and all
namespaces. Each lists first (taking the list's resourceVersion), then watches from that version,
following every event's resourceVersion (bookmarks included). A watch that ends or drops is resumed from
the last version; a `410 Gone` (as an HTTP status or as an ERROR watch event) forces a fresh list; other
errors back off exponentially (capped) before retrying.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cni.contract.kube_objects import ObjectError, namespace_from_object, pod_from_object
from node_agent.sources.store import PodStore

log = logging.getLogger("headrace.agent.k8s")


class GoneError(Exception):
    """The resourceVersion we resume from is too old: re-list."""


class Backoff:
    """Exponential backoff with jitter; reset after a success."""

    def __init__(self, initial: float = 0.2, maximum: float = 30.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * self.factor)
        return delay * (0.8 + 0.4 * random.random())  # noqa: S311 - jitter, not crypto

    def reset(self) -> None:
        self._next = self.initial


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
        watch_timeout: int,
        backoff: Backoff,
    ) -> None:
        self.kind = kind
        self._list_fn = list_fn
        self._on_list = on_list
        self._on_event = on_event
        self._stop = stop
        self._extra = extra
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self.resource_version = ""
        self.lists = 0
        self.watches = 0
        self._resp: Any = None
        self._lock = threading.Lock()

    def _call(self, **kwargs: Any) -> Any:
        return self._list_fn(_preload_content=False, **self._extra, **kwargs)

    def relist(self) -> None:
        resp = self._call(_request_timeout=30)
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = body.get("items") or []
        if not isinstance(items, list):
            raise ValueError(f"{self.kind} list: items is not a list")
        self._on_list(items)
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self.lists += 1
        log.info("listed", extra={"step": f"{self.kind}-list", "count": len(items)})

    def watch_once(self) -> None:
        resp = self._call(
            watch=True,
            resource_version=self.resource_version or None,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _request_timeout=(10, self._watch_timeout + 15),
        )
        self.watches += 1
        with self._lock:
            self._resp = resp
        try:
            for line in _iter_lines(resp):
                if self._stop.is_set():
                    return
                self._handle(json.loads(line))
        finally:
            with self._lock:
                self._resp = None
            resp.release_conn()

    def _handle(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise GoneError(obj.get("message", "resourceVersion too old"))
            raise RuntimeError(f"watch error event: {obj.get('message', obj)}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("unknown watch event", extra={"step": f"{self.kind}-watch", "type": etype})
            return
        self._on_event(str(etype), obj)
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
        from kubernetes.client.exceptions import ApiException  # lazy: heavy import

        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self.relist()
                    need_list = False
                    self._backoff.reset()
                self.watch_once()
                self._backoff.reset()  # a watch that ended normally: resume from the last version
            except GoneError as exc:
                log.info("resourceVersion gone, re-listing", extra={"step": f"{self.kind}-gone",
                                                                     "error": str(exc)})
                need_list = True
            except ApiException as exc:
                if exc.status == 410:
                    need_list = True
                    continue
                self._sleep_after(exc)
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._sleep_after(exc)

    def _sleep_after(self, exc: BaseException) -> None:
        delay = self._backoff.next_delay()
        log.warning(
            "kubernetes %s: %s; retrying in %.1fs", self.kind, exc, delay,
            extra={"step": f"{self.kind}-error"},
        )
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
    """Fills a PodStore from the Kubernetes API: in-cluster config, or the API server of a kubeconfig."""

    def __init__(
        self,
        store: PodStore,
        kubeconfig: Path | None,
        node_name: str,
        *,
        watch_timeout: int = 300,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
    ) -> None:
        from kubernetes import client  # lazy: heavy import

        self._store = store
        self._stop = threading.Event()
        cfg = client.Configuration()
        load_client_config(cfg, kubeconfig)
        self._api_client = client.ApiClient(cfg)
        api = self._api = client.CoreV1Api(self._api_client)
        self.node_name = node_name
        self.pods = _Watcher(
            "pods", api.list_pod_for_all_namespaces, self._pods_listed, self._pod_event, self._stop,
            {"field_selector": f"spec.nodeName={node_name}"}, watch_timeout,
            Backoff(backoff_initial, backoff_max),
        )
        self.namespaces = _Watcher(
            "namespaces", api.list_namespace, self._namespaces_listed, self._namespace_event, self._stop,
            {}, watch_timeout, Backoff(backoff_initial, backoff_max),
        )
        self._threads: list[threading.Thread] = []

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
