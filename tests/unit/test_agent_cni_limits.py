"""The plugin-event socket under hostile clients: one deadline per request, connections bounded per peer,
slow readers evicted for fresh connections (an ADD is never starved), handling slots apart from reading
ones; and an ADD's netns checked before the handler sees it (own netns, host netns, not nsfs)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.serve import cni_server
from node_agent.serve.cni_admission import Admission, Refusal, Ticket, peer_key
from node_agent.serve.cni_server import CniServer

from cni.plugin.agent_client import AgentUnavailable, PluginEvent, send_event
from tests.unit.test_agent_cni_server import UID, Handler
from tests.unit.test_cni_plugin_process import pod_netns

__all__ = ["pod_netns"]  # a fixture


def make_server(tmp_path: Path, admission: Admission | None = None,
                check: Callable[[str], None] | None = None) -> tuple[CniServer, Handler, str]:
    handler = Handler()
    path = str(tmp_path / "cni.sock")
    kwargs: dict[str, Any] = {"add_timeout": 3.0, "admission": admission}
    if check is not None:
        kwargs["check_netns"] = check
    srv = CniServer(path, handler, **kwargs)
    srv.start()
    return srv, handler, path


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., tuple[CniServer, Handler, str]]]:
    made: list[CniServer] = []

    def factory(**kw: Any) -> tuple[CniServer, Handler, str]:
        directory = tmp_path / f"server{len(made)}"
        directory.mkdir()
        srv = make_server(directory, **kw)
        made.append(srv[0])
        return srv

    yield factory
    for srv in made:
        srv.stop()


def add_event(netns: str = "/var/run/netns/pod") -> PluginEvent:
    return PluginEvent("ADD", "cid", netns, "eth0", "app", "web", UID, ("10.1.0.4/24",), "ambient")


def stalled(path: str, first: bytes = b'{"v": 1,') -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.sendall(first)
    return s


def answer(s: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return json.loads(buf) if buf.strip() else {}


# ---- admission bookkeeping (pure) -----------------------------------------------------------------


def test_admission_evicts_the_oldest_reader_and_bounds_peers() -> None:
    adm = Admission(max_reading=2, max_handling=1, per_peer=2)
    a, ev = adm.admit(peer_key(10, 0), 1.0)
    b, _ = adm.admit(peer_key(11, 0), 2.0)
    assert isinstance(a, Ticket) and isinstance(b, Ticket) and ev == []
    c, ev = adm.admit(peer_key(12, 0), 3.0)
    assert ev == [a] and a.evicted and isinstance(c, Ticket)
    assert adm.start_handling(a) is not None  # an evicted ticket is never handled
    assert adm.start_handling(b) is None
    busy = adm.start_handling(c)
    assert isinstance(busy, Refusal) and busy.reason == "agent busy"
    d, _ = adm.admit(peer_key(13, 0), 4.0)
    e, _ = adm.admit(peer_key(13, 0), 4.0)
    f, _ = adm.admit(peer_key(13, 0), 4.0)
    assert isinstance(f, Refusal) and "pid 13" in f.reason
    for t in (a, b, c, d, e):
        assert isinstance(t, Ticket)
        adm.close(t)
        adm.close(t)  # idempotent
    assert adm.counts()["reading"] == 0 and adm.counts()["handling"] == 0 and adm.counts()["peers"] == 0
    assert peer_key(0, 7) == ("uid", 7)
    unmapped = [adm.admit(peer_key(0, 0), 5.0)[0] for _ in range(4)]  # pid unknown: not bounded per peer
    assert all(isinstance(t, Ticket) for t in unmapped)


# ---- the server -----------------------------------------------------------------------------------


def test_one_deadline_per_request_not_per_read(servers, monkeypatch) -> None:
    monkeypatch.setattr(cni_server, "READ_TIMEOUT", 0.6)
    _, handler, path = servers(check=lambda p: None)
    s = stalled(path, b"{")
    got: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: got.append(answer(s)))
    started = time.monotonic()
    reader.start()
    while reader.is_alive() and time.monotonic() - started < 5:
        try:
            s.send(b" ")  # one byte every 0.1 s: each read is quick, the request never completes
        except OSError:
            break
        time.sleep(0.1)
    reader.join(5)
    s.close()
    elapsed = time.monotonic() - started
    assert got and got[0]["ok"] is False and "not received in time" in got[0]["error"]
    assert elapsed < 3.0, elapsed  # a per-read limit would never fire: a byte comes every 0.1 s
    assert handler.calls == []


def test_connections_are_bounded_per_peer(servers) -> None:
    _, _, path = servers(admission=Admission(per_peer=3), check=lambda p: None)
    held = [stalled(path) for _ in range(3)]
    try:
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(5)
        extra.connect(path)
        reply = answer(extra)
        extra.close()
        assert reply["ok"] is False and reply["retry"] is True and f"pid {os.getpid()}" in reply["error"]
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 15  # generous: a loaded machine delays the server's threads
    ok = False
    while not ok and time.monotonic() < deadline:  # their slots are given back once closed
        try:
            ok = send_event(path, add_event(), timeout=5).ok
        except AgentUnavailable:  # refused and closed before the request was written: not yet
            pass
        time.sleep(0.05)
    assert ok


def test_a_fresh_request_evicts_the_slowest_reader(servers) -> None:
    _, handler, path = servers(admission=Admission(max_reading=4, per_peer=100), check=lambda p: None)
    held = [stalled(path) for _ in range(4)]
    try:
        time.sleep(0.1)
        reply = send_event(path, add_event(), timeout=5)
        assert reply.ok and reply.state == "enrolled"
        evicted = answer(held[0])
        assert evicted["ok"] is False and evicted["error"].startswith("evicted")
    finally:
        for s in held:
            s.close()
    assert [c[0] for c in handler.calls] == ["ADD"]


def test_seventy_slow_clients_never_starve_an_add(servers) -> None:
    """70 clients that send one byte a second and reconnect at once when dropped, against the real
    limits (64 reading slots); ADDs keep getting through at once (a few ms; 3 s allowed on a busy machine)."""
    srv, handler, path = servers(admission=Admission(per_peer=1000), check=lambda p: None)
    stop = threading.Event()

    def slow_client() -> None:
        while not stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                    while not stop.is_set():
                        s.send(b" ")
                        stop.wait(1.0)
            except OSError:
                continue

    threads = [threading.Thread(target=slow_client, daemon=True) for _ in range(70)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 15
        while srv.admission.counts()["reading"] < 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.admission.counts()["reading"] == 64  # every reading slot is held
        for _ in range(10):
            started = time.monotonic()
            reply = send_event(path, add_event(), timeout=5)
            assert reply.ok, reply.error
            assert time.monotonic() - started < 3.0  # well within the plugin's deadline, on a loaded machine
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(3)
    assert len(handler.calls) == 10
    assert srv.admission.evictions >= 10


def test_handling_slots_are_apart_from_reading_ones(servers) -> None:
    _, handler, path = servers(admission=Admission(max_handling=1, per_peer=100), check=lambda p: None)
    handler.add_delay = 1.0
    first: list[Any] = []
    t = threading.Thread(target=lambda: first.append(send_event(path, add_event(), timeout=5)))
    t.start()
    time.sleep(0.3)
    busy = send_event(path, add_event(), timeout=5)
    assert not busy.ok and busy.retry and busy.error == "agent busy"
    t.join(5)
    assert first[0].ok


# ---- an ADD's netns -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["own", "own-symlink", "host", "regular", "directory", "fifo", "uts", "missing"])
def test_add_with_a_netns_that_is_no_pod_netns_is_refused(servers, tmp_path: Path, kind: str) -> None:
    _, handler, path = servers()
    target = {
        "own": "/proc/self/ns/net",
        "host": "/proc/1/ns/net",
        "regular": str(tmp_path / "file"),
        "directory": str(tmp_path),
        "fifo": str(tmp_path / "fifo"),
        "uts": "/proc/self/ns/uts",
        "missing": str(tmp_path / "nope"),
        "own-symlink": str(tmp_path / "link"),
    }[kind]
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(f"/proc/{os.getpid()}/ns/net", tmp_path / "link")
    started = time.monotonic()
    reply = send_event(path, add_event(target), timeout=5)
    assert time.monotonic() - started < 2.0
    assert not reply.ok and not reply.retry and reply.error.startswith("netns refused: "), reply.error
    assert handler.calls == []


def test_add_with_a_pod_netns_reaches_the_handler(servers, pod_netns: str) -> None:
    _, handler, path = servers()
    assert send_event(path, add_event(pod_netns), timeout=5).ok
    assert handler.calls[0][4] == pod_netns
