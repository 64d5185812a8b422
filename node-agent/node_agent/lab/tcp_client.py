"""Child-process TCP client for tests (runs as another uid, so standard library only).

argv[1] is JSON {host, port, payload, timeout, mark, source, cgroup, uid, gid}; prints the reply as hex
on stdout. cgroup: join that cgroup v2 directory first (cgroup eBPF programs only see their cgroup's
processes), then drop to gid/uid if given.
"""

import ipaddress
import json
import os
import socket
import sys


def join_cgroup(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))


def main() -> int:
    req = json.loads(sys.argv[1])
    if req.get("cgroup"):
        join_cgroup(req["cgroup"])
    if req.get("gid") is not None:
        os.setgroups([])
        os.setgid(int(req["gid"]))
    if req.get("uid") is not None:
        os.setuid(int(req["uid"]))
    family = socket.AF_INET6 if ipaddress.ip_address(req["host"]).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if req.get("mark") is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(req["mark"]))
        if req.get("source"):
            s.bind((req["source"], 0))
        s.settimeout(float(req["timeout"]))
        s.connect((req["host"], int(req["port"])))
        s.sendall(req["payload"].encode())
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    sys.stdout.write(b"".join(chunks).hex() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
