"""Child-process helpers for the Envoy sidecar tests (standard library only: run with /usr/bin/python3, as root
or as another uid, inside a pod's netns and cgroup).

    envoy_app.py serve '{"cgroup": DIR, "label": "web", "ports": [{"port": 8080, "family": 4, "http": true}]}'
        listen on each port (family 4: 0.0.0.0, 6: ::, v6-only); print {"ready": true}, then one JSON line per
        connection: {"port", "kind": "http"|"tcp", "peer", "local", "path"|"data"(hex)}. HTTP: answer one
        request with 200 and a JSON body {"label", "peer", "local", "path"}, then close. TCP: read the
        first chunk, answer `label|chunk`, close.
    envoy_app.py get '{"cgroup": DIR, "uid": 1000, "gid": 1000, "host": H, "port": P, "path": "/x"}'
        one HTTP/1.1 GET; print {"status", "body", "headers"}.
    envoy_app.py exec '{"cgroup": DIR}' -- ARGV...
        join the cgroup, then exec ARGV (Envoy must be in the pod's cgroup before it opens its sockets: cgroup
        eBPF programs act on the sockets of their cgroup's processes).
"""

import http.client
import json
import os
import socket
import sys
import threading
from typing import Any

_out = threading.Lock()


def join_cgroup(path: str | None) -> None:
    if path:
        with open(os.path.join(path, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))


def drop_to(uid: int | None, gid: int | None) -> None:
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def emit(obj: dict[str, Any]) -> None:
    with _out:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def read_request(conn: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < 65536:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def serve_conn(conn: socket.socket, peer: tuple[Any, ...], port: int, label: str, is_http: bool) -> None:
    with conn:
        conn.settimeout(5)
        local = conn.getsockname()
        base = {"port": port, "peer": [peer[0], peer[1]], "local": [local[0], local[1]]}
        try:
            if not is_http:
                data = conn.recv(65536)
                emit({**base, "kind": "tcp", "data": data.hex()})
                conn.sendall(label.encode() + b"|" + data)
                return
            head = read_request(conn).split(b"\r\n")
            parts = head[0].decode(errors="replace").split(" ")
            path = parts[1] if len(parts) > 1 else ""
            headers: dict[str, str] = {}
            for line in head[1:]:
                name, sep, value = line.decode(errors="replace").partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            emit({**base, "kind": "http", "path": path, "headers": headers})
            body = json.dumps({"label": label, "peer": base["peer"], "local": base["local"], "path": path}).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
        except OSError:
            pass


def serve(spec: dict[str, Any]) -> int:
    join_cgroup(spec.get("cgroup"))
    socks = []
    for p in spec["ports"]:
        v6 = int(p.get("family", 4)) == 6
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if v6 else "0.0.0.0", int(p["port"])))
        s.listen(64)
        socks.append((s, int(p["port"]), bool(p.get("http"))))
    emit({"ready": True})

    def loop(s: socket.socket, port: int, is_http: bool) -> None:
        while True:
            conn, peer = s.accept()
            args = (conn, peer, port, spec["label"], is_http)
            threading.Thread(target=serve_conn, args=args, daemon=True).start()

    threads = [threading.Thread(target=loop, args=item, daemon=True) for item in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


def get(spec: dict[str, Any]) -> int:
    join_cgroup(spec.get("cgroup"))
    drop_to(spec.get("uid"), spec.get("gid"))
    conn = http.client.HTTPConnection(spec["host"], int(spec["port"]), timeout=float(spec.get("timeout", 5)))
    try:
        conn.request("GET", spec.get("path", "/"), headers=spec.get("headers") or {})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        out = {"status": resp.status, "body": body, "headers": {k.lower(): v for k, v in resp.getheaders()}}
    finally:
        conn.close()
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def main(argv: list[str]) -> int:
    mode, spec = argv[1], json.loads(argv[2])
    if mode == "serve":
        return serve(spec)
    if mode == "get":
        return get(spec)
    if mode == "exec":
        rest = argv[3:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        join_cgroup(spec.get("cgroup"))
        os.execvp(rest[0], rest)
    sys.stderr.write(f"unknown mode {mode!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
