"""Agent side of the node-proxy protocol (proto/headrace/v1/node_proxy.proto, docs/protocol.md).

A grpcio server on a unix socket serves one `Session` stream at a time. The hub keeps the desired workload
set; a proxy that connects gets all of it as a snapshot, a SnapshotComplete marker, then incremental
add/delete messages in the order the agent issued them. Each message carries a seq that the proxy acks.

    hub = ProxyHub(socket_path, agent_id); hub.start()
    fut = hub.upsert(workload)   # resolves when the workload's latest add is acked (ProxyNack on error)
    fut = hub.remove(uid)        # resolves when the delete is acked (or a later snapshot omits it)
    hub.connected, hub.snapshot_acked, hub.status(); hub.stop()
    hub.add_peer_listener(cb)    # cb(pids, via): processes connected to the proxy sockets (their cgroup)

A `SnapshotGate` (node_agent.reconcile.gate) holds back the snapshot (and the incremental messages after
it) of a proxy that connects before the agent's adoption has rebuilt the desired set: the proxy gets its
HelloReply at once and the snapshot as soon as the gate opens, never an empty set it would act on.

Thread-safe: every public method may be called from any thread. Futures are resolved outside the lock.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from node_agent.kernel.unix_socket import private_bind_path, unlink_if_ours
from node_agent.protocol.convert import PROTOCOL_VERSION, workload_to_pb
from node_agent.protocol.fd_channel import NetnsFdServer, side_channel_path
from node_agent.protocol.proto_gen import node_proxy_pb2 as pb
from node_agent.protocol.proto_gen import node_proxy_pb2_grpc as pb_grpc
from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.ack_book import AckBook, forget_when_cancelled
from node_agent.proxy.hub_session import Inflight, Session, overdue_ack, settle
from node_agent.proxy.peer_reports import PeerListener, PeerReports
from node_agent.proxy.peers import client_pids
from node_agent.reconcile.gate import OpenGate, SnapshotGate

log = logging.getLogger("headrace.proxy_hub")


class ProxyHubError(Exception):
    """Base class of the errors a hub future can carry."""


class ProxyNack(ProxyHubError):
    """The proxy acknowledged the message with an error; str(exc) is the proxy's error text."""


class Superseded(ProxyHubError):
    """A later upsert/remove of the same uid replaced this one before the proxy acked it."""


class HubStopped(ProxyHubError):
    """The hub stopped before the proxy acked the message."""


def _jlog(level: int, event: str, **fields: Any) -> None:
    """Structured: the agent's JSON formatter turns `extra` into fields of the log line."""
    log.log(level, event.replace("_", " "), extra={"step": event, **fields})


