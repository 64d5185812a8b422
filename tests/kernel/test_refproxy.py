"""The reference proxy (`headrace proxy`) with real traffic between two netns joined by a veth pair.

Each netns gets the ambient in-pod redirect (cni.kernel.tables.apply_ambient, iptables-nft), inside
the test's own netns only. The agent side is a real ProxyHub; the proxy runs as a `headrace proxy`
subprocess (pinned-path mode and SCM_RIGHTS side-channel mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.hub import ProxyHub, ProxyNack

from cni.kernel.netns import entered
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel

APP_PORT = 8080
T = 10.0
IPT = {4: "iptables-nft", 6: "ip6tables-nft"}


def ambient_redirect(ns: NetNS) -> None:
    """The in-pod ambient rules: the project's own (cni.rules) when present, else a minimal stand-in
    (nat OUTPUT: TCP not marked 0x539 -> 15001; nat PREROUTING: TCP -> 15006)."""
    try:
        from cni.contract.spec import AmbientSpec
        from cni.kernel.tables import apply_ambient
    except ImportError:
        pass
    else:
        apply_ambient(ns.path, AmbientSpec(), (4, 6), "nft")
        return
    for fam in (4, 6):
        ns.run([IPT[fam], "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "!", "--mark", "0x539",
                "-j", "REDIRECT", "--to-ports", "15001"])
        ns.run([IPT[fam], "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15006"])


class App:
    """A TCP server inside a netns: reads to EOF, answers b"got:" + payload, records what it got."""

    def __init__(self, ns: NetNS) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.socks: list[socket.socket] = []
        with entered(ns.path):
            for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                s = socket.socket(fam, socket.SOCK_STREAM)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, APP_PORT))
                s.listen(16)
                self.socks.append(s)
        for s in self.socks:
            threading.Thread(target=self._loop, args=(s,), daemon=True).start()

    def _loop(self, s: socket.socket) -> None:
        while True:
            try:
                conn, peer = s.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(T)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                self.received.put((str(peer[0]), data))
                conn.sendall(b"got:" + data)

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def request(ns: NetNS, ip: str, payload: bytes, port: int = APP_PORT) -> bytes:
    """Connect from inside `ns` (the socket is made there), send, half-close, read the reply."""
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with entered(ns.path):
        s = socket.socket(fam, socket.SOCK_STREAM)
    with s:
        s.settimeout(T)
        s.connect((ip, port))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@dataclass
class ProxyProc:
    argv: list[str]
    stderr_path: str
    lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        err = open(self.stderr_path, "a")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err, text=True)
        err.close()
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(json.loads(line))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def next_lines(self, n: int) -> list[dict[str, Any]]:
        return [self.lines.get(timeout=T) for _ in range(n)]

    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()


@dataclass
class World:
    client: NetNS
    server: NetNS
    client_ips: tuple[str, str]
    server_ips: tuple[str, str]
    hub: ProxyHub
    proxy: ProxyProc
    app: App

    def workload(self, role: str, **override: Any) -> WorkloadInfo:
        ns = self.client if role == "client" else self.server
        ips = self.client_ips if role == "client" else self.server_ips
        base: dict[str, Any] = dict(uid=f"uid-{role}-{ns.name}", name=role, namespace="shop", ips=ips,
                                    netns_path=ns.path, netns_inode=ns.inode(), node="kt")
        base.update(override)
        return WorkloadInfo(**base)


def make_world(tmp: str, netns_fd: bool) -> Iterator[World]:
    if not shutil.which("iptables-nft") or not shutil.which("nsenter"):
        pytest.skip("needs iptables-nft and nsenter")
    made: list[Any] = []
    try:
        client = NetNS.create("hrpc-")
        made.append(client)
        server = NetNS.create("hrps-")
        made.append(server)
        a, b = random.randint(200, 207), random.randint(0, 255)
        h = f"{random.randint(0, 0xffff):x}"
        c4, s4, c6, s6 = f"10.{a}.{b}.1", f"10.{a}.{b}.2", f"fd00:4852:{h}::1", f"fd00:4852:{h}::2"
        # the veth is born inside the client netns with its peer in the server netns: root netns untouched
        client.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", server.name])
        for ns, v4, v6 in ((client, c4, c6), (server, s4, s6)):
            ns.run(["ip", "addr", "add", f"{v4}/24", "dev", "eth0"])
            ns.run(["ip", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad"])
            ns.run(["ip", "link", "set", "eth0", "up"])
            ambient_redirect(ns)
        app = App(server)
        made.append(app)
        hub = ProxyHub(os.path.join(tmp, "proxy.sock"), "kernel-test-agent")
        hub.start()
        made.append(hub)
        argv = [sys.executable, "-m", "node_agent.cli", "proxy", "--socket", hub.socket_path, "--id", "kt-proxy"]
        if netns_fd:
            argv.append("--netns-fd")
        proxy = ProxyProc(argv, os.path.join(tmp, "proxy.err"))
        proxy.start()
        made.append(proxy)
        yield World(client, server, (c4, c6), (s4, s6), hub, proxy, app)
    finally:
        for thing in reversed(made):
            if isinstance(thing, ProxyHub):
                thing.stop(grace=0.2)
            elif isinstance(thing, NetNS):
                thing.delete()
            else:
                thing.stop() if isinstance(thing, ProxyProc) else thing.close()


@pytest.fixture(params=["netns-path", "netns-fd"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    tmp = tempfile.mkdtemp(prefix="hr-rp-", dir="/tmp")
    try:
        yield from make_world(tmp, request.param == "netns-fd")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wait_until(pred: Any, timeout: float = T) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def enrol_both(w: World) -> None:
    futs = [w.hub.upsert(w.workload("client")), w.hub.upsert(w.workload("server"))]
    try:
        for f in futs:
            f.result(T)
    except Exception:
        print(w.proxy.stderr())
        raise
    assert w.hub.wait_snapshot_acked(T)


def by_direction(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {x["direction"]: x for x in lines}
    assert set(out) == {"outbound", "inbound"}, lines
    return out


@pytest.mark.parametrize("family", [4, 6])
def test_traffic_through_proxy_both_directions(world: World, family: int) -> None:
    w = world
    enrol_both(w)
    cip, sip = w.client_ips[family == 6], w.server_ips[family == 6]
    payload = b"hello-through-the-proxy " * 1000
    reply = request(w.client, sip, payload)
    assert reply == b"got:" + payload
    peer, got = w.app.received.get(timeout=T)
    assert got == payload
    assert peer == sip  # the inbound hop dials the app from inside the server pod
    lines = by_direction(w.proxy.next_lines(2))
    fmt = (lambda ip, port: f"[{ip}]:{port}") if family == 6 else (lambda ip, port: f"{ip}:{port}")
    out, inb = lines["outbound"], lines["inbound"]
    assert out["workload"] == "shop/client" and inb["workload"] == "shop/server"
    assert out["dst"] == inb["dst"] == fmt(sip, APP_PORT)
    assert out["src"].startswith(fmt(cip, "")) and inb["src"].startswith(fmt(cip, ""))
    for line in (out, inb):
        assert line["bytes_sent"] == len(payload)
        assert line["bytes_received"] == len(reply)
        assert "error" not in line
    logs = [json.loads(x) for x in w.proxy.stderr().splitlines() if x.startswith("{")]  # JSON logs
    assert any(x.get("event") == "workload_added" and x.get("workload") == "shop/client" for x in logs)


def test_delete_closes_listeners_and_bad_netns_is_nacked(world: World) -> None:
    w = world
    enrol_both(w)
    assert request(w.client, w.server_ips[0], b"one") == b"got:one"
    w.proxy.next_lines(2)
    # delete the client: its 15001 listener goes away, so the still-installed redirect now finds nothing
    w.hub.remove(w.workload("client").uid).result(T)
    with pytest.raises(ConnectionRefusedError):
        request(w.client, w.server_ips[0], b"two")
    # a wrong inode and a missing netns are refused with the proxy's reason
    bad = w.workload("client", netns_inode=w.client.inode() + 12345)
    with pytest.raises(ProxyNack, match="inode"):
        w.hub.upsert(bad).result(T)
    gone = w.workload("client", uid="uid-gone", netns_path=w.client.path + "-missing")
    with pytest.raises(ProxyNack, match=r"gone|cannot open|unknown"):
        w.hub.upsert(gone).result(T)
    w.hub.remove("uid-gone").result(T)
    # enrol again: traffic flows through the proxy again
    w.hub.upsert(w.workload("client")).result(T)
    assert request(w.client, w.server_ips[0], b"three") == b"got:three"
    assert {x["workload"] for x in w.proxy.next_lines(2)} == {"shop/client", "shop/server"}


def test_proxy_restart_gets_snapshot_and_long_connection_survives_delete(world: World) -> None:
    w = world
    enrol_both(w)
    # a connection open across the client's delete keeps working (delete closes listeners only)
    with entered(w.client.path):
        held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with held:
        held.settimeout(T)
        held.connect((w.server_ips[0], APP_PORT))
        held.sendall(b"before-")
        w.hub.remove(w.workload("client").uid).result(T)
        held.sendall(b"after")
        held.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := held.recv(65536):
            out += chunk
    assert out == b"got:before-after"
    w.proxy.next_lines(2)
    w.hub.upsert(w.workload("client")).result(T)
    # proxy restart: the new process gets the full snapshot and serves both workloads again
    sessions = w.hub.status()["sessions"]
    w.proxy.stop()
    wait_until(lambda: not w.hub.connected)
    w.proxy.start()
    wait_until(lambda: w.hub.status()["sessions"] == sessions + 1 and w.hub.snapshot_acked)
    assert request(w.client, w.server_ips[1], b"again") == b"got:again"
    assert {x["workload"] for x in w.proxy.next_lines(2)} == {"shop/client", "shop/server"}


def test_a_port_taken_in_the_pod_fails_the_add_and_leaves_nothing_behind() -> None:
    """The listeners are made in one go on the proxy's loop thread inside the pod netns: one that cannot
    be bound fails the add with the port named, and closes the others and the netns fd."""
    import asyncio
    import uuid

    from node_agent.refproxy.workloads import WorkloadError, WorkloadTable

    ns = NetNS.create("hrt-rpx-")
    try:
        with entered(ns.path):
            blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        blocker.bind(("0.0.0.0", 15006))
        blocker.listen(1)
        info = WorkloadInfo(uid=str(uuid.uuid4()), name="p", namespace="n", ips=("10.9.0.2",),
                            netns_path=ns.path, netns_inode=os.stat(ns.path).st_ino)
        table = WorkloadTable(lambda _record: None)
        fds_before = len(os.listdir("/proc/self/fd"))
        home = os.readlink("/proc/thread-self/ns/net")

        async def add() -> None:
            with pytest.raises(WorkloadError, match="port 15006"):
                await table.add(info)

        asyncio.run(add())
        assert info.uid not in table
        assert len(os.listdir("/proc/self/fd")) == fds_before  # listeners and the netns fd closed
        with entered(ns.path):
            again = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        again.bind(("0.0.0.0", 15001))  # nothing of the failed add still holds its ports
        again.close()
        blocker.close()
        assert os.readlink("/proc/thread-self/ns/net") == home  # the loop's thread came back
    finally:
        ns.delete()
