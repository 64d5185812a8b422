"""The agent's ZDS server: ztunnel's node-agent protocol on a SOCK_SEQPACKET unix socket (mode 0600).

The same interface as the gRPC hub (reconcile.state.Hub), so the reconciler enrols a pod only after the
proxy acked its add whichever protocol the proxy speaks:

    zds = ZdsHub("/var/run/ztunnel/ztunnel.sock"); zds.start()
    fut = zds.upsert(workload)   # resolves when ztunnel acked the add (ZdsNack on an error ack)
    fut = zds.remove(uid)        # resolves when the delete is acked (or a later snapshot omits it)
    zds.connected, zds.snapshot_acked, zds.status(); zds.stop()

One thread accepts; one thread per connection reads the ZdsHello, then sends the requests the state
machine (zds_book.ZdsBook) hands it, one at a time, each answered within `ack_timeout` or the connection
is closed (a late answer could not be told from the next one's; ztunnel reconnects and gets a snapshot).
Thread-safe; futures are settled outside the lock.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
import threading
import time
from concurrent import futures
from typing import Any, Protocol

from node_agent.kernel.unix_socket import ACCEPT_RETRY, private_bind_path, unlink_if_ours, wake_blocked
from node_agent.protocol import zds_wire
from node_agent.protocol.fd_channel import NetnsFdError, open_verified_netns, peer_pid
from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.ack_book import forget_when_cancelled
from node_agent.proxy.hub_session import settle
from node_agent.proxy.peer_reports import PeerListener, PeerReports
from node_agent.proxy.zds_book import Outgoing, Settle, ZdsBook, ZdsConn

log = logging.getLogger("headrace.zds")

IDLE_CHECK = 30.0  # seconds between checks that an idle ztunnel is still connected
REFUSED_HOLD = 1.0  # seconds a refused connection stays open before it is closed


class SnapshotGate(Protocol):
    """Opens once the agent's desired set is complete (after restart adoption); no snapshot before."""

    def ready(self) -> bool: ...
    def wait_ready(self, timeout: float | None) -> bool: ...


class ZdsError(Exception):
    """The ZDS server cannot run (socket path problems)."""


class ZdsStopped(Exception):
    """The ZDS server stopped before ztunnel acked."""


def _jlog(level: int, event: str, **fields: Any) -> None:
    log.log(level, event.replace("_", " "), extra={"step": event, **fields})


def encode(out: Outgoing) -> bytes:
    if out.kind == "add":
        assert out.workload is not None
        return zds_wire.add(out.workload)
    if out.kind == "keep":
        return zds_wire.keep(out.uid)
    if out.kind == "del":
        return zds_wire.delete(out.uid)
    return zds_wire.snapshot_sent()


