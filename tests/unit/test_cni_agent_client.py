"""The plugin-event client (cni.plugin.agent_client) against a real unix-socket server in a thread.

``FakeAgent`` is also used by the plugin tests (test_cni_plugin_process.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cni.plugin.agent_client import AgentUnavailable, PluginEvent, send_event

Reply = Callable[[dict[str, Any]], "bytes | list[bytes | float | None] | None"]
# what serve/cni_request.py of an agent that speaks only version 1 answers a version 2 request
OLD_AGENT_REFUSAL = b'{"ok":false,"error":"unsupported protocol version \'2\' (agent speaks 1)","retry":false}\n'


class FakeAgent:
    """A unix-socket server speaking the plugin-event protocol; ``reply`` decides each answer
    (None = hang up without answering; it may also sleep to simulate a slow agent). Version 2 requests
    (the one-request ADD) go to ``v2``, version 3 (the launcher's relayed ADD) to ``v3``, both by default
    refused as an agent that speaks only version 1 does."""

    def __init__(self, path: Path, reply: Reply | None = None, v2: Reply | None = None,
                 v3: Reply | None = None) -> None:
        self.path = path
        self.reply: Reply = reply or (lambda req: b'{"ok": true, "state": "enrolled"}\n')
        self.v2: Reply = v2 or (lambda req: OLD_AGENT_REFUSAL)
        self.v3: Reply = v3 or (lambda req: OLD_AGENT_REFUSAL)
        self.requests: list[dict[str, Any]] = []
        self.lines: list[bytes] = []  # each request line as it came, its newline included
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while b"\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            self.lines.append(buf.split(b"\n")[0] + b"\n")
            req = json.loads(buf.split(b"\n")[0])
            self.requests.append(req)
            answer = {2: self.v2, 3: self.v3}.get(req.get("v"), self.reply)(req)
            # a list: parts sent one after the other, a float between them is a pause (seconds)
            for part in answer if isinstance(answer, list) else [answer]:
                if isinstance(part, float):
                    time.sleep(part)
                    continue
                if part is None:
                    return
                try:
                    conn.sendall(part)
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(2)
        self.path.unlink(missing_ok=True)


EVENT = PluginEvent("ADD", "c1", "/run/netns/p", "eth0", "shop", "web", "uid-1", ("10.0.0.5",), "ambient")


def test_roundtrip(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "a.sock")
    try:
        reply = send_event(str(agent.path), EVENT, timeout=2)
        assert reply.ok and reply.state == "enrolled"
        assert agent.requests == [
            {
                "v": 1,
                "cmd": "ADD",
                "container_id": "c1",
                "netns": "/run/netns/p",
                "ifname": "eth0",
                "pod": {"namespace": "shop", "name": "web", "uid": "uid-1"},
                "ips": ["10.0.0.5"],
                "mode": "ambient",
            }
        ]
    finally:
        agent.close()


def test_error_reply(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "a.sock", lambda r: b'{"ok": false, "error": "no proxy", "retry": true}\n')
    try:
        reply = send_event(str(agent.path), EVENT, timeout=2)
        assert (reply.ok, reply.error, reply.retry) == (False, "no proxy", True)
    finally:
        agent.close()


def test_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable, match="does not exist"):
        send_event(str(tmp_path / "none.sock"), EVENT, timeout=1)


def test_refused(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    with pytest.raises(AgentUnavailable, match="refused"):
        send_event(str(path), EVENT, timeout=1)


def test_slow_agent_times_out_within_bound(tmp_path: Path) -> None:
    def slow(req: dict[str, Any]) -> bytes:
        time.sleep(2)
        return b'{"ok": true}\n'

    agent = FakeAgent(tmp_path / "a.sock", slow)
    try:
        start = time.monotonic()
        with pytest.raises(AgentUnavailable, match=r"did not answer within 0\.5s"):
            send_event(str(agent.path), EVENT, timeout=0.5)
        assert time.monotonic() - start < 1.5
    finally:
        agent.close()


@pytest.mark.parametrize("answer", [None, b"garbage\n", b'{"state": "x"}\n'])
def test_bad_answers(tmp_path: Path, answer: bytes | None) -> None:
    agent = FakeAgent(tmp_path / "a.sock", lambda r: answer)
    try:
        with pytest.raises(AgentUnavailable):
            send_event(str(agent.path), EVENT, timeout=1)
    finally:
        agent.close()
