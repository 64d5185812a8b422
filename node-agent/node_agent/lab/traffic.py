"""Real TCP/UDP traffic inside test namespaces: listeners that record where connections arrived, clients.

    with Listener(pod.netns.path, 15001) as l:            # 0.0.0.0 (or :: with family=6) inside the netns
        reply = tcp_request(pod.netns.path, peer_ip, 8080)  # app (root) connects to a peer
        conn = l.wait_one()                                  # arrived here; conn.original_dst = (peer_ip, 8080)

A listener replies b"<label>|<first bytes received>" so the client sees who answered. Clients can run as
another uid (uid=1337 runs a small child process with /usr/bin/python3) or with an SO_MARK (mark=0x539).
"""

from __future__ import annotations

import ipaddress
import json
import queue
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from node_agent.lab.netns import entered

SO_ORIGINAL_DST = 80
SOL_IPV6 = 41
CLIENT_SCRIPT = Path(__file__).with_name("tcp_client.py")


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The pre-NAT destination of an accepted connection (netfilter's SO_ORIGINAL_DST), None if none."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack("!H", raw[2:4])[0]
            return str(ipaddress.IPv6Address(raw[8:24])), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntoa(raw[4:8]), port
    except OSError:
        return None


@dataclass
class Accepted:
    peer: tuple[str, int]
    local: tuple[str, int]
    original_dst: tuple[str, int] | None
    data: bytes


class Listener:
    """A TCP listener inside a netns, served by a thread; records each accepted connection."""

    def __init__(
        self,
        netns_path: str,
        port: int,
        *,
        family: int = 4,
        addr: str | None = None,
        label: str | None = None,
        reply: bool = True,
    ) -> None:
        self.netns_path = netns_path
        self.port = port
        self.family = socket.AF_INET6 if family == 6 else socket.AF_INET
        self.addr = addr if addr is not None else ("::" if family == 6 else "0.0.0.0")
        self.label = label or f"listener:{port}"
        self.reply = reply
        self.accepted: queue.Queue[Accepted] = queue.Queue()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Listener:
        with entered(self.netns_path):
            s = socket.socket(self.family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((self.addr, self.port))
        s.listen(64)
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(5)
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            local = conn.getsockname()[:2]
            self.accepted.put(Accepted(tuple(peer[:2]), tuple(local), original_dst(conn), data))  # type: ignore[arg-type]
            if self.reply:
                try:
                    conn.sendall(self.label.encode() + b"|" + data)
                except OSError:
                    pass

    def wait_one(self, timeout: float = 5.0) -> Accepted:
        return self.accepted.get(timeout=timeout)

    def count(self) -> int:
        return self.accepted.qsize()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)


def tcp_request(
    netns_path: str,
    host: str,
    port: int,
    payload: bytes = b"ping",
    *,
    timeout: float = 3.0,
    uid: int | None = None,
    gid: int | None = None,
    mark: int | None = None,
    source: str | None = None,
) -> bytes:
    """Connect from inside netns_path to host:port, send payload, return the reply (until EOF).

    uid/gid: run the client as that user in a child process (the proxy's uid 1337 in sidecar tests).
    mark: set SO_MARK on the socket (the node proxy's 0x539 in ambient tests). Raises OSError on failure.
    """
    if uid is not None or gid is not None:
        argv = [
            "nsenter",
            f"--net={netns_path}",
            "--setuid",
            str(uid if uid is not None else 0),
            "--setgid",
            str(gid if gid is not None else 0),
            "--",
            "/usr/bin/python3",
            str(CLIENT_SCRIPT),
            json.dumps(
                {
                    "host": host,
                    "port": port,
                    "payload": payload.decode(),
                    "timeout": timeout,
                    "mark": mark,
                    "source": source,
                }
            ),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
        if proc.returncode != 0:
            raise ConnectionError(f"client as uid {uid} failed: {proc.stderr.strip()}")
        return bytes.fromhex(proc.stdout.strip())
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with entered(netns_path):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def udp_request(
    netns_path: str, host: str, port: int, payload: bytes = b"q", *, timeout: float = 2.0
) -> tuple[bytes, tuple[str, int]]:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with entered(netns_path):
        s = socket.socket(family, socket.SOCK_DGRAM)
    with s:
        s.settimeout(timeout)
        s.sendto(payload, (host, port))
        data, peer = s.recvfrom(65536)
        return data, (peer[0], peer[1])
