"""A tiny Kubernetes API server for the agent's pod-source tests: real list/watch JSON over HTTP.

Serves /api/v1/pods (fieldSelector spec.nodeName=...) and /api/v1/namespaces: lists with a
resourceVersion, and `?watch=true` streams of newline-delimited WatchEvents (chunked, as the real API
server does) from the requested resourceVersion, with a BOOKMARK every `bookmark_interval` seconds when
set and asked for. Tests can drop every open watch, compact history (a watch from an older version then
gets a 410 ERROR event), make the next requests fail with HTTP 500, answer every request of a kind with an
error status (`refuse`), and answer its watches the ways a broken server or proxy does (`watch_answers`:
see WATCH_ANSWERS). Every request is recorded with its time. A DaemonSet GET is answered as
`set_daemonset` says (present, being deleted, gone, forbidden, failing).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from node_agent.install_cni.owner import daemonset_path

TOKEN = "test-token"

# how `watch_answers[kind]` has the watches of that kind answered
WATCH_ANSWERS = (
    "gone_event",  # 200 and at once a 410 ERROR event, whatever the resourceVersion
    "gone_status",  # HTTP 410
    "empty",  # 200 with an empty body (Content-Length: 0)
    "not_watch",  # 200 with a list body instead of a watch stream
    "stall",  # 200, chunked, then silence until the watches are dropped (a half-open connection)
)
GONE = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
        "message": "too old resource version"}


class FakeApiServer:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"pods": {}, "namespaces": {}}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, kind, type, obj)
        self.compacted = 0
        self.drop_generation = 0
        self.fail_next = 0
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.request_times: list[float] = []  # time.monotonic() of each of `requests`
        self.refuse: dict[str, int] = {}  # kind: the HTTP status every list and watch of it gets
        self.watch_answers: dict[str, str] = {}  # kind: one of WATCH_ANSWERS
        self.bookmark_interval: float | None = None  # seconds between BOOKMARKs on watches that ask for them
        self.bookmarks_sent = 0
        self.unauthorized = 0
        self.patches: list[tuple[str, str, dict[str, Any]]] = []  # (path, Content-Type, body) of each PATCH
        self.daemonsets: dict[str, tuple[int, dict[str, Any]]] = {}  # path: (HTTP code, body) of its GET
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                server.handle(self)

            def do_PATCH(self) -> None:
                server.handle_patch(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ---- control ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.drop_generation += 1
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def write_kubeconfig(self, path: Any) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }
        path.write_text(json.dumps(cfg))

    def put(self, kind: str, obj: dict[str, Any], silent: bool = False) -> None:
        """Create or update; `silent` changes the object without a watch event (lost in a gap)."""
        with self.cond:
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
            key = self._key(kind, obj)
            etype = "MODIFIED" if key in self.objects[kind] else "ADDED"
            self.objects[kind][key] = obj
            if not silent:
                self.events.append((self.rv, kind, etype, obj))
            self.cond.notify_all()

    def delete(self, kind: str, namespace: str, name: str, silent: bool = False) -> None:
        with self.cond:
            key = f"{namespace}/{name}" if kind == "pods" else name
            obj = self.objects[kind].pop(key)
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if not silent:
                self.events.append((self.rv, kind, "DELETED", obj))
            self.cond.notify_all()

    def set_daemonset(self, namespace: str, name: str, state: str) -> None:
        """How a GET of DaemonSet namespace/name is answered: `present`, `deleting` (a deletionTimestamp),
        `gone` (404), `forbidden` (403) or `failing` (500)."""
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"ds-{name}"}
        if state == "deleting":
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        codes = {"present": 200, "deleting": 200, "gone": 404, "forbidden": 403, "failing": 500}
        body = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta} if codes[state] == 200 else {
            "kind": "Status", "code": codes[state]}
        with self.cond:
            self.daemonsets[daemonset_path(namespace, name)] = (codes[state], body)

    def compact(self) -> None:
        """Forget history: watches from an older resourceVersion get 410 Gone."""
        with self.cond:
            self.rv += 1
            self.compacted = self.rv
            self.cond.notify_all()

    def drop_watches(self) -> None:
        with self.cond:
            self.drop_generation += 1
            self.cond.notify_all()

    def count(self, kind: str, watch: bool) -> int:
        with self.cond:
            return sum(1 for path, q in self.requests if path.endswith(kind) and ("watch" in q) == watch)

    def times(self, kind: str, watch: bool) -> list[float]:
        """When each list (or watch) of `kind` was asked for."""
        with self.cond:
            return [t for (path, q), t in zip(self.requests, self.request_times, strict=True)
                    if path.endswith(kind) and ("watch" in q) == watch]

    def list_versions(self, kind: str) -> list[str | None]:
        """The resourceVersion each list of `kind` asked for (None: not given, a consistent read)."""
        with self.cond:
            return [q["resourceVersion"][0] if "resourceVersion" in q else None
                    for path, q in self.requests if path.endswith(kind) and "watch" not in q]

    def watch_versions(self, kind: str) -> list[str]:
        with self.cond:
            return [
                q.get("resourceVersion", [""])[0] for path, q in self.requests if path.endswith(kind) and "watch" in q
            ]

    # ---- serving ---------------------------------------------------------------------------------
    @staticmethod
    def _key(kind: str, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return f"{meta.get('namespace', 'default')}/{meta['name']}" if kind == "pods" else str(meta["name"])

    @staticmethod
    def _matches(kind: str, obj: dict[str, Any], query: dict[str, list[str]]) -> bool:
        sel = query.get("fieldSelector", [""])[0]
        if kind != "pods" or not sel:
            return True
        field, _, value = sel.partition("=")
        assert field == "spec.nodeName", sel
        return bool(obj.get("spec", {}).get("nodeName") == value)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = parse_qs(url.query)
        kind = url.path.rsplit("/", 1)[-1]
        with self.cond:
            self.requests.append((url.path, query))
            self.request_times.append(time.monotonic())
            if h.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.unauthorized += 1
                self._json(h, 401, {"kind": "Status", "code": 401})
                return
            if self.fail_next > 0:
                self.fail_next -= 1
                self._json(h, 500, {"kind": "Status", "code": 500, "message": "injected failure"})
                return
            refused = self.refuse.get(kind) if url.path in ("/api/v1/pods", "/api/v1/namespaces") else None
            answer = self.watch_answers.get(kind)
        if refused is not None:
            self._json(h, refused, {"kind": "Status", "code": refused, "message": f"refused with {refused}"})
            return
        if url.path in self.daemonsets:
            self._json(h, *self.daemonsets[url.path])
            return
        if url.path not in ("/api/v1/pods", "/api/v1/namespaces"):
            self._json(h, 404, {"kind": "Status", "code": 404})
            return
        if query.get("watch", ["false"])[0] in ("true", "1"):
            if answer is not None:
                self._broken_watch(h, kind, answer)
            else:
                self._watch(h, kind, query)
            return
        with self.cond:
            items = [o for o in self.objects[kind].values() if self._matches(kind, o, query)]
            body = {
                "kind": "PodList" if kind == "pods" else "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        self._json(h, 200, body)

    def handle_patch(self, h: BaseHTTPRequestHandler) -> None:
        """PATCH /api/v1/namespaces/NS/pods/NAME[/status] with a JSON merge patch of metadata.annotations
        (the only patch the agent sends); recorded in `patches`, applied, and a MODIFIED event emitted."""
        path = urlparse(h.path).path
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", "0") or 0)) or b"{}")
        ctype = h.headers.get("Content-Type", "")
        parts = path.strip("/").split("/")
        with self.cond:
            self.patches.append((path, ctype, body))
            if h.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._json(h, 401, {"kind": "Status", "code": 401})
                return
            if len(parts) < 6 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "pods":
                self._json(h, 404, {"kind": "Status", "code": 404})
                return
            if ctype != "application/merge-patch+json":
                self._json(h, 415, {"kind": "Status", "code": 415, "message": f"unsupported {ctype}"})
                return
            obj = self.objects["pods"].get(f"{parts[3]}/{parts[5]}")
            if obj is None:
                self._json(h, 404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                return
            obj = copy.deepcopy(obj)
            notes = obj.setdefault("metadata", {}).get("annotations") or {}
            for key, value in ((body.get("metadata") or {}).get("annotations") or {}).items():
                if value is None:
                    notes.pop(key, None)
                else:
                    notes[key] = value
            obj["metadata"]["annotations"] = notes
        self.put("pods", obj)
        self._json(h, 200, obj)

    def _broken_watch(self, h: BaseHTTPRequestHandler, kind: str, answer: str) -> None:
        """A watch answered as WATCH_ANSWERS says."""
        if answer == "gone_status":
            self._json(h, 410, GONE)
            return
        if answer == "empty":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if answer == "not_watch":
            self._json(h, 200, {"kind": "PodList" if kind == "pods" else "NamespaceList", "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(self.rv)}, "items": []})
            return
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.wfile.flush()
        try:
            if answer == "gone_event":
                data = (json.dumps({"type": "ERROR", "object": GONE}) + "\n").encode()
                h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
                return
            assert answer == "stall", answer
            with self.cond:
                generation = self.drop_generation
                while self.drop_generation == generation:
                    self.cond.wait(0.2)
            h.close_connection = True  # dropped: no terminating chunk, just close
        except (BrokenPipeError, ConnectionResetError):
            return

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _watch(self, h: BaseHTTPRequestHandler, kind: str, query: dict[str, list[str]]) -> None:
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        timeout = float(query.get("timeoutSeconds", ["30"])[0])
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(obj: dict[str, Any]) -> None:
            data = (json.dumps(obj) + "\n").encode()
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        try:
            with self.cond:
                generation = self.drop_generation
                if since and since < self.compacted:
                    chunk(
                        {
                            "type": "ERROR",
                            "object": {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "status": "Failure",
                                "code": 410,
                                "reason": "Expired",
                                "message": f"too old resource version: {since} ({self.compacted})",
                            },
                        }
                    )
                    h.wfile.write(b"0\r\n\r\n")
                    return
                sent = since
                end = time.monotonic() + timeout
                bookmarks = self.bookmark_interval if query.get("allowWatchBookmarks") == ["true"] else None
                next_bookmark = time.monotonic() + (bookmarks or 0)
                while self.drop_generation == generation and time.monotonic() < end:
                    for rv, k, etype, obj in self.events:
                        if k == kind and rv > sent and self._matches(kind, obj, query):
                            chunk({"type": etype, "object": obj})
                    sent = max([sent] + [rv for rv, k, _, _ in self.events if k == kind])
                    if bookmarks is not None and time.monotonic() >= next_bookmark:
                        chunk({"type": "BOOKMARK", "object": {"kind": "Pod" if kind == "pods" else "Namespace",
                                                              "apiVersion": "v1",
                                                              "metadata": {"resourceVersion": str(self.rv)}}})
                        self.bookmarks_sent += 1
                        next_bookmark = time.monotonic() + bookmarks
                    self.cond.wait(min(0.2, bookmarks or 0.2))
                if self.drop_generation != generation:
                    # a dropped connection: no terminating chunk, just close
                    h.close_connection = True
                    return
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return
