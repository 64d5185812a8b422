"""Kernel-test fixtures of the eBPF backend tests: a pod netns + peer netns over veth, a cgroup v2 dir for
the pod, and helper processes (app client, proxy, server) placed in that netns and cgroup.

Everything gets a random suffix and is removed in teardown, even on failure. Nothing in the root netns.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_agent.backends.base import PodTarget

CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")

HELPER = r"""
import json, os, select, socket, struct, sys, time

def join(cg):
    if cg != "-":
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

def orig_dst(conn, family):
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
            port, = struct.unpack_from("!H", raw, 2)
            return "%s:%d" % (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        raw = conn.getsockopt(41, 80, 28)
        port, = struct.unpack_from("!H", raw, 2)
        return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    except OSError as e:
        return "error:%d" % e.errno

def serve(cg, port, name):
    join(cg)
    socks = []
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(64)
        socks.append(s)
    print("ready", flush=True)
    while True:
        r, _, _ = select.select(socks, [], [])
        for s in r:
            conn, peer = s.accept()
            if "@" in name:  # NAME@SECONDS: a slow proxy, asking for the original destination that much later
                time.sleep(float(name.partition("@")[2]))
            data = conn.recv(100)
            reply = {"name": name, "orig": orig_dst(conn, s.family), "peer": str(peer[0]),
                     "local": "%s:%d" % conn.getsockname()[:2], "data": data.decode(errors="replace")}
            conn.sendall((json.dumps(reply) + "\n").encode())
            conn.close()

def connect(cg, uid, mark, host, port, src=""):
    join(cg)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    if src:
        s.bind((src, 0))
    if int(mark):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(mark))
    if int(uid) >= 0:
        os.setgid(int(uid)); os.setuid(int(uid))
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        s.sendall(b"hello")
        buf = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        print(json.dumps({"ok": True, "reply": json.loads(buf.decode())}))
    except OSError as e:
        print(json.dumps({"ok": False, "error": str(e)}))

def udpserve(cg, port, name):
    join(cg)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(name.encode() + b":" + data, peer)

def udp(cg, host, port):
    join(cg)
    out = {}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"q1", (host, int(port)))
    data, src = s.recvfrom(2048)
    out["unconnected"] = {"data": data.decode(), "src": "%s:%d" % src}
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(3)
    c.connect((host, int(port)))
    peer = c.getpeername()
    c.send(b"q2")
    data = c.recv(2048)
    out["connected"] = {"data": data.decode(), "peer": "%s:%d" % peer}
    print(json.dumps(out))

if sys.argv[1] == "serve":
    serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
elif sys.argv[1] == "udpserve":
    udpserve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
elif sys.argv[1] == "udp":
    udp(*sys.argv[2:5])
else:
    connect(*sys.argv[2:8])
