"""SCM_RIGHTS side channel: hand a workload's network namespace to the node proxy as a file descriptor.

The gRPC stream carries the pinned netns path and its inode; a proxy that prefers descriptors (as Istio's
ztunnel does) asks this second unix socket, next to the gRPC socket, for the netns of one workload by uid.

Wire format (one request per line, any number of requests per connection):
  request:  {"v": 1, "uid": "<pod uid>"}\\n
  reply:    {"ok": true, "uid": "...", "inode": N}\\n   with exactly one fd attached (SCM_RIGHTS)
            {"ok": false, "uid": "...", "error": "..."}\\n   with no fd
The server opens the pinned path itself and checks the inode before sending, so a proxy never receives a
namespace that is not the workload's. The socket is mode 0600 (root only on a real node).

Each accepted connection's SO_PEERCRED pid is handed to `on_peer` (the agent learns the node proxy's cgroup
from it: proxy_cgroup_follow.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from node_agent.kernel.unix_socket import listen_private, wake_blocked
from node_agent.protocol.workload import WorkloadInfo

log = logging.getLogger("headrace.netns_fd_channel")

PROTOCOL_VERSION = 1
MAX_REQUEST = 4096

# uid -> the workload the agent currently wants the proxy to serve (None when unknown)
WorkloadLookup = Callable[[str], WorkloadInfo | None]
# the pid of a connected client (SO_PEERCRED, in the agent's pid namespace)
PeerCallback = Callable[[int], None]

_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


class NetnsFdError(Exception):
    """The side channel refused a request or answered something unexpected."""


def side_channel_path(grpc_socket_path: str) -> str:
    """The side channel lives next to the gRPC socket: proxy.sock -> proxy-netns.sock."""
    directory, base = os.path.split(grpc_socket_path)
    stem = base[: -len(".sock")] if base.endswith(".sock") else base
    return os.path.join(directory, f"{stem}-netns.sock")


def open_verified_netns(path: str, inode: int) -> int:
    """Open a netns file read-only and check that it is the expected namespace; returns the fd."""
    if not path:
        raise NetnsFdError("workload has no netns path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsFdError(f"cannot open netns {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if inode and st.st_ino != inode:
        os.close(fd)
        raise NetnsFdError(f"netns {path} has inode {st.st_ino}, expected {inode}")
    return fd


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end of a connected unix socket (SO_PEERCRED); 0 if unknown
    (a peer in another pid namespace that the kernel cannot map)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, _uid, _gid = _UCRED.unpack(raw)
    return int(pid)


def bind_private_unix_socket(path: str) -> socket.socket:
    """Bind a listening unix stream socket at `path` with mode 0600, replacing a stale socket file."""
    return listen_private(path, 16, NetnsFdError)


@dataclass
class _Stats:
    served: int = 0
    refused: int = 0


class NetnsFdServer:
    """Serves netns fds of the workloads `lookup` knows about; one thread, one connection at a time."""

    def __init__(self, path: str, lookup: WorkloadLookup, on_peer: PeerCallback | None = None) -> None:
        self.path = path
        self._lookup = lookup
        self._on_peer = on_peer
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.stats = _Stats()

    def start(self) -> None:
        self._sock = bind_private_unix_socket(self.path)  # blocking accept: `stop` shuts it down to wake it
        self._thread = threading.Thread(target=self._serve, name="netns-fd-channel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            wake_blocked(self._sock)
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            with conn:
                conn.settimeout(2.0)
                self._report_peer(conn)
                try:
                    self._serve_connection(conn)
                except OSError as exc:
                    log.warning("netns fd side channel connection failed",
                                extra={"step": "netns-fd", "error": str(exc)})

    def _report_peer(self, conn: socket.socket) -> None:
        if self._on_peer is None:
            return
        try:
            pid = peer_pid(conn)
            if pid > 0:
                self._on_peer(pid)
        except Exception as exc:  # never let the cgroup follower break fd serving
            log.warning("netns fd side channel: peer report failed",
                        extra={"step": "netns-fd", "error": str(exc)})

    def _serve_connection(self, conn: socket.socket) -> None:
        buf = b""
        while not self._stop.is_set():
            while b"\n" not in buf:
                if len(buf) > MAX_REQUEST:
                    return
                chunk = conn.recv(MAX_REQUEST)
                if not chunk:
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            self._answer(conn, line)

    def _answer(self, conn: socket.socket, line: bytes) -> None:
        uid = ""
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or req.get("v") != PROTOCOL_VERSION:
                raise NetnsFdError(f"bad request: expected {{'v': {PROTOCOL_VERSION}, 'uid': ...}}")
            raw = req.get("uid")
            if not isinstance(raw, str) or not raw:
                raise NetnsFdError("bad request: uid must be a non-empty string")
            uid = raw
            w = self._lookup(uid)
            if w is None:
                raise NetnsFdError(f"unknown workload {uid}")
            fd = open_verified_netns(w.netns_path, w.netns_inode)
        except (ValueError, RecursionError, NetnsFdError) as exc:  # RecursionError: JSON nested too deep
            self.stats.refused += 1
            reply = {"ok": False, "uid": uid, "error": str(exc)}
            conn.sendall(json.dumps(reply).encode() + b"\n")
            return
        try:
            inode = os.fstat(fd).st_ino
            body = json.dumps({"ok": True, "uid": uid, "inode": inode}).encode() + b"\n"
            socket.send_fds(conn, [body], [fd])
            self.stats.served += 1
        finally:
            os.close(fd)


def fetch_netns_fd(path: str, uid: str, timeout: float = 5.0) -> tuple[int, int]:
    """Client side: ask the side channel at `path` for the netns of `uid`; returns (fd, inode).

    The caller owns the returned fd.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"v": PROTOCOL_VERSION, "uid": uid}).encode() + b"\n")
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 1)
        while data and not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            more = sock.recv(MAX_REQUEST)
            if not more:
                break
            data += more
    try:
        reply = json.loads(data)
    except ValueError as exc:
        for fd in fds:
            os.close(fd)
        raise NetnsFdError(f"bad reply from {path}: {data[:200]!r}") from exc
    if not reply.get("ok"):
        for fd in fds:
            os.close(fd)
        raise NetnsFdError(str(reply.get("error", "refused")))
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise NetnsFdError(f"reply for {uid} carried {len(fds)} fds, expected 1")
    return fds[0], int(reply["inode"])
