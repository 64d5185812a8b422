"""The plugin-event protocol's framing and messages (cni.contract.events)."""

from __future__ import annotations

import socket
import time

import pytest

from cni.contract import events


def test_encode_is_one_compact_line() -> None:
    line = events.encode_line(events.status_request())
    assert line == b'{"v":1,"cmd":"STATUS"}\n'
    assert events.decode_line(line.rstrip(b"\n")) == {"v": events.PROTOCOL_VERSION, "cmd": "STATUS"}


def test_event_request_fields() -> None:
    req = events.event_request("DEL", "c1", "/run/netns/p", "eth0", "shop", "web", "u1", ("10.0.0.5",), "sidecar")
    assert req == {
        "v": 1, "cmd": "DEL", "container_id": "c1", "netns": "/run/netns/p", "ifname": "eth0",
        "pod": {"namespace": "shop", "name": "web", "uid": "u1"}, "ips": ["10.0.0.5"], "mode": "sidecar",
    }  # fmt: skip


def test_replies() -> None:
    assert events.success_reply("enrolled") == {"ok": True, "state": "enrolled"}
    assert events.failure_reply("busy", retry=True) == {"ok": False, "error": "busy", "retry": True}
    assert events.failure_reply("x", retry=False, state="failed")["state"] == "failed"


@pytest.mark.parametrize("data", [b"garbage", b"\xff\xfe", b""])
def test_decode_errors_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError):
        events.decode_line(data)


def test_read_line_returns_the_first_line_only() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b'{"ok":true}\nrest')
        assert events.read_line(a, time.monotonic() + 1) == b'{"ok":true}'


def test_read_line_peer_closed() -> None:
    a, b = socket.socketpair()
    with a:
        b.sendall(b"partial")
        b.close()
        assert events.read_line(a, time.monotonic() + 1) == b"partial"


def test_read_line_limit_and_deadline() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x" * 200)
        with pytest.raises(events.LineTooLong):
            events.read_line(a, time.monotonic() + 1, limit=100)
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"no newline yet")
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            events.read_line(a, start + 0.2)
        assert time.monotonic() - start < 1.0
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"y" * 100 + b"\n")
        assert events.read_line(a, time.monotonic() + 1, limit=100) == b"y" * 100


def test_plugin_client_imports_stay_lean() -> None:
    """The plugin imports the client (and this module) for every mesh pod: no json, typing or re."""
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys\nsys.path.insert(0, {repo!r})\nbefore = set(sys.modules)\nimport cni.plugin.agent_client\n"
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} & {'json', 'typing', 're'}))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
