"""eBPF inbound state survives the node's flow map filling up: an idle inbound connection keeps working
after many more flows than the inbound rewrite map (hr_nat, an LRU) holds — sidecar-style with the proxy
outside our cgroups (TC keeps the state on the socket), and ambient with the node proxy in its own cgroup
(sock_ops there keeps it from the moment the connection is accepted).

The map is made small for the test (pinned before the first apply, which then uses it as the node's map),
so a few hundred real connections evict the idle flows' entries — the only state the rewrite had before
per-socket storage. The idle connections must still work both ways afterwards: client first, and the
proxy first (a push on an idle connection).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.backends.base import PodTarget

from cni.contract.spec import AmbientSpec, SidecarSpec
from tests.kernel.ebpf_fixtures import PodEnv, make_cgroup, pod_env, remove_cgroup, removed_after, stop_processes

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
pytest.importorskip("bcc")

from node_agent.backends.ebpf import bpfsys, loader, pinning, tc  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402
from node_agent.kernel.netns_runner import run_in_netns  # noqa: E402

from cni.kernel.netns import entered  # noqa: E402

SMALL_NAT = 128  # test-only size of the node's inbound rewrite map (65536 on a node)
FLOWS = 4 * SMALL_NAT  # at least this many other flows
MAX_FLOWS = 24 * SMALL_NAT  # ... and more until the idle flows' entries are gone


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[EbpfBackend]:
    state = tmp_path / "state"
    # the node maps are created on first use unless pinned already: pin a small hr_nat first
    root = pinning.ensure_bpffs(state)
    (root / pinning.NODE_DIR).mkdir(exist_ok=True)
    spec = dataclasses.replace(loader.compile_object().maps["hr_nat"], max_entries=SMALL_NAT)
    fd = bpfsys.map_create(spec, "hr_nat")
    try:
        pinning.pin(fd, root / pinning.NODE_DIR / "hr_nat")
    finally:
        os.close(fd)
    b = EbpfBackend(state)
    yield b
    pinning.remove_dir(root / pinning.NODE_DIR)
    pinning.unmount_bpffs(state)


@pytest.fixture
def target(env: PodEnv, backend: EbpfBackend) -> Iterator[PodTarget]:
    yield from removed_after(env, backend)


class InboundProxy:
    """The inbound proxy on pod:15006 (this process, outside the pod cgroup, as the ambient node proxy):
    answers each message with `proxy|<message>`; `PUSH` sends `pushed` on every other open connection."""

    def __init__(self, netns: str) -> None:
        with entered(netns):
            self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("0.0.0.0", 15006))
        self.srv.listen(256)
        self.conns: dict[tuple[str, int], socket.socket] = {}
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                conn, peer = self.srv.accept()
            except OSError:
                return
            with self.lock:
                self.conns[peer[:2]] = conn
            threading.Thread(target=self._serve, args=(conn, peer[:2]), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            while data := conn.recv(100):
                if data == b"PUSH":
                    with self.lock:
                        others = [c for p, c in self.conns.items() if p != peer]
                    for c in others:
                        push(c)
                conn.sendall(b"proxy|" + data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.pop(peer, None)
            conn.close()

    def conn_of(self, port: int) -> socket.socket:
        with self.lock:
            return next(c for p, c in self.conns.items() if p[1] == port)

    def close(self) -> None:
        self.stop = True
        self.srv.close()
        with self.lock:
            for c in self.conns.values():
                c.close()


def push(conn: socket.socket) -> None:
    """Send `pushed` on another open connection; one of the short flows may be closing meanwhile (its
    serving thread closes it under our feet), which must not end the connection that asked for the push."""
    try:
        conn.sendall(b"pushed")
    except OSError:
        pass


def client(env: PodEnv) -> socket.socket:
    with entered(f"/run/netns/{env.peer_ns}"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((env.pod_v4, 8080))
    return s


def drive_flows(env: PodEnv, nat_fd: int, keys: list[bytes]) -> int:
    """Short inbound connections (each answered by the proxy) until at least FLOWS were made and every
    key is gone from hr_nat; returns how many. The LRU keeps per-CPU lists of fresh entries, flushed when
    that CPU needs room: the flows are spread over every CPU in turn (batches pinned to one CPU each)."""
    cpus = sorted(os.sched_getaffinity(0))
    try:
        for i in range(MAX_FLOWS):
            if i % SMALL_NAT == 0:
                if i >= FLOWS and all(bpfsys.map_lookup(nat_fd, k, 20) is None for k in keys):
                    return i
                os.sched_setaffinity(0, {cpus[(i // SMALL_NAT) % len(cpus)]})
            with client(env) as c:
                c.sendall(b"f%d" % i)
                assert c.recv(100) == b"proxy|f%d" % i
    finally:
        os.sched_setaffinity(0, cpus)
    return MAX_FLOWS


def nat_key(cookie: int, addr: str, port: int) -> bytes:
    """struct hr_conn_key: netns cookie, client address (IPv4 as ::ffff:a.b.c.d), client port; 32 bytes."""
    mapped = socket.inet_pton(socket.AF_INET6, f"::ffff:{addr}")
    return struct.pack("=Q16sI4x", cookie, mapped, port)


def test_idle_inbound_connections_survive_more_flows_than_the_map_holds(env, backend, target):
    proxy = InboundProxy(env.pod_ns_path)
    idle: list[socket.socket] = []
    try:
        backend.apply(target, SidecarSpec())  # every inbound port captured
        talked = client(env)  # used both ways, then idle
        talked.sendall(b"hello")
        assert talked.recv(100) == b"proxy|hello"
        silent = client(env)  # only the handshake, then idle: not one segment more before the eviction
        idle += [talked, silent]
        cookie = run_in_netns(env.pod_ns_path, tc.netns_cookie_here)
        nat_fd = pinning.open_pinned(backend.state_dir / "bpf" / pinning.NODE_DIR / "hr_nat")
        assert nat_fd is not None
        try:
            keys = [nat_key(cookie, env.peer_v4, s.getsockname()[1]) for s in idle]
            assert all(bpfsys.map_lookup(nat_fd, k, 20) is not None for k in keys)
            drive_flows(env, nat_fd, keys)  # many more flows than hr_nat holds
            evicted = [bpfsys.map_lookup(nat_fd, k, 20) is None for k in keys]
        finally:
            os.close(nat_fd)
        assert all(evicted), "the idle flows' hr_nat entries were not evicted: the test proves nothing"
        # the per-socket state of the flow that carried data (the accepted socket is the key)
        store_fd = pinning.open_pinned(backend.state_dir / "bpf" / pinning.NODE_DIR / "hr_in_orig")
        assert store_fd is not None
        try:
            own = bpfsys.map_lookup(store_fd, struct.pack("=i", proxy.conn_of(talked.getsockname()[1]).fileno()), 20)
        finally:
            os.close(store_fd)
        assert own is not None and struct.unpack_from("!H", own, 16)[0] == 8080
        # client first on both idle connections
        talked.sendall(b"again")
        assert talked.recv(100) == b"proxy|again"
        silent.sendall(b"late")
        assert silent.recv(100) == b"proxy|late"
        # the proxy first: a push on each idle connection, from the port the client dialled
        with client(env) as ctl:
            ctl.sendall(b"PUSH")
            assert ctl.recv(100) == b"proxy|PUSH"
        for s in idle:
            assert s.recv(100) == b"pushed"
            assert s.getpeername() == (env.pod_v4, 8080)
    finally:
        for s in idle:
            s.close()
        proxy.close()


PROXY_SCRIPT = r"""
import os, socket, sys, threading
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 15006))
srv.listen(256)
conns = {}
lock = threading.Lock()
def serve(conn, peer):
    try:
        while True:
            data = conn.recv(100)
            if not data:
                break
            if data == b"PUSH":
                with lock:
                    others = [c for p, c in conns.items() if p != peer]
                for c in others:
                    try:
                        c.sendall(b"pushed")
                    except OSError:
                        pass  # a short flow closing meanwhile
            conn.sendall(b"proxy|" + data)
    except OSError:
        pass
    with lock:
        conns.pop(peer, None)
    conn.close()
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    with lock:
        conns[peer] = conn
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""


