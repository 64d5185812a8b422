"""Kernel-test kit for comparing backends: small processes placed in a pod env (tests/kernel/ebpf_fixtures.py)
that report what each end of a connection sees, and the comparable view of a TCP run.

Servers report, per accepted connection / datagram: peer address, local address (arrival port) and
SO_ORIGINAL_DST; the app reports its own socket address (getsockname) and the peer it believes it talks to
(getpeername / recvfrom's source). A uid is taken before the socket is made (as a proxy running as 1337
does) unless uid_after_socket.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.kernel.ebpf_fixtures import PodEnv, stop_processes

# The processes of the scenarios: servers (TCP and UDP) that report what their accepted socket / the
# datagram shows, and an app that reports what its own socket shows.
HELPER = r"""
import json, os, select, socket, struct, sys

def join(cg):
    if cg != "-":
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

def fmt(a):
    return ("[%s]:%d" if ":" in a[0] else "%s:%d") % (a[0], a[1])

def orig_dst(conn, family):
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
            return fmt((socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]))
        raw = conn.getsockopt(41, 80, 28)
        return fmt((socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]))
    except OSError as e:
        return "error:%d" % e.errno

def listeners(kind, port, addrs):
    socks = []
    for addr in addrs.split(","):
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        socks.append(s)
    return socks

def serve(cg, port, name, addrs):
    join(cg)
    socks = listeners(socket.SOCK_STREAM, int(port), addrs)
    print("ready", flush=True)
    while True:
        for s in select.select(socks, [], [])[0]:
            conn, peer = s.accept()
            conn.recv(100)
            reply = {"name": name, "peer": fmt(peer), "local": fmt(conn.getsockname()),
                     "orig": orig_dst(conn, s.family)}
            conn.sendall(json.dumps(reply).encode())
            conn.close()

def udpserve(cg, port, name, addrs):
    join(cg)
    socks = listeners(socket.SOCK_DGRAM, int(port), addrs)
    print("ready", flush=True)
    while True:
        for s in select.select(socks, [], [])[0]:
            data, peer = s.recvfrom(2048)
            reply = {"name": name, "peer": fmt(peer), "local": fmt(s.getsockname()), "data": data.decode()}
            s.sendto(json.dumps(reply).encode(), peer)

def family_of(host, v6sock):
    return socket.AF_INET6 if ":" in host or v6sock == "1" else socket.AF_INET

def app(cg, uid, host, port, src, v6sock, early):
    # early: switch to uid before the socket exists (as a proxy running as 1337 does); else after it
    join(cg)
    if int(uid) >= 0 and early == "1":
        os.setgid(int(uid)); os.setuid(int(uid))
    s = socket.socket(family_of(host, v6sock), socket.SOCK_STREAM)
    if src:
        s.bind((src, 0))
    if int(uid) >= 0 and early != "1":
        os.setgid(int(uid)); os.setuid(int(uid))
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        out = {"ok": True, "sock": fmt(s.getsockname()), "peername": fmt(s.getpeername())}
        s.sendall(b"hello")
        buf = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        out["reply"] = json.loads(buf.decode())
    except OSError as e:
        out = {"ok": False, "error": str(e)}
    print(json.dumps(out))

def udpapp(cg, host, port):
    join(cg)
    fam = family_of(host, "0")
    out = {}
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"q1", (host, int(port)))
    data, src = s.recvfrom(2048)
    out["unconnected"] = {"reply": json.loads(data.decode()), "src": fmt(src), "sock": fmt(s.getsockname())}
    c = socket.socket(fam, socket.SOCK_DGRAM)
    c.settimeout(3)
    c.connect((host, int(port)))
    c.send(b"q2")
    data = c.recv(2048)
    out["connected"] = {"reply": json.loads(data.decode()), "peername": fmt(c.getpeername()),
                        "sock": fmt(c.getsockname())}
    print(json.dumps(out))

