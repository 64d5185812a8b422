"""Reference proxy pieces that need no root: address parsing, logs, and its agent session vs a real hub."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator

import grpc
import pytest
from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.hub import ProxyHub, ProxyNack
from node_agent.refproxy.agent_session import AgentSession
from node_agent.refproxy.logs import JsonFormatter
from node_agent.refproxy.sockets import format_addr, parse_sockaddr_in, parse_sockaddr_in6
from node_agent.refproxy.workloads import WorkloadError, WorkloadTable

T = 5.0


def test_parse_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("10.200.3.4") + bytes(8)
    assert parse_sockaddr_in(raw) == ("10.200.3.4", 8080)
    with pytest.raises(ValueError, match="family"):
        parse_sockaddr_in(struct.pack("=H", socket.AF_INET6) + bytes(14))
    with pytest.raises(ValueError, match="short"):
        parse_sockaddr_in(b"\x02\x00")


def test_parse_sockaddr_in6() -> None:
    addr = socket.inet_pton(socket.AF_INET6, "fd00:4852::2")
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + bytes(4) + addr + bytes(4)
    assert parse_sockaddr_in6(raw) == ("fd00:4852::2", 443)
    with pytest.raises(ValueError, match="family"):
        parse_sockaddr_in6(struct.pack("=H", socket.AF_INET) + bytes(26))


def test_format_addr() -> None:
    assert format_addr("10.0.0.1", 80) == "10.0.0.1:80"
    assert format_addr("fd00::1", 80) == "[fd00::1]:80"


def test_json_formatter() -> None:
    fmt = JsonFormatter()

    def rec(msg: str, **extra: object) -> logging.LogRecord:
        r = logging.LogRecord("x", logging.INFO, __file__, 1, msg, None, None)
        for k, v in extra.items():
            setattr(r, k, v)
        return r

    out = json.loads(fmt.format(rec("workload_added", fields={"uid": "u1"})))
    assert out["event"] == "workload_added" and out["uid"] == "u1" and out["level"] == "info"
    assert json.loads(fmt.format(rec('{"event": "e", "n": 1}')))["n"] == 1
    assert json.loads(fmt.format(rec("plain text")))["msg"] == "plain text"


class FakeTable(WorkloadTable):
    """The session logic of the real table (snapshot bookkeeping) without netns or listeners."""

    def __init__(self) -> None:
        super().__init__(emit=lambda r: None)
        self.fake: dict[str, WorkloadInfo] = {}
        self.log: list[str] = []

    def uids(self) -> list[str]:
        return list(self.fake)

    async def add(self, info: WorkloadInfo) -> None:
        self.mark_seen(info.uid)
        self.log.append(f"add {info.uid}")
        if info.name == "bad":
            raise WorkloadError(f"netns {info.netns_path} is gone: No such file or directory")
        self.fake[info.uid] = info

    def delete(self, uid: str, grace: float = 1.0) -> bool:
        self.log.append(f"delete {uid}")
        return self.fake.pop(uid, None) is not None


def wl(uid: str, name: str = "pod") -> WorkloadInfo:
    return WorkloadInfo(uid=uid, name=name, namespace="ns", netns_path=f"/nonexistent/{uid}", netns_inode=7)


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="hr-rps-", dir="/tmp")
    yield os.path.join(d, "proxy.sock")
    shutil.rmtree(d, ignore_errors=True)


async def until(pred: object, timeout: float = T) -> None:
    assert callable(pred)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.02)


def test_session_acks_snapshot_errors_and_increments(sock_path: str) -> None:
    hub = ProxyHub(sock_path, "agent-u")
    hub.start()
    try:
        good, bad = hub.upsert(wl("g")), hub.upsert(wl("b", name="bad"))
        table = FakeTable()
        session = AgentSession(sock_path, "unit-proxy", table)

        async def scenario() -> None:
            task = asyncio.create_task(session.run_forever())
            try:
                await until(lambda: session.snapshot_done.is_set())
                await until(lambda: good.done() and bad.done())
                later = hub.upsert(wl("n"))
                gone = hub.remove("g")
                await until(lambda: later.done() and gone.done())
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        asyncio.run(scenario())
        good.result(0)
        with pytest.raises(ProxyNack, match="is gone"):
            bad.result(0)
        assert table.log == ["add g", "add b", "add n", "delete g"]
        assert set(table.fake) == {"n"}
        assert session.netns_fd_socket == hub.netns_fd_socket
        assert hub.status()["nacks"] == 1
    finally:
        hub.stop(grace=0.1)


def test_session_reconnects_and_snapshot_drops_stale(sock_path: str) -> None:
    hub1 = ProxyHub(sock_path, "agent-1")
    hub1.start()
    hub1.upsert(wl("old"))
    table = FakeTable()
    session = AgentSession(sock_path, "unit-proxy", table)
    hubs = [hub1]

    async def scenario() -> None:
        task = asyncio.create_task(session.run_forever())
        try:
            await until(lambda: session.snapshot_done.is_set() and "old" in table.fake)
            await asyncio.to_thread(hub1.stop, 0.1)  # the agent goes away ...
            hub2 = ProxyHub(sock_path, "agent-2")
            hub2.upsert(wl("new"))
            hub2.start()  # ... and comes back with a different desired set
            hubs.append(hub2)
            await until(lambda: session.sessions == 2 and session.snapshot_done.is_set())
            await until(lambda: hub2.snapshot_acked)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        for h in hubs:
            h.stop(grace=0.1)
    assert set(table.fake) == {"new"}  # "old" was not in the new snapshot
    assert "delete old" in table.log


def test_session_version_mismatch_is_refused(sock_path: str) -> None:
    hub = ProxyHub(sock_path, "agent-v")
    hub.start()
    try:
        session = AgentSession(sock_path, "old-proxy", FakeTable(), protocol_version=7)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            asyncio.run(session.run_once())
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 7" in (info.value.details() or "")
    finally:
        hub.stop(grace=0.1)


def test_connection_handler_task_survives_garbage_collection() -> None:
    """start_server (Python 3.11) holds no strong reference to a connection's handler task and a stream's
    protocol holds its reader weakly: WorkloadProxy keeps the task, so a GC pass mid-connection cannot
    destroy it (which closed both sockets of a relay: seen as an empty reply under test load)."""
    import asyncio
    import gc
    import weakref

    from node_agent.refproxy.workloads import WorkloadProxy

    info = WorkloadInfo(uid="u", name="n", namespace="ns", ips=(), netns_path="", netns_inode=0, node="")
    wp = WorkloadProxy(info, emit=lambda record: None)

    async def main() -> bool:
        release = asyncio.Event()
        started = asyncio.Event()

        async def serve(direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            started.set()
            await release.wait()
            writer.close()
            wp.active -= 1

        wp._serve = serve  # type: ignore[method-assign]
        server = await asyncio.start_server(lambda r, w: wp._on_connection("outbound", r, w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await started.wait()
        (task,) = list(wp._tasks)
        ref = weakref.ref(task)
        del task
        gc.collect()
        alive = ref() is not None and not ref().done()  # type: ignore[union-attr]
        release.set()
        await asyncio.sleep(0.05)
        writer.close()
        server.close()
        await server.wait_closed()
        return alive and not wp._tasks

    assert asyncio.run(main())


def test_an_apply_that_hangs_is_acked_with_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from node_agent.refproxy import apply_deadline

    monkeypatch.setattr(apply_deadline, "APPLY_TIMEOUT", 0.05)

    async def hang() -> str:
        await asyncio.sleep(5)
        return ""

    async def quick() -> str:
        return "listen failed"

    assert asyncio.run(apply_deadline.bounded_apply(hang(), "add")) == "add not applied within 0.05s"
    assert asyncio.run(apply_deadline.bounded_apply(quick(), "add")) == "listen failed"


def test_a_connection_whose_original_destination_is_the_listener_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Told its own listener as the original destination (conntrack gave an eBPF-redirected connection
    another source port, so the lookup by the client's port missed), the proxy closes the connection instead
    of dialling itself, which would repeat with every connection it accepts from itself."""
    import asyncio

    from node_agent.refproxy import forward

    monkeypatch.setattr(forward, "original_dst", lambda sock: sock.getsockname()[:2])
    dialled: list[object] = []
    emitted: list[dict[str, object]] = []

    async def make_upstream(family: socket.AddressFamily, source: str | None) -> socket.socket:
        dialled.append(family)
        raise OSError("must not dial")

    async def main() -> bytes:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await forward.relay(reader, writer, direction="outbound", workload="ns/n", make_upstream=make_upstream,
                                emit=emitted.append)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        try:
            reply = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:  # closed with the request unread
            reply = b""
        writer.close()
        server.close()
        await server.wait_closed()
        return reply

    assert asyncio.run(main()) == b""
    assert dialled == [] and emitted == []