"""


def run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True)


def suffix() -> str:
    return f"{random.randrange(16**6):06x}"


@dataclass
class PodEnv:
    """A pod netns with a peer ("the network") and the pod's cgroup v2 directory."""

    tmp: Path
    name: str
    octet: int
    pod_ns: str
    peer_ns: str
    cgroup: Path
    helper: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def pod_ns_path(self) -> str:
        return f"/run/netns/{self.pod_ns}"

    @property
    def peer_v4(self) -> str:
        return f"10.249.{self.octet}.1"

    @property
    def pod_v4(self) -> str:
        return f"10.249.{self.octet}.2"

    @property
    def peer_v6(self) -> str:
        return f"fd00:4842:{self.octet:x}::1"

    @property
    def pod_v6(self) -> str:
        return f"fd00:4842:{self.octet:x}::2"

    def target(self) -> PodTarget:
        """The PodTarget the agent would build for this pod (both IPs, its cgroup)."""
        return PodTarget(
            uid=f"pod-{self.name}",
            namespace="default",
            name="app",
            netns_path=self.pod_ns_path,
            ips=(f"{self.pod_v4}/24", f"{self.pod_v6}/64"),
            cgroup_path=str(self.cgroup),
        )

    def nsenter(self, ns: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", "--"]

    def start_server(self, ns: str, port: int, name: str, cgroup: Path | None = None) -> None:
        cmd = [*self.nsenter(ns), sys.executable, str(self.helper), "serve", str(cgroup or "-"), str(port), name]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.kill()
            raise RuntimeError(f"server {name} did not start: {line!r} {p.stderr.read() if p.stderr else ''}")

    def start_udp_server(self, ns: str, port: int, name: str, cgroup: Path | None = None) -> None:
        cmd = [*self.nsenter(ns), sys.executable, str(self.helper), "udpserve", str(cgroup or "-"), str(port), name]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            p.kill()
            raise RuntimeError(f"udp server {name} did not start")

    def udp_query(self, host: str, port: int) -> dict[str, dict[str, str]]:
        cmd = [*self.nsenter(self.pod_ns), sys.executable, str(self.helper), "udp", str(self.cgroup), host, str(port)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"udp app failed: {res.stderr}")
        out: dict[str, dict[str, str]] = json.loads(res.stdout.strip().splitlines()[-1])
        return out

    def connect_from_peer(self, host: str, port: int, src: str = "") -> dict[str, Any]:
        """A client in the peer netns (the network) dialling the pod (from source address src if given)."""
        cmd = [
            *self.nsenter(self.peer_ns),
            sys.executable,
            str(self.helper),
            "connect",
            "-",
            "-1",
            "0",
            host,
            str(port),
        ]
        if src:
            cmd.append(src)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
        if res.returncode != 0 or not res.stdout.strip():
            raise RuntimeError(f"peer client failed: {res.stderr}")
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        return out

    def connect(
        self,
        host: str,
        port: int,
        uid: int = -1,
        mark: int = 0,
        cgroup: Path | None = None,
        in_cgroup: bool = True,
        src: str = "",
    ) -> dict[str, Any]:
        """Run the 'app': a process in the pod netns (and pod cgroup) that dials host:port."""
        cg = str(cgroup or self.cgroup) if in_cgroup else "-"
        cmd = [
            *self.nsenter(self.pod_ns),
            sys.executable,
            str(self.helper),
            "connect",
            cg,
            str(uid),
            str(mark),
            host,
            str(port),
        ]
        if src:
            cmd.append(src)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
        if res.returncode != 0 or not res.stdout.strip():
            raise RuntimeError(f"app failed: {res.stderr}")
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        return out

    def close(self) -> None:
        stop_processes(self.procs)


def stop_processes(procs: list[subprocess.Popen[str]]) -> None:
    """Kill what still runs, reap everything, close the pipes; empties the list."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=5)
        for s in (p.stdout, p.stderr):
            if s is not None:
                s.close()
    procs.clear()


def removed_after(env: PodEnv, backend: Any) -> Iterator[PodTarget]:
    """The pod's target for a test (a fixture's body); its redirection removed by `backend` afterwards."""
    t = env.target()
    yield t
    backend.remove(t)


def ebpf_backend(state: Path, **options: Any) -> Iterator[Any]:
    """An EbpfBackend on the state dir `state` (and these options) for a test (a fixture's body): closed
    (its node maps and programs' descriptors) and its bpffs unmounted afterwards."""
    from node_agent.backends.ebpf import pinning
    from node_agent.backends.ebpf.backend import EbpfBackend

    b = EbpfBackend(state, **options)
    yield b
    b.close()
    pinning.unmount_bpffs(state)


def drop_node_config_entries(state_dir: Path) -> None:
    """Delete every pod's entry in the node's eBPF config map (as `bpftool map delete` would)."""
    from node_agent.backends.ebpf import bpfsys, pinning, pod_index

    fd = pinning.open_pinned(state_dir / "bpf" / pinning.NODE_DIR / pod_index.CONFIG)
    assert fd is not None
    try:
        for key in bpfsys.map_keys(fd, 8):
            bpfsys.map_delete(fd, key)
    finally:
        os.close(fd)


def make_cgroup(path: Path) -> Path:
    path.mkdir()
    return path


def remove_cgroup(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _empty_and_rmdir(child)
    _empty_and_rmdir(path)


def _empty_and_rmdir(path: Path) -> None:
    for _ in range(50):
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    path.rmdir()


def proxy_cgroup_of(env: PodEnv) -> Iterator[Path]:
    """A cgroup for the node proxy beside the pod's (removed after)."""
    cg = make_cgroup(Path(f"{env.cgroup}-proxy"))
    yield cg
    remove_cgroup(cg)


def pod_env(tmp: Path) -> Iterator[PodEnv]:
    sfx = suffix()
    env = PodEnv(
        tmp=tmp, name=sfx, octet=random.randrange(1, 250),
        pod_ns=f"hr-ebpf-pod-{sfx}", peer_ns=f"hr-ebpf-peer-{sfx}",
        cgroup=CGROUP2_ROOT / f"headrace-test-{sfx}", helper=tmp / "hr_helper.py",
    )  # fmt: skip
    env.helper.write_text(HELPER)
    made_ns: list[str] = []
    try:
        for ns in (env.pod_ns, env.peer_ns):
            run("ip", "netns", "add", ns)
            made_ns.append(ns)
        run("ip", "-n", env.pod_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", env.peer_ns)
        for ns, v4, v6 in ((env.pod_ns, env.pod_v4, env.pod_v6), (env.peer_ns, env.peer_v4, env.peer_v6)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
            run("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        make_cgroup(env.cgroup)
        yield env
    finally:
        env.close()
        remove_cgroup(env.cgroup)
        for ns in made_ns:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


# Tampering as another tool on the node would do it: from a child process (the change count leaves the
# agent's own bpf(2) calls out). TRIES: looks a test may take for one to be quiet (another process on the
# machine may move the count meanwhile).
TRIES = 20
DETACH = """
import sys
from node_agent.backends.ebpf import pinning
from node_agent.backends.ebpf.attach import Cgroup
fd = pinning.open_pinned(sys.argv[1])
with Cgroup(sys.argv[2]) as c:
    c.detach(fd, int(sys.argv[3]))
"""
DROP_ENTRIES = """
import sys
from node_agent.backends.ebpf import bpfsys, pinning
fd = pinning.open_pinned(sys.argv[1])
for key in bpfsys.map_keys(fd, 8):
    bpfsys.map_delete(fd, key)
"""


def in_child(code: str, *args: str, netns: str | None = None) -> None:
    """Runs `code` in a new Python process (in `netns` when given)."""
    enter = ["nsenter", f"--net={netns}", "--"] if netns else []
    subprocess.run([*enter, sys.executable, "-c", code, *args], check=True, capture_output=True, timeout=60)
