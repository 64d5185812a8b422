"""The agent's ZDS server (proxy/zds_server.ZdsHub) against a real SOCK_SEQPACKET peer playing ztunnel:
the fd an add carries is the pod's netns (same inode), no other message carries one, an error ack fails
the workload, a reconnect gets a fresh snapshot and snapshot_sent, two connections (a ztunnel upgrade)
get adds on the newest only and deletes on both (the newest gone, its unacked adds go to the older one),
a missing ack closes the connection, a hello without a version is refused (held open a second first)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
from node_agent.lab.netns import NetNS
from node_agent.protocol import zds_wire
from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.zds_book import ZdsNack
from node_agent.proxy.zds_server import REFUSED_HOLD, ZdsHub

pytestmark = pytest.mark.kernel


class FakeZtunnel:
    """ztunnel's side of one connection, driven by the test."""

    def __init__(self, path: str, version: int = zds_wire.ZDS_VERSION) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        self.sock.connect(path)
        zds_wire.send_packet(self.sock, zds_wire.hello(version))

    def recv(self) -> tuple[zds_wire.Request, list[int]]:
        data, fds = zds_wire.recv_packet(self.sock)
        assert data, "agent closed the connection"
        return zds_wire.parse_request(data, len(fds)), fds

    def answer(self, error: str = "") -> tuple[zds_wire.Request, int | None]:
        """Receive one request, ack it; returns it and the inode of the fd it carried (closed)."""
        req, fds = self.recv()
        inode = None
        for fd in fds:
            inode = os.fstat(fd).st_ino
            os.close(fd)
        zds_wire.send_packet(self.sock, zds_wire.ack(error))
        return req, inode

    def closed_by_agent(self) -> bool:
        try:
            data, _ = zds_wire.recv_packet(self.sock)
        except ConnectionResetError:
            return True
        return data == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pods() -> Iterator[list[NetNS]]:
    made = [NetNS.create("hrz-"), NetNS.create("hrz-")]
    try:
        yield made
    finally:
        for ns in made:
            ns.delete()


@pytest.fixture
def hub() -> Iterator[ZdsHub]:
    d = tempfile.mkdtemp(prefix="hrz-", dir="/tmp")
    h = ZdsHub(os.path.join(d, "zt", "ztunnel.sock"), ack_timeout=2.0)
    h.start()
    try:
        yield h
    finally:
        h.stop()
        shutil.rmtree(d, ignore_errors=True)


def workload(ns: NetNS, uid: str) -> WorkloadInfo:
    return WorkloadInfo(uid=uid, name=f"pod-{uid}", namespace="shop", service_account="sa",
                        netns_path=ns.path, netns_inode=ns.inode())


def wait(fut: futures.Future[None]) -> None:
    fut.result(timeout=10)


