"""The plugin-event server: `headrace-cni` (and `headrace status`) talk to the agent over a unix socket.

Protocol (cni/contract/events.py): one JSON object per line, one request per connection, one JSON line
back. Requests: ADD / DEL / CHECK from the plugin, plus STATUS for the status command. ADD of an ambient
pod answers only after the pod's netns is pinned, the proxy has acked the workload and the rules are in
(`{"ok": true, "state": "enrolled"}`); every wait is bounded. The socket is created with mode 0600
(bound in a private directory, then renamed into place).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cni.contract import events
from node_agent.kernel.unix_socket import listen_private
from node_agent.reconcile.state import Outcome

log = logging.getLogger("headrace.agent.cni")

READ_TIMEOUT = 5.0  # the whole request line must arrive within this
MAX_CONNECTIONS = 64
_UID_RE = re.compile(r"^[0-9a-zA-Z][0-9a-zA-Z._-]{0,127}$")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class RequestError(ValueError):
    """The request is malformed; the reply says why (not retryable)."""


class Handler(Protocol):
    def cni_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                timeout: float) -> Outcome: ...
    def cni_sidecar_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                        timeout: float) -> Outcome: ...
    def cni_del(self, uid: str) -> Outcome: ...
    def cni_check(self, uid: str) -> Outcome: ...
    def status(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class PluginRequest:
    cmd: str
    uid: str
    namespace: str
    name: str
    netns: str
    ips: tuple[str, ...]
    mode: str
    container_id: str


def parse_request(line: bytes) -> PluginRequest:
    try:
        obj = events.decode_line(line)
    except ValueError as exc:
        raise RequestError(f"request is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object")
    if obj.get(events.VERSION) != events.PROTOCOL_VERSION:
        raise RequestError(
            f"unsupported protocol version {obj.get(events.VERSION)!r} (agent speaks {events.PROTOCOL_VERSION})"
        )
    cmd = obj.get(events.CMD)
    if cmd not in events.COMMANDS:
        raise RequestError(f"unknown cmd {cmd!r}")
    if cmd == events.STATUS:
        return PluginRequest(events.STATUS, "", "", "", "", (), "", "")
    pod = obj.get(events.POD)
    if not isinstance(pod, dict):
        raise RequestError("request has no 'pod' object")
    uid = pod.get(events.POD_UID, "")
    namespace = pod.get(events.POD_NAMESPACE, "")
    name = pod.get(events.POD_NAME, "")
    if not all(isinstance(x, str) for x in (uid, namespace, name)):
        raise RequestError("pod uid/namespace/name must be strings")
    if uid and not _UID_RE.match(uid):
        raise RequestError(f"invalid pod uid {uid!r}")
    if namespace and not _NAME_RE.match(namespace):
        raise RequestError(f"invalid namespace {namespace!r}")
    if name and not _NAME_RE.match(name):
        raise RequestError(f"invalid pod name {name!r}")
    netns = obj.get(events.NETNS, "")
    if not isinstance(netns, str) or (netns and not netns.startswith("/")) or "\0" in netns:
        raise RequestError("netns must be an absolute path")
    ips_raw = obj.get(events.IPS) or []
    if not isinstance(ips_raw, list) or not all(isinstance(i, str) for i in ips_raw):
        raise RequestError("ips must be a list of strings")
    import ipaddress

    ips: list[str] = []
    for ip in ips_raw:
        try:
            ips.append(str(ipaddress.ip_interface(ip).ip))
        except ValueError as exc:
            raise RequestError(f"invalid ip {ip!r}") from exc
    mode = obj.get(events.MODE, events.AMBIENT)
    if mode not in events.MODES:
        raise RequestError(f"unknown mode {mode!r}")
    if cmd == events.ADD and not netns:
        raise RequestError("ADD needs the pod's netns")
    container_id = obj.get(events.CONTAINER_ID, "")
    return PluginRequest(cmd, uid, namespace, name, netns, tuple(ips), mode,
                         container_id if isinstance(container_id, str) else "")


def reply_json(outcome: Outcome) -> dict[str, Any]:
    if outcome.ok:
        return events.success_reply(outcome.state)
    return events.failure_reply(outcome.error, outcome.retry, outcome.state)


class CniServer:
    def __init__(
        self,
        socket_path: str,
        handler: Handler,
        *,
        add_timeout: float = 20.0,
        resolve_uid: Callable[[str, str], str | None] | None = None,
        extra_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.handler = handler
        self.add_timeout = add_timeout
        self._resolve_uid = resolve_uid
        self._extra_status = extra_status
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._inode = 0
        self.requests = 0

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        sock = listen_private(self.socket_path, 128)
        sock.settimeout(0.1)
        self._inode = os.lstat(self.socket_path).st_ino
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="cni-server", daemon=True)
        self._thread.start()
        log.info("plugin-event socket listening", extra={"step": "cni-listen", "socket": self.socket_path})

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        try:
            if self._inode and os.lstat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    @property
    def listening(self) -> bool:
        return self._sock is not None and not self._stop.is_set()

    # ---- serving -----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                self._send(conn, events.failure_reply("agent busy", retry=True))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="cni-conn", daemon=True).start()

    @staticmethod
    def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(events.encode_line(obj))

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                line = events.read_line(conn, time.monotonic() + READ_TIMEOUT)
            except events.LineTooLong:
                self._send(conn, events.failure_reply("request too long", retry=False))
                return
            except TimeoutError:
                self._send(conn, events.failure_reply("request not received in time", retry=True))
                return
            except OSError:
                return  # the client went away
            self.requests += 1
            try:
                reply = self.handle(line)
            except RequestError as exc:
                reply = events.failure_reply(str(exc), retry=False)
            except Exception as exc:
                log.exception("plugin event failed", extra={"step": "cni-event"})
                reply = events.failure_reply(f"agent error: {exc}", retry=True)
            self._send(conn, reply)
        finally:
            conn.close()
            self._slots.release()

    def handle(self, line: bytes) -> dict[str, Any]:
        req = parse_request(line)
        if req.cmd == events.STATUS:
            out: dict[str, Any] = {events.OK: True, events.PODS: self.handler.status()}
            if self._extra_status is not None:
                out.update(self._extra_status())
            return out
        uid = req.uid
        if not uid and self._resolve_uid is not None and req.namespace and req.name:
            uid = self._resolve_uid(req.namespace, req.name) or ""
        if not uid:
            raise RequestError("pod uid unknown (not in the request and not in the pod source)")
        ctx = {"pod": req.name, "namespace": req.namespace, "uid": uid, "netns": req.netns,
               "step": f"cni-{req.cmd.lower()}"}
        log.info("plugin event", extra=ctx)
        if req.cmd == events.ADD:
            add = self.handler.cni_add if req.mode == events.AMBIENT else self.handler.cni_sidecar_add
            outcome = add(uid, req.namespace, req.name, req.netns, req.ips, self.add_timeout)
        elif req.cmd == events.DEL:
            outcome = self.handler.cni_del(uid)
        else:
            outcome = self.handler.cni_check(uid)
        log.info("plugin event answered: %s", outcome.state if outcome.ok else outcome.error,
                 extra={**ctx, "ok": outcome.ok})
        return reply_json(outcome)