cmd = sys.argv[1]
if cmd == "serve":
    serve(*sys.argv[2:6])
elif cmd == "udpserve":
    udpserve(*sys.argv[2:6])
elif cmd == "udpapp":
    udpapp(*sys.argv[2:5])
else:
    app(*sys.argv[2:9])
"""

ANY = "0.0.0.0,::"
LOOPBACK = "127.0.0.1,::1"


class Scenario:
    """The processes of one scenario in the pod env, started and stopped around one backend run."""

    def __init__(self, env: PodEnv, helper: Path) -> None:
        self.env = env
        self.helper = helper
        self.procs: list[subprocess.Popen[str]] = []

    def _start(self, ns: str, what: str, cgroup: Path | None, port: int, name: str, addrs: str) -> None:
        cmd = [
            *self.env.nsenter(ns),
            sys.executable,
            str(self.helper),
            what,
            str(cgroup or "-"),
            str(port),
            name,
            addrs,
        ]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.kill()
            err = p.stderr.read() if p.stderr else ""
            raise RuntimeError(f"{what} {name} on {addrs}:{port} did not start: {line!r} {err}")

    def serve(self, ns: str, port: int, name: str, addrs: str = ANY, cgroup: Path | None = None) -> None:
        self._start(ns, "serve", cgroup, port, name, addrs)

    def udpserve(self, ns: str, port: int, name: str, addrs: str, cgroup: Path | None = None) -> None:
        self._start(ns, "udpserve", cgroup, port, name, addrs)

    def _run(self, ns: str, *args: str) -> dict[str, Any]:
        cmd = [*self.env.nsenter(ns), sys.executable, str(self.helper), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
        if res.returncode != 0 or not res.stdout.strip():
            raise RuntimeError(f"{args[0]} failed: {res.stderr}")
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        return out

    def app(
        self, host: str, port: int, uid: int = -1, src: str = "", v6sock: bool = False, uid_after_socket: bool = False
    ) -> dict[str, Any]:
        """A TCP client in the pod netns and cgroup, running as uid (from before its socket is made, unless
        uid_after_socket: a socket made by root, connected by uid)."""
        args = (str(uid), host, str(port), src, "1" if v6sock else "0", "0" if uid_after_socket else "1")
        return self._run(self.env.pod_ns, "app", str(self.env.cgroup), *args)

    def from_peer(self, host: str, port: int) -> dict[str, Any]:
        return self._run(self.env.peer_ns, "app", "-", "-1", host, str(port), "", "0", "1")

    def udpapp(self, host: str, port: int) -> dict[str, Any]:
        return self._run(self.env.pod_ns, "udpapp", str(self.env.cgroup), host, str(port))

    def stop(self) -> None:
        stop_processes(self.procs)


def host_of(addr: str) -> str:
    """'10.1.2.3:45' / '[fd00::1]:45' -> the address, normalised ('::ffff:10.1.2.3' stays as written)."""
    host = addr.rsplit(":", 1)[0].strip("[]")
    return str(ipaddress.ip_address(host))


PROXY_NAMES = frozenset({"outbound", "inbound", "dns-tcp"})


def tcp_view(got: dict[str, Any]) -> dict[str, Any]:
    """The comparable part of a TCP app run: who answered, peer/local/orig on the server, the app's view.

    SO_ORIGINAL_DST only where a proxy listener answered: on a connection that was not redirected iptables
    answers from any conntrack entry (the plain destination) and eBPF has nothing (ENOENT); see docs/ebpf.md.
    """
    assert got["ok"], got
    r = got["reply"]
    return {
        "server": r["name"],
        "server_peer": host_of(r["peer"]),
        "server_local": r["local"],  # address and arrival port
        "orig": r["orig"] if r["name"] in PROXY_NAMES else None,
        "app_sock": host_of(got["sock"]),
        "app_peername": got["peername"],
    }
