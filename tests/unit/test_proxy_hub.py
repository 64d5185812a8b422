"""ProxyHub against a fake node proxy speaking real gRPC over a real unix socket in a tmp dir."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import grpc
import pytest
from node_agent.protocol.fd_channel import NetnsFdError, fetch_netns_fd, side_channel_path
from node_agent.protocol.proto_gen import node_proxy_pb2 as pb
from node_agent.protocol.proto_gen import node_proxy_pb2_grpc as pb_grpc
from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.hub import HubStopped, ProxyHub, ProxyNack, Superseded

T = 5.0


def wl(uid: str, name: str | None = None) -> WorkloadInfo:
    return WorkloadInfo(uid=uid, name=name or f"pod-{uid}", namespace="ns1", ips=("10.0.0.1",),
                        netns_path=f"/var/run/headrace/netns/{uid}", netns_inode=4026531000)


class FakeProxy:
    """A node proxy that records what the agent sends and acks on demand."""

    def __init__(self, path: str, version: int = 1, proxy_id: str = "fake") -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.requests: queue.Queue[Any] = queue.Queue()
        self.received: queue.Queue[Any] = queue.Queue()
        self.requests.put(pb.ProxyMessage(hello=pb.Hello(protocol_version=version, proxy_id=proxy_id)))
        self.call = pb_grpc.NodeProxyStub(self.channel).Session(self._requests())
        self.error: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[Any]:
        while True:
            m = self.requests.get()
            if m is None:
                return
            yield m

    def _read(self) -> None:
        try:
            for m in self.call:
                self.received.put(m)
        except grpc.RpcError as exc:
            self.error = exc
        self.received.put(None)

    def recv(self) -> Any:
        m = self.received.get(timeout=T)
        assert m is not None, f"stream ended: {self.error}"
        return m

    def recv_n(self, n: int) -> list[Any]:
        return [self.recv() for _ in range(n)]

    def ack(self, seq: int, error: str = "") -> None:
        self.requests.put(pb.ProxyMessage(ack=pb.Ack(seq=seq, error=error)))

    def ack_all(self, msgs: list[Any]) -> None:
        for m in msgs:
            if m.seq:
                self.ack(m.seq)

    def wait_end(self) -> grpc.RpcError | None:
        self._reader.join(T)
        assert not self._reader.is_alive()
        return self.error

    def close(self) -> None:
        self.call.cancel()
        self.requests.put(None)
        self.channel.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="hr-hub-", dir="/tmp")  # short: unix socket paths are limited to 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def hub(sockdir: str) -> Iterator[ProxyHub]:
    h = ProxyHub(os.path.join(sockdir, "proxy.sock"), "agent-test")
    h.start()
    yield h
    h.stop(grace=0.2)


@pytest.fixture
def proxies() -> Iterator[list[FakeProxy]]:
    made: list[FakeProxy] = []
    yield made
    for p in made:
        p.close()


def connect(hub: ProxyHub, proxies: list[FakeProxy], **kw: Any) -> FakeProxy:
    p = FakeProxy(hub.socket_path, **kw)
    proxies.append(p)
    return p


def wait_until(pred: Any, timeout: float = T) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def kinds(msgs: list[Any]) -> list[str]:
    return [m.WhichOneof("msg") for m in msgs]


def test_socket_is_0600_and_stale_file_replaced(sockdir: str) -> None:
    path = os.path.join(sockdir, "proxy.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # leaves a dead socket file behind, as a crashed agent would
    h = ProxyHub(path, "a")
    h.start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        side = os.stat(side_channel_path(path))
        assert stat.S_IMODE(side.st_mode) == 0o600
        assert [n for n in os.listdir(sockdir) if n.startswith(".proxy-hub-")] == []
    finally:
        h.stop(grace=0.1)
    assert not os.path.exists(path)


def test_refuses_to_replace_a_regular_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "proxy.sock")
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(Exception, match="not a socket"):
        ProxyHub(path, "a").start()


def test_snapshot_marker_then_increments_in_order(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    fa, fb = hub.upsert(wl("a")), hub.upsert(wl("b"))
    p = connect(hub, proxies, proxy_id="zt-1")
    hello = p.recv()
    assert hello.seq == 0 and hello.hello_reply.protocol_version == 1
    assert hello.hello_reply.agent_id == "agent-test"
    assert hello.hello_reply.netns_fd_socket == side_channel_path(hub.socket_path)
    snap = p.recv_n(3)
    assert kinds(snap) == ["add", "add", "snapshot_complete"]
    assert [m.add.workload.uid for m in snap[:2]] == ["a", "b"]
    assert all(m.add.snapshot for m in snap[:2])
    assert snap[0].add.workload.netns_inode == 4026531000
    assert snap[2].snapshot_complete.count == 2
    fc = hub.upsert(wl("c"))
    fd = hub.remove("a")
    inc = p.recv_n(2)
    assert kinds(inc) == ["add", "delete"]
    assert inc[0].add.workload.uid == "c" and not inc[0].add.snapshot
    assert inc[1].delete.uid == "a"
    seqs = [m.seq for m in snap + inc]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > 0
    assert hub.connected and not hub.snapshot_acked
    p.ack_all(snap + inc)
    for f in (fb, fc, fd):
        f.result(T)
    # "a" was removed before its add was acked: that upsert was superseded
    with pytest.raises(Superseded):
        fa.result(T)
    assert hub.wait_snapshot_acked(T)
    st = hub.status()
    assert st["connected"] and st["proxy_id"] == "zt-1" and st["sessions"] == 1
    assert st["acks"] == 5 and st["nacks"] == 0 and st["pending"] == 0


def test_pending_upserts_delivered_after_connect(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    futs = [hub.upsert(wl(u)) for u in ("x", "y")]
    with pytest.raises(FutureTimeout):
        futs[0].result(0.2)
    assert not hub.connected and hub.status()["pending"] == 2
    p = connect(hub, proxies)
    msgs = p.recv_n(4)
    assert kinds(msgs) == ["hello_reply", "add", "add", "snapshot_complete"]
    assert not futs[0].done()
    p.ack_all(msgs)
    for f in futs:
        assert f.result(T) is None
    assert hub.wait_snapshot_acked(T)


def test_error_ack_fails_the_future_with_proxy_text(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    p = connect(hub, proxies)
    pre = p.recv_n(2)
    p.ack_all(pre)
    assert hub.wait_snapshot_acked(T)
    fut = hub.upsert(wl("bad"))
    m = p.recv()
    p.ack(m.seq, "netns /var/run/headrace/netns/bad is gone")
    with pytest.raises(ProxyNack, match="netns /var/run/headrace/netns/bad is gone"):
        fut.result(T)
    fut2 = hub.remove("bad")
    m2 = p.recv()
    p.ack(m2.seq, "boom")
    with pytest.raises(ProxyNack, match="boom"):
        fut2.result(T)
    assert hub.status()["nacks"] == 2


def test_future_resolves_on_latest_add_only(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    p = connect(hub, proxies)
    p.ack_all(p.recv_n(2))
    f1 = hub.upsert(wl("w", "old"))
    f2 = hub.upsert(wl("w", "new"))
    m1, m2 = p.recv_n(2)
    assert m2.add.workload.name == "new"
    p.ack(m1.seq)
    with pytest.raises(FutureTimeout):
        f1.result(0.2)
    p.ack(m2.seq)
    f1.result(T)
    f2.result(T)


def test_version_mismatch_refused(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    p = connect(hub, proxies, version=2)
    err = p.wait_end()
    assert err is not None
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 2" in (err.details() or "") and "version 1" in (err.details() or "")
    assert not hub.connected and hub.status()["refused"] == 1


def test_second_proxy_refused_first_keeps_working(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    p1 = connect(hub, proxies, proxy_id="first")
    p1.ack_all(p1.recv_n(2))
    p2 = connect(hub, proxies, proxy_id="second")
    err = p2.wait_end()
    assert err is not None and err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "first" in (err.details() or "") and "second" in (err.details() or "")
    fut = hub.upsert(wl("k"))
    p1.ack(p1.recv().seq)
    fut.result(T)
    assert hub.status()["proxy_id"] == "first"


def test_disconnect_mid_snapshot_resends_full_snapshot(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    futs = {u: hub.upsert(wl(u)) for u in ("a", "b", "c")}
    p1 = connect(hub, proxies)
    msgs = p1.recv_n(5)
    p1.ack(msgs[1].seq)  # only "a" is acked, then the proxy dies
    futs["a"].result(T)
    p1.close()
    wait_until(lambda: not hub.connected)
    assert not futs["b"].done() and not futs["c"].done()
    removed = hub.remove("c")  # while nobody is connected: the next snapshot omits it
    p2 = connect(hub, proxies)
    again = p2.recv_n(4)
    assert kinds(again) == ["hello_reply", "add", "add", "snapshot_complete"]
    assert [m.add.workload.uid for m in again[1:3]] == ["a", "b"]
    assert again[3].snapshot_complete.count == 2
    assert not removed.done()
    p2.ack_all(again)
    futs["b"].result(T)
    removed.result(T)
    with pytest.raises(Superseded):
        futs["c"].result(T)
    assert hub.wait_snapshot_acked(T)
    assert hub.status()["sessions"] == 2


def test_reconnect_after_full_ack_gets_snapshot_again(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    hub.upsert(wl("a"))
    p1 = connect(hub, proxies)
    p1.ack_all(p1.recv_n(3))
    assert hub.wait_snapshot_acked(T)
    p1.close()
    wait_until(lambda: not hub.connected)
    assert not hub.snapshot_acked
    p2 = connect(hub, proxies)
    assert kinds(p2.recv_n(3)) == ["hello_reply", "add", "snapshot_complete"]


def test_many_threads_upsert_concurrently(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    p = connect(hub, proxies)
    p.ack_all(p.recv_n(2))
    results: list[Any] = []

    def work(i: int) -> None:
        results.extend(hub.upsert(wl(f"t{i}-{j}")) for j in range(10))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    msgs = p.recv_n(40)
    assert len({m.seq for m in msgs}) == 40
    p.ack_all(msgs)
    for f in results:
        f.result(T)


def test_stop_fails_pending_futures(sockdir: str) -> None:
    h = ProxyHub(os.path.join(sockdir, "proxy.sock"), "a")
    h.start()
    fut = h.upsert(wl("z"))
    h.stop(grace=0.1)
    with pytest.raises(HubStopped):
        fut.result(T)
    with pytest.raises(HubStopped):
        h.upsert(wl("y"))


def test_netns_fd_side_channel(hub: ProxyHub) -> None:
    own = "/proc/self/ns/net"
    ino = os.stat(own).st_ino
    hub.upsert(WorkloadInfo(uid="n1", name="n1", namespace="ns", netns_path=own, netns_inode=ino))
    hub.upsert(WorkloadInfo(uid="n2", name="n2", namespace="ns", netns_path=own, netns_inode=ino + 1))
    fd, inode = fetch_netns_fd(hub.netns_fd_socket, "n1")
    try:
        assert inode == ino and os.fstat(fd).st_ino == ino
    finally:
        os.close(fd)
    with pytest.raises(NetnsFdError, match="unknown workload"):
        fetch_netns_fd(hub.netns_fd_socket, "nope")
    with pytest.raises(NetnsFdError, match="expected"):
        fetch_netns_fd(hub.netns_fd_socket, "n2")


def test_first_message_must_be_hello(hub: ProxyHub) -> None:
    channel = grpc.insecure_channel(f"unix:{hub.socket_path}")
    try:
        call = pb_grpc.NodeProxyStub(channel).Session(iter([pb.ProxyMessage(ack=pb.Ack(seq=1))]))
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Hello" in (info.value.details() or "")
    finally:
        channel.close()
    assert not hub.connected


def test_remove_of_unknown_uid_is_acked(hub: ProxyHub, proxies: list[FakeProxy]) -> None:
    p = connect(hub, proxies)
    p.ack_all(p.recv_n(2))
    fut = hub.remove("never-seen")
    m = p.recv()
    assert m.delete.uid == "never-seen"
    p.ack(m.seq)
    fut.result(T)
    assert hub.status()["pending"] == 0


def test_silent_client_times_out(sockdir: str) -> None:
    h = ProxyHub(os.path.join(sockdir, "proxy.sock"), "a", hello_timeout=0.3)
    h.start()
    channel = grpc.insecure_channel(f"unix:{h.socket_path}")
    try:
        never: queue.Queue[Any] = queue.Queue()
        call = pb_grpc.NodeProxyStub(channel).Session(iter(never.get, None))
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        never.put(None)
    finally:
        channel.close()
        h.stop(grace=0.1)


def test_side_channel_path_is_next_to_the_grpc_socket() -> None:
    assert side_channel_path("/var/run/headrace/proxy.sock") == "/var/run/headrace/proxy-netns.sock"
    assert side_channel_path("/x/agent") == "/x/agent-netns.sock"


def test_snapshot_waits_for_the_adoption_gate(sockdir: str, proxies: list[FakeProxy]) -> None:
    """A proxy that connects while the restarted agent is still adopting gets its HelloReply, then nothing
    (no empty snapshot it would act on) until the gate opens; the snapshot then holds every adopted pod and
    what came in meanwhile, and the upserts' futures resolve on its acks."""
    from node_agent.reconcile.gate import AdoptionGate

    gate = AdoptionGate()
    h = ProxyHub(os.path.join(sockdir, "proxy.sock"), "agent-test", snapshot_gate=gate)
    h.start()
    try:
        p = connect(h, proxies)
        assert kinds([p.recv()]) == ["hello_reply"]
        wait_until(lambda: h.connected)
        first = h.upsert(wl("a"))
        second = h.upsert(wl("b"))
        gone = h.remove("old")
        time.sleep(0.3)
        assert p.received.empty(), "nothing before adoption is complete"
        assert h.status()["snapshot_held"] is True
        gate.open()
        msgs = p.recv_n(3)
        assert kinds(msgs) == ["add", "add", "snapshot_complete"]
        assert {m.add.workload.uid for m in msgs[:2]} == {"a", "b"} and all(m.add.snapshot for m in msgs[:2])
        assert msgs[2].snapshot_complete.count == 2
        p.ack_all(msgs)
        first.result(T)
        second.result(T)
        gone.result(T)
        assert h.snapshot_acked and h.status()["snapshot_held"] is False
        later = h.upsert(wl("c"))  # incremental again once the snapshot went out
        m = p.recv()
        assert kinds([m]) == ["add"] and not m.add.snapshot
        p.ack(m.seq)
        later.result(T)
    finally:
        h.stop(grace=0.2)


def test_a_proxy_that_stops_acking_is_disconnected_and_resynced(sockdir: str, proxies: list[FakeProxy]) -> None:
    h = ProxyHub(os.path.join(sockdir, "proxy.sock"), "a", ack_timeout=0.5)
    h.start()
    try:
        fut = h.upsert(wl("a"))
        p1 = connect(h, proxies)
        assert kinds(p1.recv_n(3)) == ["hello_reply", "add", "snapshot_complete"]
        # p1 never acks: the hub ends its session instead of leaving the add pending for good
        p1.wait_end()
        wait_until(lambda: not h.connected)
        assert h.status()["ack_timeouts"] == 1
        assert not fut.done()
        p2 = connect(h, proxies)
        again = p2.recv_n(3)
        assert kinds(again) == ["hello_reply", "add", "snapshot_complete"]
        p2.ack_all(again)
        fut.result(T)
        assert h.wait_snapshot_acked(T)
    finally:
        h.stop(grace=0.1)