def test_socket_is_seqpacket_0600_and_adds_carry_the_pods_netns(hub: ZdsHub, pods: list[NetNS]) -> None:
    st = os.stat(hub.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    first = hub.upsert(workload(pods[0], "a"))
    zt = FakeZtunnel(hub.socket_path)
    try:
        req, inode = zt.answer()
        assert (req.kind, req.uid, req.name, req.namespace, req.service_account) == (
            "add", "a", "pod-a", "shop", "sa")
        assert inode == pods[0].inode() != os.stat("/proc/self/ns/net").st_ino
        wait(first)
        req, inode = zt.answer()
        assert req.kind == "snapshot_sent" and inode is None
        assert hub.wait_snapshot_acked(5) and hub.connected
        second = hub.upsert(workload(pods[1], "b"))
        req, inode = zt.answer()
        assert (req.kind, req.uid, inode) == ("add", "b", pods[1].inode())
        wait(second)
        gone = hub.remove("a")
        req, inode = zt.answer()
        assert (req.kind, req.uid, inode) == ("del", "a", None)
        wait(gone)
        assert hub.status()["pending"] == 0
    finally:
        zt.close()


def test_error_ack_fails_the_workload(hub: ZdsHub, pods: list[NetNS]) -> None:
    zt = FakeZtunnel(hub.socket_path)
    try:
        assert zt.answer()[0].kind == "snapshot_sent"
        fut = hub.upsert(workload(pods[0], "a"))
        req, _ = zt.answer(error="cannot create the in-pod listeners")
        assert req.kind == "add"
        with pytest.raises(ZdsNack, match="in-pod listeners"):
            wait(fut)
        assert hub.status()["nacks"] == 1
    finally:
        zt.close()


def test_reconnect_gets_snapshot_and_snapshot_sent(hub: ZdsHub, pods: list[NetNS]) -> None:
    wait_a = hub.upsert(workload(pods[0], "a"))
    hub.upsert(workload(pods[1], "b"))
    zt = FakeZtunnel(hub.socket_path)
    assert [zt.answer()[0].kind for _ in range(3)] == ["add", "add", "snapshot_sent"]
    wait(wait_a)
    zt.close()  # ztunnel restarts
    zt = FakeZtunnel(hub.socket_path)
    try:
        got = [zt.answer() for _ in range(3)]
        assert {(r.uid, ino) for r, ino in got[:2]} == {("a", pods[0].inode()), ("b", pods[1].inode())}
        assert got[2][0].kind == "snapshot_sent"
    finally:
        zt.close()


def test_two_connections_newest_gets_adds_all_get_deletes(hub: ZdsHub, pods: list[NetNS]) -> None:
    hub.upsert(workload(pods[0], "a"))
    old = FakeZtunnel(hub.socket_path)
    assert [old.answer()[0].kind for _ in range(2)] == ["add", "snapshot_sent"]
    new = FakeZtunnel(hub.socket_path)  # the upgraded ztunnel starts while the old one drains
    try:
        assert [new.answer()[0].kind for _ in range(2)] == ["add", "snapshot_sent"]
        assert hub.status()["connections"] == 2
        fut = hub.upsert(workload(pods[1], "b"))
        req, inode = new.answer()
        assert (req.uid, inode) == ("b", pods[1].inode())
        wait(fut)
        gone = hub.remove("a")
        assert new.answer()[0] == zds_wire.Request("del", "a")
        assert old.answer()[0] == zds_wire.Request("del", "a")  # the add of b never went there
        wait(gone)
    finally:
        old.close()
        new.close()


def test_the_newest_gone_before_its_ack_the_older_one_takes_the_add(hub: ZdsHub, pods: list[NetNS]) -> None:
    old = FakeZtunnel(hub.socket_path)
    try:
        assert old.answer()[0].kind == "snapshot_sent"
        new = FakeZtunnel(hub.socket_path)
        assert new.answer()[0].kind == "snapshot_sent"
        fut = hub.upsert(workload(pods[0], "a"))
        req, fds = new.recv()  # the upgraded ztunnel dies before it answers
        for fd in fds:
            os.close(fd)
        new.close()
        req, inode = old.answer()
        assert (req.kind, req.uid, inode) == ("add", "a", pods[0].inode())
        wait(fut)
    finally:
        old.close()


def test_missing_ack_closes_the_connection_and_the_next_snapshot_settles(hub: ZdsHub, pods: list[NetNS]) -> None:
    zt = FakeZtunnel(hub.socket_path)
    assert zt.answer()[0].kind == "snapshot_sent"
    fut = hub.upsert(workload(pods[0], "a"))
    _req, fds = zt.recv()  # ... and never answered
    for fd in fds:
        os.close(fd)
    assert zt.closed_by_agent()  # after ack_timeout
    assert not fut.done()
    zt.close()
    zt = FakeZtunnel(hub.socket_path)
    try:
        assert zt.answer()[0].uid == "a"
        wait(fut)
    finally:
        zt.close()


def test_no_version_refused_a_newer_one_spoken_to_in_v1(hub: ZdsHub) -> None:
    bad = FakeZtunnel(hub.socket_path, version=0)
    started = time.monotonic()
    assert bad.closed_by_agent()
    assert time.monotonic() - started >= REFUSED_HOLD * 0.9  # no tight reconnect loop
    bad.close()
    assert hub.status()["refused"] == 1
    newer = FakeZtunnel(hub.socket_path, version=7)
    try:
        assert newer.answer()[0].kind == "snapshot_sent"
        assert hub.status()["connections"] == 1
    finally:
        newer.close()


def test_vanished_netns(hub: ZdsHub, pods: list[NetNS]) -> None:
    zt = FakeZtunnel(hub.socket_path)
    try:
        assert zt.answer()[0].kind == "snapshot_sent"
        fut = hub.upsert(WorkloadInfo(uid="x", name="x", namespace="shop", netns_path="/nonexistent/ns"))
        with pytest.raises(ZdsNack, match="netns"):
            wait(fut)  # fail closed: never sent without its netns
        hub.upsert(workload(pods[0], "a"))
        assert zt.answer()[0].uid == "a"  # the connection is still fine
    finally:
        zt.close()


def test_snapshot_keeps_a_workload_whose_netns_is_gone(hub: ZdsHub, tmp_path: Path) -> None:
    hub.upsert(WorkloadInfo(uid="k", name="k", namespace="shop", netns_path=str(tmp_path / "gone")))
    zt = FakeZtunnel(hub.socket_path)
    try:
        req, inode = zt.answer()
        assert (req, inode) == (zds_wire.Request("keep", "k"), None)
        assert zt.answer()[0].kind == "snapshot_sent"
    finally:
        zt.close()


class Gate:
    def __init__(self) -> None:
        import threading

        self.opened = threading.Event()

    def ready(self) -> bool:
        return self.opened.is_set()

    def wait_ready(self, timeout: float | None) -> bool:
        return self.opened.wait(timeout)


def test_snapshot_waits_for_the_gate(pods: list[NetNS]) -> None:
    d = tempfile.mkdtemp(prefix="hrz-", dir="/tmp")
    gate = Gate()
    h = ZdsHub(os.path.join(d, "ztunnel.sock"), snapshot_gate=gate)
    h.start()
    zt = FakeZtunnel(h.socket_path)
    try:
        zt.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            zt.recv()  # adoption not done: no snapshot yet (an empty one would make ztunnel drop all)
        h.upsert(workload(pods[0], "a"))
        gate.opened.set()
        zt.sock.settimeout(10)
        assert [zt.answer()[0].kind for _ in range(2)] == ["add", "snapshot_sent"]
    finally:
        zt.close()
        h.stop()
        shutil.rmtree(d, ignore_errors=True)