class ZdsHub:
    def __init__(self, socket_path: str, *, ack_timeout: float = 5.0, hello_timeout: float = 5.0,
                 snapshot_gate: SnapshotGate | None = None) -> None:
        if not socket_path:
            raise ValueError("socket_path must not be empty")
        self.socket_path = os.path.abspath(socket_path)
        self.ack_timeout = ack_timeout
        self.hello_timeout = hello_timeout
        self._gate = snapshot_gate
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._book = ZdsBook()
        self._wakers: dict[int, int] = {}  # connection number -> its eventfd
        self._numbers = itertools.count(1)
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._peers = PeerReports()
        self._socket_inode = 0
        self._stopped = False
        self.connections = 0
        self.refused = 0

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with private_bind_path(self.socket_path, ZdsError) as tmp:
                sock.bind(tmp)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._socket_inode = os.lstat(self.socket_path).st_ino  # blocking accept: `stop` shuts it down
        self._listener = sock
        self._peers.start()
        self._spawn(self._accept_loop, "zds-accept")
        _jlog(logging.INFO, "zds_started", socket=self.socket_path)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            failed = self._book.stop()
            self._kick_all_locked()
            self._changed.notify_all()
        if self._listener is not None:
            wake_blocked(self._listener)
        for t in list(self._threads):
            t.join(timeout=2)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._peers.stop()
        unlink_if_ours(self.socket_path, self._socket_inode)
        for fut in failed:
            settle(fut, ZdsStopped("the ZDS server stopped before ztunnel acknowledged"))
        _jlog(logging.INFO, "zds_stopped", socket=self.socket_path)

    # ---- the agent's interface (reconcile.state.Hub) ----------------------------------------------

    def upsert(self, w: WorkloadInfo) -> futures.Future[None]:
        if not w.uid:
            raise ValueError("workload uid must not be empty")
        fut: futures.Future[None] = futures.Future()
        with self._lock:
            self._check_running()
            gone = self._book.upsert(w, fut)
            forget_when_cancelled(fut, w.uid, self._book, self._lock)
            self._kick_all_locked()
        self._settle(gone)
        return fut

    def remove(self, uid: str) -> futures.Future[None]:
        if not uid:
            raise ValueError("uid must not be empty")
        fut: futures.Future[None] = futures.Future()
        with self._lock:
            self._check_running()
            gone = self._book.remove(uid, fut)
            forget_when_cancelled(fut, uid, self._book, self._lock)
            self._kick_all_locked()
        self._settle(gone)
        return fut

    @property
    def connected(self) -> bool:
        with self._lock:
            return bool(self._book.conns)

    @property
    def snapshot_acked(self) -> bool:
        with self._lock:
            newest = self._book.newest()
            return newest is not None and newest.snapshot_acked

    def wait_snapshot_acked(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.snapshot_acked, timeout)

    def desired(self) -> dict[str, WorkloadInfo]:
        with self._lock:
            return dict(self._book.desired)

    def status(self) -> dict[str, Any]:
        with self._lock:
            b = self._book
            return {
                "socket": self.socket_path,
                "connected": bool(b.conns),
                "connections": len(b.conns),
                "peer_pids": [c.pid for c in b.conns],
                "snapshot_acked": self.snapshot_acked,
                "sessions": self.connections,
                "acks": b.acks,
                "nacks": b.nacks,
                "refused": self.refused,
                "workloads": len(b.desired),
                "pending": b.pending(),
            }

    def add_peer_listener(self, listener: PeerListener) -> None:
        """listener(pids, "zds") with each ztunnel's SO_PEERCRED pid when it says hello."""
        self._peers.add_listener(listener)

    # ---- internals -------------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._stopped:
            raise ZdsStopped("the ZDS server is stopped")

    def _settle(self, items: list[Settle]) -> None:
        for fut, exc in items:
            settle(fut, exc)

    def _kick_all_locked(self) -> None:
        for efd in self._wakers.values():
            with contextlib.suppress(OSError):
                os.eventfd_write(efd, 1)

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopped:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._stopped:
                    return
                _jlog(logging.WARNING, "zds_accept_failed", error=str(exc))
                time.sleep(ACCEPT_RETRY)
                continue
            self._spawn(self._serve, "zds-conn", conn)

    def _serve(self, sock: socket.socket) -> None:
        number = next(self._numbers)
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        conn: ZdsConn | None = None
        reason = "ztunnel closed the connection"
        try:
            with self._lock:
                self._wakers[number] = efd
            conn = self._greet(sock, number)
            if conn is None:
                self._hold_refused(efd)
                return
            if not self._wait_gate(number):
                return
            with self._lock:
                self._book.greeted(conn)
                self.connections += 1
                self._changed.notify_all()
            _jlog(logging.INFO, "zds_connected", connection=number, pid=conn.pid, snapshot=len(conn.queue) - 1)
            self._peers.report(lambda: {conn.pid} if conn and conn.pid else set(), "zds")
            reason = self._run(sock, conn, efd)
        except (OSError, zds_wire.ZdsWireError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._wakers.pop(number, None)
                if conn is not None:
                    self._book.closed(conn)
                    self._kick_all_locked()  # an older connection may have been handed adds
                self._changed.notify_all()
            sock.close()
            os.close(efd)
            if conn is not None:
                _jlog(logging.INFO, "zds_disconnected", connection=number, reason=reason)

    def _wait_gate(self, number: int) -> bool:
        """Hold the snapshot until the desired set is complete (a snapshot of an empty set would make
        ztunnel drop every workload); False when the server stops meanwhile."""
        if self._gate is None or self._gate.ready():
            return True
        _jlog(logging.INFO, "zds_snapshot_held", connection=number)
        while not self._stopped:
            if self._gate.wait_ready(0.5):
                return True
        return False

    def _hold_refused(self, efd: int) -> None:
        """Keep a refused connection open a while before closing it: ztunnel dials again as soon as its
        connection ends, and would otherwise loop as fast as both sides can go."""
        deadline = time.monotonic() + REFUSED_HOLD
        while not self._stopped and (left := deadline - time.monotonic()) > 0:
            select.select([efd], [], [], left)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(efd)

    def _greet(self, sock: socket.socket, number: int) -> ZdsConn | None:
        pid = 0
        with contextlib.suppress(OSError):
            pid = peer_pid(sock)
        sock.settimeout(self.hello_timeout)
        try:
            data, fds = zds_wire.recv_packet(sock)
            for fd in fds:
                os.close(fd)
            if not data:
                raise zds_wire.ZdsWireError("closed before ZdsHello")
            if fds:
                raise zds_wire.ZdsWireError("file descriptors with ZdsHello")
            version = zds_wire.parse_hello(data)
            if version < zds_wire.ZDS_VERSION:
                raise zds_wire.ZdsWireError(f"ZdsHello without a version ({version})")
        except (OSError, zds_wire.ZdsWireError) as exc:
            with self._lock:
                self.refused += 1
            _jlog(logging.WARNING, "zds_refused", connection=number, pid=pid, reason=str(exc) or "timeout")
            return None
        if version != zds_wire.ZDS_VERSION:  # as istio-cni: a newer ztunnel is spoken to in this version
            _jlog(logging.WARNING, "zds_newer_version", connection=number, pid=pid, version=version,
                  spoken=zds_wire.ZDS_VERSION)
        return ZdsConn(number=number, pid=pid)

    def _run(self, sock: socket.socket, conn: ZdsConn, efd: int) -> str:
        while True:
            with self._lock:
                if self._stopped:
                    return "server stopping"
                out = self._book.next_request(conn)
            if out is None:
                ready, _, _ = select.select([sock.fileno(), efd], [], [], IDLE_CHECK)
                if efd in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(efd)
                if sock.fileno() in ready:
                    data, fds = zds_wire.recv_packet(sock)
                    for fd in fds:
                        os.close(fd)
                    return "ztunnel closed the connection" if not data else "unexpected message from ztunnel"
                continue
            error = self._exchange(sock, conn, out)
            if error is None:
                return "ztunnel closed the connection"

    def _exchange(self, sock: socket.socket, conn: ZdsConn, out: Outgoing) -> str | None:
        """Send conn's in-flight request and read its answer; None when the connection ended."""
        fd: int | None = None
        if out.kind == "add":
            assert out.workload is not None
            try:
                fd = open_verified_netns(out.workload.netns_path, out.workload.netns_inode)
            except (NetnsFdError, OSError) as exc:
                with self._lock:
                    if not out.snapshot:
                        failed = self._book.send_failed(conn, f"netns of workload {out.uid}: {exc}")
                    else:
                        out = self._book.as_keep(conn)
                        failed = []
                if not out.snapshot or out.kind != "keep":
                    self._settle(failed)
                    return ""
                _jlog(logging.INFO, "zds_keep", uid=out.uid, reason=str(exc))
        try:
            data = encode(out)
            sock.settimeout(self.ack_timeout)
            zds_wire.send_packet(sock, data, fd)
        except zds_wire.ZdsWireError as exc:
            with self._lock:
                done = self._book.send_failed(conn, str(exc))
            self._settle(done)
            return ""
        finally:
            if fd is not None:
                os.close(fd)
        try:
            reply, fds = zds_wire.recv_packet(sock)
        except TimeoutError as exc:
            raise zds_wire.ZdsWireError(f"no ack for {out.kind} {out.uid} within {self.ack_timeout:g}s") from exc
        for extra in fds:
            os.close(extra)
        if not reply:
            return None
        error = zds_wire.parse_ack(reply)
        with self._lock:
            done = self._book.acked(conn, error)
            self._changed.notify_all()
        if error:
            _jlog(logging.WARNING, "zds_nack", connection=conn.number, kind=out.kind, uid=out.uid, error=error)
        else:
            _jlog(logging.DEBUG, "zds_ack", connection=conn.number, kind=out.kind, uid=out.uid)
        self._settle(done)
        return error
