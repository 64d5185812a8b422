"""The three processes of bench/redirect_overhead.py: echo server, forwarding proxy, client. Stdlib only.

    python redirect_workers.py server --port 8080
    python redirect_workers.py proxy --port 15001 --upstream 10.200.1.3:8080 [--cgroup DIR] [--uid 1337]
    python redirect_workers.py client [--cgroup DIR]

Each is started by the bench inside a netns (nsenter --net=...), so it needs no netns code of its own.
All of them print "ready" on stdout once listening / set up, then:
- server: echoes whatever each connection sends, until killed.
- proxy: accepts on 0.0.0.0:PORT (IP_TRANSPARENT: it also takes what a `tproxy` rule hands it); per
  connection asks getsockopt(SO_ORIGINAL_DST), else its socket's own address (tproxy leaves the original
  destination there), and dials that destination, or the fixed --upstream when there is none or it is the
  proxy's own listener (modes where the client dialled the proxy explicitly). Then relays bytes both
  ways until either side closes. Every connection takes the same code path (the getsockopt call
  included) in every mode. On stdin it
  answers "stats" with one JSON line of counters; "quit" (or EOF) ends it. The process joins --cgroup
  and binds as root, then drops to --uid (the sidecar proxy uid, bypassed by both redirect backends).
- client: reads one JSON command per stdin line and answers one JSON line:
  {"op": "latency", "host", "port", "n", "size", "limit_s"} → {"ok", "rtt_ns": [...]}: one connection,
  up to n request/response round trips of `size` bytes, stopped early after limit_s seconds;
  {"op": "connect", "host", "port", "m", "size", "limit_s"} → {"ok", "cycle_ns": [...], "elapsed_ns"}:
  up to m cycles of connect + one request/response + close; {"op": "quit"}.
Every socket has a timeout, every loop a count and a time bound.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time
from typing import Any

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IO_TIMEOUT_S = 5.0


def join_cgroup(path: str) -> None:
    if path:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def tune(s: socket.socket) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listener(port: int, transparent: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:  # takes the connections a `tproxy` rule hands it (reference mode nft-tproxy-out)
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind(("0.0.0.0", port))
    s.listen(512)
    return s


def say(obj: Any) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


# -- server --------------------------------------------------------------------------------------------


def serve(port: int) -> None:
    lsock = listener(port)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    say("ready")
    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _peer = lsock.accept()
                tune(conn)
                conn.settimeout(IO_TIMEOUT_S)
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj  # type: ignore[assignment]
            try:
                data = conn.recv(65536)
                if data:
                    conn.sendall(data)
                    continue
            except OSError:
                pass
            sel.unregister(conn)
            conn.close()


# -- proxy ---------------------------------------------------------------------------------------------


def original_dst(conn: socket.socket, listen_port: int) -> tuple[str, int] | None:
    """SO_ORIGINAL_DST; without one (no NAT), the socket's own address, which a `tproxy` rule left as the
    original destination (the listener's own port there means the client dialled the proxy: None)."""
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        host, port = conn.getsockname()[:2]
        return None if port == listen_port else (str(host), int(port))
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


class Proxy:
    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.port = port
        self.upstream = upstream
        self.sel = selectors.DefaultSelector()
        self.lsock = listener(port, transparent=True)
        self.stats: dict[str, Any] = {"accepted": 0, "via_orig": 0, "via_fixed": 0, "failed": 0, "last_orig": ""}

    def destination(self, conn: socket.socket) -> tuple[str, int]:
        orig = original_dst(conn, self.port)
        if orig is None or (orig[1] == self.port and (orig[0].startswith("127.") or orig[0] == "0.0.0.0")):
            self.stats["via_fixed"] += 1
            return self.upstream
        self.stats["via_orig"] += 1
        self.stats["last_orig"] = f"{orig[0]}:{orig[1]}"
        return orig

    def accept(self) -> None:
        conn, _peer = self.lsock.accept()
        self.stats["accepted"] += 1
        dst = self.destination(conn)
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            up.settimeout(IO_TIMEOUT_S)
            up.connect(dst)
        except OSError:
            self.stats["failed"] += 1
            up.close()
            conn.close()
            return
        for s in (conn, up):
            tune(s)
            s.settimeout(IO_TIMEOUT_S)
        self.sel.register(conn, selectors.EVENT_READ, up)
        self.sel.register(up, selectors.EVENT_READ, conn)

    def relay(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            data = src.recv(65536)
            if data:
                dst.sendall(data)
                return
        except OSError:
            pass
        for s in (src, dst):
            self.sel.unregister(s)
            s.close()

    def control(self) -> bool:
        line = sys.stdin.readline()
        cmd = line.strip()
        if cmd == "stats":
            say(self.stats)
            return True
        return cmd != "quit" and line != ""

    def run(self) -> None:
        self.sel.register(self.lsock, selectors.EVENT_READ, "listen")
        self.sel.register(sys.stdin, selectors.EVENT_READ, "control")
        say("ready")
        while True:
            for key, _ in self.sel.select():
                if key.data == "listen":
                    self.accept()
                elif key.data == "control":
                    if not self.control():
                        return
                else:
                    self.relay(key.fileobj, key.data)  # type: ignore[arg-type]


def drop_privileges(uid: int) -> None:
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


# -- client --------------------------------------------------------------------------------------------


def recv_exact(s: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = s.recv(size - got)
        if not chunk:
            raise ConnectionError("connection closed before the whole response arrived")
        got += len(chunk)


def latency(host: str, port: int, n: int, size: int, limit_s: float) -> dict[str, Any]:
    payload = b"q" * size
    out: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(limit_s * 1e9)
    with socket.create_connection((host, port), timeout=IO_TIMEOUT_S) as s:
        tune(s)
        for _ in range(n):
            t0 = clock()
            s.sendall(payload)
            recv_exact(s, size)
            t1 = clock()
            out.append(t1 - t0)
            if t1 > end:
                break
    return {"ok": True, "rtt_ns": out}


def connect_cycles(host: str, port: int, m: int, size: int, limit_s: float) -> dict[str, Any]:
    payload = b"c" * size
    out: list[int] = []
    clock = time.perf_counter_ns
    start = clock()
    end = start + int(limit_s * 1e9)
    for _ in range(m):
        t0 = clock()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(IO_TIMEOUT_S)
            tune(s)
            s.connect((host, port))
            s.sendall(payload)
            recv_exact(s, size)
        finally:
            s.close()
        t1 = clock()
        out.append(t1 - t0)
        if t1 > end:
            break
    return {"ok": True, "cycle_ns": out, "elapsed_ns": clock() - start}


def client() -> None:
    say("ready")
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                return
            args = (str(cmd["host"]), int(cmd["port"]))
            size, limit = int(cmd["size"]), float(cmd["limit_s"])
            if op == "latency":
                say(latency(*args, int(cmd["n"]), size, limit))
            elif op == "connect":
                say(connect_cycles(*args, int(cmd["m"]), size, limit))
            else:
                say({"ok": False, "error": f"unknown op {op!r}"})
        except (OSError, ValueError, KeyError, TypeError) as e:
            say({"ok": False, "error": f"{type(e).__name__}: {e}"})


# -- entry ---------------------------------------------------------------------------------------------


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    socket.inet_pton(socket.AF_INET, host)
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="role", required=True)
    ps = sub.add_parser("server")
    ps.add_argument("--port", type=int, required=True)
    pp = sub.add_parser("proxy")
    pp.add_argument("--port", type=int, required=True)
    pp.add_argument("--upstream", type=host_port, required=True)
    pp.add_argument("--cgroup", default="")
    pp.add_argument("--uid", type=int, default=-1)
    pc = sub.add_parser("client")
    pc.add_argument("--cgroup", default="")
    for sp in (ps, pp, pc):
        sp.add_argument("--cpus", default="", help="comma-separated CPU numbers to pin this process to")
    a = p.parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    if a.role == "server":
        serve(a.port)
    elif a.role == "proxy":
        join_cgroup(a.cgroup)
        proxy = Proxy(a.port, a.upstream)
        drop_privileges(a.uid)
        proxy.run()
    else:
        join_cgroup(a.cgroup)
        client()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
