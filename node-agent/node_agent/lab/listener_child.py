"""Child-process TCP listener for tests (standard library only): joins a cgroup v2 directory, listens, and
reports every accepted connection as one JSON line on stdout.

argv[1] is JSON {family, addr, port, label, reply, cgroup, transparent}. Prints {"ready": true} once listening, then per
connection {"peer", "local", "original_dst", "data"(hex)}. Runs until killed. SO_ORIGINAL_DST is read here,
inside the cgroup, since a cgroup getsockopt program (eBPF backend) answers only its cgroup's processes.
"""

import ipaddress
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

SO_ORIGINAL_DST = 80
SOL_IPV6 = 41
_out = threading.Lock()

Address = tuple[str, int]


def original_dst(sock: socket.socket) -> Address | None:
    """The pre-NAT destination of an accepted connection (netfilter's SO_ORIGINAL_DST), None if none."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            return str(ipaddress.IPv6Address(raw[8:24])), struct.unpack("!H", raw[2:4])[0]
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    except OSError:
        return None


IP_TRANSPARENT = 19  # SOL_IP
IPV6_TRANSPARENT = 75  # SOL_IPV6


def listening_socket(family: int, addr: str, port: int, transparent: bool = False) -> socket.socket:
    """A TCP socket listening on addr:port (family 4 or 6; v6-only for 6), in the caller's netns.
    transparent: IP_TRANSPARENT / IPV6_TRANSPARENT (a TPROXY listener: it accepts connections to any
    address, and their local address is the original destination)."""
    s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            if family == 6:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        if family == 6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(64)
    except BaseException:
        s.close()
        raise
    return s


def handle(
    conn: socket.socket,
    peer: Any,
    label: str,
    reply: bool,
    report: Callable[[Address, Address, Address | None, bytes], None],
) -> None:
    """Read what the client sends (up to its half-close), report (peer, local, original_dst, data), and
    answer `label|data` when reply is set."""
    with conn:
        conn.settimeout(5)
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        local = conn.getsockname()
        report((peer[0], peer[1]), (local[0], local[1]), original_dst(conn), data)
        if reply:
            try:
                conn.sendall(label.encode() + b"|" + data)
            except OSError:
                pass


def emit(peer: Address, local: Address, odst: Address | None, data: bytes) -> None:
    obj = {"peer": list(peer), "local": list(local), "original_dst": list(odst) if odst else None, "data": data.hex()}
    with _out:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def main() -> int:
    req = json.loads(sys.argv[1])
    if req.get("cgroup"):
        with open(os.path.join(req["cgroup"], "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    s = listening_socket(int(req["family"]), req["addr"], int(req["port"]), bool(req.get("transparent")))
    with _out:
        sys.stdout.write(json.dumps({"ready": True}) + "\n")
        sys.stdout.flush()
    while True:
        conn, peer = s.accept()
        args = (conn, peer, req["label"], bool(req["reply"]), emit)
        threading.Thread(target=handle, args=args, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