class _Servicer:
    """The object grpc dispatches `Session` to (duck-typed NodeProxyServicer)."""

    def __init__(self, hub: ProxyHub) -> None:
        self._hub = hub

    def Session(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        return self._hub._serve_session(request_iterator, context)


class ProxyHub:
    def __init__(
        self,
        socket_path: str,
        agent_id: str,
        *,
        netns_fd_socket: str | None = None,
        max_workers: int = 6,
        hello_timeout: float = 10.0,
        ack_timeout: float = 15.0,
        snapshot_gate: SnapshotGate | None = None,
    ) -> None:
        if not socket_path:
            raise ValueError("socket_path must not be empty")
        self.socket_path = os.path.abspath(socket_path)
        self.agent_id = agent_id
        # None: next to the gRPC socket; "": no side channel
        self.netns_fd_socket = side_channel_path(self.socket_path) if netns_fd_socket is None else netns_fd_socket
        self._max_workers = max_workers
        self.hello_timeout = hello_timeout
        self.ack_timeout = ack_timeout  # a session whose oldest message stays unacked this long is ended
        self._gate: SnapshotGate = snapshot_gate or OpenGate()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._book = AckBook()  # desired set, operation numbers, futures waiting for acks
        self._session: Session | None = None
        self._session_numbers = itertools.count(1)
        self._server: grpc.Server | None = None
        self._fd_server: NetnsFdServer | None = None
        self._peers = PeerReports()
        self._socket_inode = 0
        self._stopped = False
        self.sessions = 0
        self.acks = 0
        self.nacks = 0
        self.refused = 0
        self.ack_timeouts = 0
        self.last_proxy_id = ""

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                                        thread_name_prefix="proxy-hub"))
        pb_grpc.add_NodeProxyServicer_to_server(_Servicer(self), server)
        with private_bind_path(self.socket_path, ProxyHubError) as tmp_sock:
            if server.add_insecure_port(f"unix:{tmp_sock}") == 0:
                raise OSError(f"cannot listen on unix:{tmp_sock}")
        self._socket_inode = os.lstat(self.socket_path).st_ino
        server.start()
        self._server = server
        self._peers.start()
        threading.Thread(target=self._ack_watchdog, name="proxy-hub-ack-watchdog", daemon=True).start()
        if self.netns_fd_socket:
            self._fd_server = NetnsFdServer(self.netns_fd_socket, self._lookup_desired,
                                            on_peer=lambda pid: self._peers.report(lambda: {pid}, "netns-fd"))
            self._fd_server.start()
        _jlog(logging.INFO, "proxy_hub_started", socket=self.socket_path, netns_fd_socket=self.netns_fd_socket)

    def stop(self, grace: float = 1.0) -> None:
        with self._lock:
            self._stopped = True
            self._changed.notify_all()
            if self._session is not None:
                self._close_session_locked(self._session, "hub stopping")
            failed = self._book.drain()
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1)
            self._server = None
        if self._fd_server is not None:
            self._fd_server.stop()
            self._fd_server = None
        self._peers.stop()
        unlink_if_ours(self.socket_path, self._socket_inode)
        for fut in failed:
            settle(fut, HubStopped("proxy hub stopped before the proxy acknowledged"))
        _jlog(logging.INFO, "proxy_hub_stopped", socket=self.socket_path)

    # ---- the agent's interface -------------------------------------------------------------------

    def upsert(self, w: WorkloadInfo) -> futures.Future[None]:
        if not w.uid:
            raise ValueError("workload uid must not be empty")
        fut: futures.Future[None] = futures.Future()
        with self._lock:
            self._check_running()
            op, superseded = self._book.issue(w.uid, "add", fut, w)
            forget_when_cancelled(fut, w.uid, self._book, self._lock)
            s = self._session
            if s is not None and not s.closed and s.snapshot_sent:
                self._send_locked(s, Inflight("add", w.uid, op),
                                  add=pb.WorkloadAdd(workload=workload_to_pb(w), snapshot=False))
        for f in superseded:
            settle(f.future, Superseded(f"workload {w.uid} was upserted again before the proxy acked"))
        return fut

    def remove(self, uid: str) -> futures.Future[None]:
        if not uid:
            raise ValueError("uid must not be empty")
        fut: futures.Future[None] = futures.Future()
        with self._lock:
            self._check_running()
            op, superseded = self._book.issue(uid, "delete", fut)
            forget_when_cancelled(fut, uid, self._book, self._lock)
            s = self._session
            if s is not None and not s.closed and s.snapshot_sent:
                self._send_locked(s, Inflight("delete", uid, op), delete=pb.WorkloadDelete(uid=uid))
        for f in superseded:
            settle(f.future, Superseded(f"workload {uid} was removed before the proxy acked its add"))
        return fut

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._session is not None and not self._session.closed

    @property
    def snapshot_acked(self) -> bool:
        with self._lock:
            s = self._session
            return s is not None and not s.closed and s.snapshot_acked

    def wait_snapshot_acked(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.snapshot_acked, timeout)

    def desired(self) -> dict[str, WorkloadInfo]:
        with self._lock:
            return dict(self._book.desired)

    def status(self) -> dict[str, Any]:
        with self._lock:
            s = self._session
            live = s is not None and not s.closed
            return {
                "socket": self.socket_path,
                "netns_fd_socket": self.netns_fd_socket,
                "connected": live,
                "proxy_id": s.proxy_id if (s is not None and live) else "",
                "last_proxy_id": self.last_proxy_id,
                "snapshot_acked": bool(live and s is not None and s.snapshot_acked),
                "snapshot_held": bool(live and s is not None and not s.snapshot_sent),
                "sessions": self.sessions,
                "acks": self.acks,
                "nacks": self.nacks,
                "refused": self.refused,
                "ack_timeouts": self.ack_timeouts,
                "workloads": len(self._book.desired),
                "pending": self._book.pending(),
                "inflight": len(s.inflight) if (s is not None and live) else 0,
            }

    def add_peer_listener(self, listener: PeerListener) -> None:
        """Call listener(pids, via) with the pids of the processes connected to the gRPC socket when a
        session opens (via "grpc": sock_diag, same netns only) and with each side-channel client's
        SO_PEERCRED pid (via "netns-fd"). Calls come from one hub thread, in order."""
        self._peers.add_listener(listener)

    # ---- internals -------------------------------------------------------------------------------

    def _lookup_desired(self, uid: str) -> WorkloadInfo | None:
        with self._lock:
            return self._book.desired.get(uid)

    def _check_running(self) -> None:
        if self._stopped:
            raise HubStopped("proxy hub is stopped")

    def _send_locked(self, s: Session, what: Inflight, **body: Any) -> None:
        seq = s.next_seq
        s.next_seq += 1
        s.inflight[seq] = what
        if len(s.inflight) == 1:
            self._changed.notify_all()  # the ack watchdog, idle until now, starts watching
        s.out.put(pb.AgentMessage(seq=seq, **body))

    def _close_session_locked(self, s: Session, reason: str) -> None:
        if s.closed:
            return
        s.closed = True
        s.out.put(None)
        if self._session is s:
            self._session = None
        self._changed.notify_all()
        _jlog(logging.INFO, "proxy_session_ended", session=s.number, proxy_id=s.proxy_id, reason=reason,
              unacked=len(s.inflight))

    def _serve_session(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        first = self._read_hello(request_iterator, context)
        if first is None:
            return
        if first.WhichOneof("msg") != "hello":
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "the first message of a Session must be Hello")
        hello = first.hello
        if hello.protocol_version != PROTOCOL_VERSION:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"protocol version mismatch: proxy speaks version {hello.protocol_version}, "
                         f"this agent speaks version {PROTOCOL_VERSION}")
        session: Session | None = None
        with self._lock:
            current = self._session
            if self._stopped:
                code, msg = grpc.StatusCode.UNAVAILABLE, "the agent's proxy hub is stopping"
            elif current is not None and not current.closed:
                code = grpc.StatusCode.ALREADY_EXISTS
                msg = (f"another node proxy session is active (proxy_id={current.proxy_id!r}); "
                       f"only one proxy per node is served, refusing proxy_id={hello.proxy_id!r}")
            else:
                session = self._open_session_locked(hello)
        if session is None:
            self._refuse(context, code, msg)
            return
        s = session
        # grpcio does not expose the connection (context.peer() is just "unix:"): ask the kernel who is
        # connected to our socket
        self._peers.report(lambda: client_pids(self.socket_path), "grpc")
        context.add_callback(lambda: self._end_session(s, "rpc finished"))
        reader = threading.Thread(target=self._read_acks, args=(s, request_iterator),
                                  name=f"proxy-hub-acks-{s.number}", daemon=True)
        reader.start()
        try:
            while True:
                item = s.out.get()
                if item is None:
                    return
                yield item
        finally:
            self._end_session(s, "stream closed")

    def _read_hello(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The first message, read with a deadline so a silent client cannot hold a server thread."""
        box: list[Any] = []
        got = threading.Event()

        def read() -> None:
            with contextlib.suppress(StopIteration, grpc.RpcError, ValueError):
                box.append(next(request_iterator))
            got.set()

        threading.Thread(target=read, name="proxy-hub-hello", daemon=True).start()
        if not got.wait(self.hello_timeout):
            self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"no Hello within {self.hello_timeout:g}s of opening the session")
        return box[0] if box else None

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        with self._lock:
            self.refused += 1
        _jlog(logging.WARNING, "proxy_refused", code=code.name, reason=message)
        context.abort(code, message)

    def _open_session_locked(self, hello: Any) -> Session:
        s = Session(number=next(self._session_numbers), proxy_id=hello.proxy_id,
                     wants_netns_fd=hello.wants_netns_fd)
        self._session = s
        self.sessions += 1
        self.last_proxy_id = hello.proxy_id
        s.out.put(pb.AgentMessage(seq=0, hello_reply=pb.HelloReply(
            protocol_version=PROTOCOL_VERSION, agent_id=self.agent_id, netns_fd_socket=self.netns_fd_socket)))
        _jlog(logging.INFO, "proxy_session_started", session=s.number, proxy_id=s.proxy_id,
              wants_netns_fd=s.wants_netns_fd, adoption_complete=self._gate.ready())
        if self._gate.ready():
            self._send_snapshot_locked(s)
        else:
            threading.Thread(target=self._snapshot_when_ready, args=(s,), name=f"proxy-hub-gate-{s.number}",
                             daemon=True).start()
        return s

    def _snapshot_when_ready(self, s: Session) -> None:
        """The snapshot of a session opened before adoption was complete: sent when the gate opens."""
        while not self._gate.wait_ready(0.5):
            if s.closed:
                return
        with self._lock:
            if not s.closed and not s.snapshot_sent:
                self._send_snapshot_locked(s)

    def _send_snapshot_locked(self, s: Session) -> None:
        s.snapshot_sent = True
        book = self._book
        s.snapshot_watermark = book.op_now
        for uid, w in book.desired.items():
            self._send_locked(s, Inflight("add", uid, book.latest_op[uid]),
                              add=pb.WorkloadAdd(workload=workload_to_pb(w), snapshot=True))
        self._send_locked(s, Inflight("snapshot_complete", "", book.op_now),
                          snapshot_complete=pb.SnapshotComplete(count=len(book.desired)))
        self._changed.notify_all()
        _jlog(logging.INFO, "proxy_snapshot_sent", session=s.number, proxy_id=s.proxy_id, snapshot=len(book.desired))

    def _ack_watchdog(self) -> None:
        """End a session whose proxy stopped acking: it reconnects and gets a fresh snapshot, instead of
        every later enrolment waiting on an ack that never comes."""
        with self._changed:
            while not self._stopped:
                s = self._session  # nothing unacked: sleeps until a send or a session change notifies
                busy = s is not None and not s.closed and s.inflight
                self._changed.wait(min(1.0, self.ack_timeout / 4) if busy else None)
                s = self._session
                overdue = overdue_ack(s, self.ack_timeout) if s is not None and not s.closed else ""
                if s is not None and overdue:
                    self.ack_timeouts += 1
                    self._close_session_locked(s, overdue)

    def _end_session(self, s: Session, reason: str) -> None:
        with self._lock:
            self._close_session_locked(s, reason)

    def _read_acks(self, s: Session, request_iterator: Iterator[Any]) -> None:
        reason = "proxy closed its stream"
        try:
            for msg in request_iterator:
                if s.closed:
                    break
                if msg.WhichOneof("msg") != "ack":
                    _jlog(logging.WARNING, "proxy_protocol_error", session=s.number,
                          detail=f"unexpected {msg.WhichOneof('msg')} after Hello")
                    continue
                self._on_ack(s, msg.ack.seq, msg.ack.error)
        except grpc.RpcError as exc:
            reason = f"stream error: {exc.code() if hasattr(exc, 'code') else exc}"
        except Exception as exc:
            reason = f"stream error: {exc}"
        finally:
            self._end_session(s, reason)

    def _on_ack(self, s: Session, seq: int, error: str) -> None:
        done: list[tuple[futures.Future[None], BaseException | None]] = []
        with self._lock:
            what = s.inflight.pop(seq, None)
            if what is None:
                _jlog(logging.WARNING, "proxy_unknown_ack", session=s.number, seq=seq)
                return
            self.acks += 1
            if error:
                self.nacks += 1
                _jlog(logging.WARNING, "proxy_nack", session=s.number, seq=seq, kind=what.kind,
                      uid=what.uid, error=error)
            if what.kind == "snapshot_complete":
                if s is self._session:
                    s.snapshot_acked = True
                # removals issued before the snapshot was built are fulfilled by its absence
                hit = self._book.snapshot_answered(what.op)
                self._changed.notify_all()
            else:
                hit = self._book.answered(what.uid, what.op, "add" if what.kind == "add" else "delete")
            done += [(w.future, ProxyNack(error) if error else None) for w in hit]
        for fut, exc in done:
            settle(fut, exc)

