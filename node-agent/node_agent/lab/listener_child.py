"""Child-process TCP listener for tests (standard library only): joins a cgroup v2 directory, listens, and
reports every accepted connection as one JSON line on stdout.

argv[1] is JSON {family, addr, port, label, reply, cgroup}. Prints {"ready": true} once listening, then per
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
from typing import Any

SO_ORIGINAL_DST = 80
SOL_IPV6 = 41
_out = threading.Lock()


def original_dst(sock: socket.socket) -> list[Any] | None:
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            return [str(ipaddress.IPv6Address(raw[8:24])), struct.unpack("!H", raw[2:4])[0]]
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return [socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
    except OSError:
        return None


def emit(obj: dict[str, Any]) -> None:
    with _out:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def handle(conn: socket.socket, peer: Any, label: str, reply: bool) -> None:
    with conn:
        conn.settimeout(5)
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        local = conn.getsockname()[:2]
        emit({"peer": list(peer[:2]), "local": list(local), "original_dst": original_dst(conn), "data": data.hex()})
        if reply:
            try:
                conn.sendall(label.encode() + b"|" + data)
            except OSError:
                pass


def main() -> int:
    req = json.loads(sys.argv[1])
    if req.get("cgroup"):
        with open(os.path.join(req["cgroup"], "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    family = socket.AF_INET6 if int(req["family"]) == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((req["addr"], int(req["port"])))
    s.listen(64)
    emit({"ready": True})
    while True:
        conn, peer = s.accept()
        threading.Thread(target=handle, args=(conn, peer, req["label"], bool(req["reply"])), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
