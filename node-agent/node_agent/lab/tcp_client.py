"""Child-process TCP (or UDP) client for tests (runs as another uid, so standard library only).

argv[1] is JSON {host, port, payload, timeout, mark, source, cgroup, uid, gid, udp}; prints the reply as
hex on stdout (TCP), or, with udp true, one JSON line {"data": hex, "peer": [address, port]} for the one
datagram sent and the one received. cgroup: join that cgroup v2 directory first (cgroup eBPF programs only
see their cgroup's processes), then drop to gid/uid if given.
"""

import ipaddress
import json
import os
import socket
import sys


def join_cgroup(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def exchange(
    s: socket.socket, host: str, port: int, payload: bytes, timeout: float, mark: int | None, source: str | None
) -> bytes:
    """Connect s to host:port, send payload, half-close, return everything received until EOF."""
    with s:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source:
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


def datagram(s: socket.socket, host: str, port: int, payload: bytes, timeout: float) -> tuple[bytes, tuple[str, int]]:
    """Send payload to host:port, return the one reply and the address it came from."""
    with s:
        s.settimeout(timeout)
        s.sendto(payload, (host, port))
        data, peer = s.recvfrom(65536)
    return data, (peer[0], peer[1])


def main() -> int:
    req = json.loads(sys.argv[1])
    if req.get("cgroup"):
        join_cgroup(req["cgroup"])
    if req.get("gid") is not None:
        os.setgroups([])
        os.setgid(int(req["gid"]))
    if req.get("uid") is not None:
        os.setuid(int(req["uid"]))
    if req.get("udp"):
        sock = socket.socket(family_of(req["host"]), socket.SOCK_DGRAM)
        data, peer = datagram(sock, req["host"], int(req["port"]), bytes.fromhex(req["payload"]), float(req["timeout"]))
        sys.stdout.write(json.dumps({"data": data.hex(), "peer": list(peer)}) + "\n")
        return 0
    mark = None if req.get("mark") is None else int(req["mark"])
    sock = socket.socket(family_of(req["host"]), socket.SOCK_STREAM)
    reply = exchange(
        sock, req["host"], int(req["port"]), req["payload"].encode(), float(req["timeout"]), mark, req.get("source")
    )
    sys.stdout.write(reply.hex() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