def test_ambient_idle_connection_the_proxy_speaks_first_on_after_eviction(env, backend, target, tmp_path):
    """Only the handshake, then silence, then the flow's hr_nat entry evicted, then the proxy writes first:
    only state kept on the accepted socket from the start (sock_ops on the proxy's cgroup) gets that reply
    out from the port the client dialled."""
    proxy_cg = make_cgroup(env.cgroup.parent / f"{env.cgroup.name}-proxy")
    script = tmp_path / "proxy.py"
    script.write_text(PROXY_SCRIPT)
    procs: list[subprocess.Popen[str]] = []
    silent: socket.socket | None = None
    try:
        amb = EbpfBackend(backend.state_dir, proxy_cgroup=proxy_cg)
        amb.apply(target, AmbientSpec())
        p = subprocess.Popen([*env.nsenter(env.pod_ns), sys.executable, str(script), str(proxy_cg)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        silent = client(env)
        cookie = run_in_netns(env.pod_ns_path, tc.netns_cookie_here)
        key = nat_key(cookie, env.peer_v4, silent.getsockname()[1])
        nat_fd = pinning.open_pinned(backend.state_dir / "bpf" / pinning.NODE_DIR / "hr_nat")
        assert nat_fd is not None
        try:
            drive_flows(env, nat_fd, [key])
            assert bpfsys.map_lookup(nat_fd, key, 20) is None, "not evicted: the test proves nothing"
        finally:
            os.close(nat_fd)
        with client(env) as ctl:
            ctl.sendall(b"PUSH")
            assert ctl.recv(100) == b"proxy|PUSH"
        assert silent.recv(100) == b"pushed"
        silent.sendall(b"after")
        assert silent.recv(100) == b"proxy|after"
        amb.remove(target)
    finally:
        if silent is not None:
            silent.close()
        stop_processes(procs)
        remove_cgroup(proxy_cg)
