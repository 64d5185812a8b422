"""The plugin-event server: `headrace-cni` (and `headrace status`) talk to the agent over a unix socket.

Protocol (cni/contract/events.py): one JSON object per line, one request per connection, one JSON line
back. Requests: ADD / DEL / CHECK from the plugin, plus STATUS for the status command (validated by
`serve/cni_request.py`). ADD of an ambient pod answers only after the pod's netns is pinned, the proxy
has acked the workload and the rules are in (`{"ok": true, "state": "enrolled"}`); every wait is bounded.
The socket is created with mode 0600 (bound in a private directory, then renamed into place).
Version 2 requests (the one-request ADD, `cni/contract/agent_add.py`, docs/plugin-agent.md) are validated
by `serve/add_request.py`, their netns checked like an ADD's, and handed to `warm_add` (which may send an
interim line before its answer); version 3 requests (the launcher's relayed ADD, DEL, GC and STATUS,
`cni/contract/relay.py`) run the plugin's code here with `warm_add` in-process and the agent's part of a
DEL, `relayed_del` (`serve/relayed_commands.py`). Without a `warm_add` both are refused as unknown, as an
agent that speaks only version 1 does.

Limits (`serve/cni_admission.py`): the whole request line within `READ_TIMEOUT` of accept (one deadline,
not one per read), the reply written within `SEND_TIMEOUT`, connections bounded per peer process, and
slow readers evicted (oldest first) when a new connection needs their slot, so no number of slow
clients keeps a plugin's ADD out. An ADD's netns is checked before anything acts on it: a network
namespace, not the agent's own, not the host's (`cni.kernel.netns.open_pod_netns`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from cni.contract import events
from cni.contract.kube_objects import Pod
from cni.kernel.netns import NetnsFileError, pod_netns_inode
from node_agent.kernel.unix_socket import ACCEPT_RETRY, listen_private, unlink_if_ours, wake_blocked
from node_agent.reconcile.state import Outcome
from node_agent.serve.add_request import Later, WarmAddFn, at_once, is_v2, parse_add_request
from node_agent.serve.cni_admission import Admission, Refusal, Ticket, peer_key
from node_agent.serve.cni_request import PluginRequest, RequestError, parse_request, reply_json
from node_agent.serve.relayed_commands import is_relay, relayed_command

if TYPE_CHECKING:
    from node_agent.serve.relayed_commands import AgentDelete

log = logging.getLogger("headrace.agent.cni")

READ_TIMEOUT = 5.0  # the whole request line must arrive within this, counted from accept
SEND_TIMEOUT = 5.0  # the reply must be taken within this
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid

__all__ = ["CniServer", "Handler", "PluginRequest", "RequestError", "check_add_netns", "parse_request"]


def check_add_netns(path: str) -> None:
    """An ADD's netns must be a pod's network namespace (RequestError otherwise): checked before the
    agent pins, mounts or enters anything."""
    try:
        pod_netns_inode(path, "agent")
    except NetnsFileError as exc:
        detail = f" ({exc.details})" if exc.details else ""
        raise RequestError(f"netns refused: {exc.msg}{detail}") from exc


def _peer(conn: socket.socket) -> tuple[str, int]:
    try:
        pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return peer_key(0, -1)
    return peer_key(pid, uid)


class Handler(Protocol):
    def cni_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                timeout: float) -> Outcome: ...
    def cni_sidecar_add(self, uid: str, namespace: str, name: str, netns: str, ips: tuple[str, ...],
                        timeout: float, pod: Pod | None = None) -> Outcome: ...
    def cni_del(self, uid: str, plugin_removes: tuple[str, str] | None = None) -> Outcome: ...
    def cni_check(self, uid: str) -> Outcome: ...
    def status(self) -> list[dict[str, Any]]: ...


class CniServer:
    def __init__(
        self,
        socket_path: str,
        handler: Handler,
        *,
        add_timeout: float = 20.0,
        resolve_uid: Callable[[str, str], str | None] | None = None,
        extra_status: Callable[[], dict[str, Any]] | None = None,
        check_netns: Callable[[str], None] = check_add_netns,
        admission: Admission | None = None,
        warm_add: WarmAddFn | None = None,
        relayed_del: AgentDelete | None = None,
    ) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.handler = handler
        self.add_timeout = add_timeout
        self._resolve_uid = resolve_uid
        self._extra_status = extra_status
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._check_netns = check_netns
        self.admission = admission or Admission()
        self._inode = 0
        self.requests = 0
        self._warm_add = warm_add  # version 2 (the one-request ADD); None: answered as version 1 does
        self._relayed_del = relayed_del  # the agent's part of a relayed DEL; None: left to the plugin

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        sock = listen_private(self.socket_path, 128)  # blocking accept: `stop` shuts it down to wake it
        self._inode = os.lstat(self.socket_path).st_ino
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="cni-server", daemon=True)
        self._thread.start()
        log.info("plugin-event socket listening", extra={"step": "cni-listen", "socket": self.socket_path})

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            wake_blocked(self._sock)
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        unlink_if_ours(self.socket_path, self._inode)

    @property
    def listening(self) -> bool:
        return self._sock is not None and not self._stop.is_set()

    # ---- serving -----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(ACCEPT_RETRY)  # e.g. out of fds: try again, without spinning
                continue
            now = time.monotonic()
            got, evicted = self.admission.admit(_peer(conn), now, conn)
            for victim in evicted:
                self._close(victim, events.failure_reply("evicted: the request was not sent in time", retry=True))
            if isinstance(got, Refusal):
                self._send_now(conn, events.failure_reply(got.reason, retry=True))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(got,), name="cni-conn", daemon=True).start()

    @staticmethod
    def _send_now(conn: socket.socket, obj: dict[str, Any]) -> None:
        """A short answer that never blocks the caller (a fresh socket's buffer takes it)."""
        with contextlib.suppress(OSError):
            conn.send(events.encode_line(obj), socket.MSG_DONTWAIT)

    def _close(self, ticket: Ticket, reply: dict[str, Any]) -> None:
        """Answer an evicted connection and shut it down: its reading thread wakes and closes it."""
        conn = ticket.payload
        assert isinstance(conn, socket.socket)
        self._send_now(conn, reply)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        log.info("plugin-socket client evicted: request not complete", extra={"step": "cni-evict",
                 "peer": f"{ticket.peer[0]} {ticket.peer[1]}"})

    @staticmethod
    def _send(conn: socket.socket, obj: dict[str, Any] | bytes) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(SEND_TIMEOUT)
            conn.sendall(obj if isinstance(obj, bytes) else events.encode_line(obj))

    def _serve(self, ticket: Ticket) -> None:
        conn = ticket.payload
        assert isinstance(conn, socket.socket)
        after: list[Callable[[], None]] = []
        try:
            try:
                line = events.read_line(conn, ticket.accepted + READ_TIMEOUT)
            except events.LineTooLong:
                self._send(conn, events.failure_reply("request too long", retry=False))
                return
            except TimeoutError:
                self.admission.timed_out()
                self._send(conn, events.failure_reply("request not received in time", retry=True))
                return
            except OSError:
                return  # the client went away (or was evicted)
            refused = self.admission.start_handling(ticket)
            if refused is not None:
                if not ticket.evicted:
                    self._send(conn, events.failure_reply(refused.reason, retry=True))
                return
            self.requests += 1
            reply: dict[str, Any] | bytes
            try:
                reply = self.handle(line, lambda obj: self._send(conn, obj), after.append)
            except RequestError as exc:
                reply = events.failure_reply(str(exc), retry=False)
            except Exception as exc:
                log.exception("plugin event failed", extra={"step": "cni-event"})
                reply = events.failure_reply(f"agent error: {exc}", retry=True)
            self._send(conn, reply)
        finally:
            self.admission.close(ticket)
            conn.close()
            for fn in after:  # what the handler left for after the reply (the plugin is not waiting)
                try:
                    fn()
                except Exception:
                    log.exception("work after a plugin reply failed", extra={"step": "cni-event"})

    def handle(self, line: bytes, interim: Callable[[Any], None] | None = None,
               later: Later = at_once) -> dict[str, Any] | bytes:
        """The reply to one request line (version 3: the frame bytes). `interim` sends an early answer;
        `later(fn)` runs fn after the reply is sent (by default at once)."""
        if self._warm_add is not None:
            try:
                obj = events.decode_line(line)
            except ValueError:
                obj = None  # parse_request says what is wrong
            if is_v2(obj):
                warm = parse_add_request(obj)
                self._check_netns(warm.netns)
                return self._warm_add(warm, interim or (lambda _obj: None), later)
            if is_relay(obj):
                return relayed_command(obj, self.socket_path, self._warm_add, self._check_netns,
                                       interim or (lambda _frame: None), later, self._relayed_del)
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
            self._check_netns(req.netns)
            add = self.handler.cni_add if req.mode == events.AMBIENT else self.handler.cni_sidecar_add
            outcome = add(uid, req.namespace, req.name, req.netns, req.ips, self.add_timeout)
        elif req.cmd == events.DEL:
            outcome = self.handler.cni_del(uid, req.removes)
        else:
            outcome = self.handler.cni_check(uid)
        log.info("plugin event answered: %s", outcome.state if outcome.ok else outcome.error,
                 extra={**ctx, "ok": outcome.ok})
        return reply_json(outcome)
