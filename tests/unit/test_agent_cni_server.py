"""The plugin-event socket: protocol, validation, mode 0600, bounded waits; plus `headrace status`."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from node_agent.commands.status import status
from node_agent.reconcile.state import Outcome
from node_agent.serve.cni_server import CniServer

from cni.plugin.agent_client import PluginEvent, send_event

UID = "bbbbbbbb-0000-0000-0000-000000000001"


class Handler:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.add_outcome = Outcome(True, "enrolled")
        self.add_delay = 0.0

    def cni_add(self, uid, namespace, name, netns, ips, timeout):
        self.calls.append(("ADD", uid, namespace, name, netns, ips, timeout))
        if self.add_delay:
            threading.Event().wait(self.add_delay)
        return self.add_outcome

    def cni_sidecar_add(self, uid, namespace, name, netns, ips, timeout, pod=None):
        self.calls.append(("SIDECAR", uid))
        return Outcome(True, "enrolled")

    def cni_del(self, uid, plugin_removes=None):
        self.calls.append(("DEL", uid, plugin_removes))
        return Outcome(True, "removed")

    def cni_check(self, uid):
        self.calls.append(("CHECK", uid))
        return Outcome(False, "failed", "chain missing")

    def status(self):
        return [
            {
                "namespace": "app",
                "name": "web",
                "uid": UID,
                "mode": "ambient",
                "backend": "iptables",
                "state": "failed",
                "reason": "netns not found",
                "netns": "",
            },
            {
                "namespace": "app",
                "name": "db",
                "uid": "u2",
                "mode": "none",
                "backend": "",
                "state": "none",
                "reason": "not labelled",
                "netns": "",
            },
        ]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[CniServer, Handler, str]]:
    handler = Handler()
    path = str(tmp_path / "cni.sock")
    srv = CniServer(
        path,
        handler,
        add_timeout=3.0,
        resolve_uid=lambda ns, name: UID if (ns, name) == ("app", "web") else None,
        extra_status=lambda: {"backend": "iptables", "proxy": {"connected": True, "proxy_id": "p1"}},
        check_netns=lambda path: None,  # the real check (a pod netns) is tested in test_agent_cni_limits.py
    )
    srv.start()
    yield srv, handler, path
    srv.stop()


def event(cmd: str, uid: str = UID, mode: str = "ambient") -> PluginEvent:
    return PluginEvent(cmd, "cid", "/proc/1/ns/net", "eth0", "app", "web", uid, ("10.1.0.4/24",), mode)


def raw(path: str, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


def test_socket_mode_0600(server) -> None:
    _, _, path = server
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_add_del_check_through_the_plugin_client(server) -> None:
    _, handler, path = server
    reply = send_event(path, event("ADD"), timeout=5)
    assert reply.ok and reply.state == "enrolled"
    assert handler.calls[0] == ("ADD", UID, "app", "web", "/proc/1/ns/net", ("10.1.0.4",), 3.0)
    assert send_event(path, event("DEL"), timeout=5).state == "removed"
    check = send_event(path, event("CHECK"), timeout=5)
    assert not check.ok and check.error == "chain missing"


def test_add_without_uid_resolved_from_pod_source(server) -> None:
    _, handler, path = server
    assert send_event(path, event("ADD", uid=""), timeout=5).ok
    assert handler.calls[0][1] == UID


def test_sidecar_add_goes_to_the_sidecar_path(server) -> None:
    _, handler, path = server
    reply = send_event(path, event("ADD", mode="sidecar"), timeout=5)
    assert reply.ok and handler.calls == [("SIDECAR", UID)]


def test_failed_add_carries_error_and_retry(server) -> None:
    _, handler, path = server
    handler.add_outcome = Outcome(False, "pending", "timed out after 3s: waiting for proxy ack", retry=True)
    reply = send_event(path, event("ADD"), timeout=5)
    assert not reply.ok and reply.retry and "proxy ack" in reply.error


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json\n", "not JSON"),
        (b'{"v": 2, "cmd": "ADD"}\n', "protocol version"),
        (b'{"v": 1, "cmd": "RM"}\n', "unknown cmd"),
        (
            b'{"v": 1, "cmd": "ADD", "pod": {"uid": "../../etc", "namespace": "a", "name": "b"}, "netns": "/x"}\n',
            "invalid pod uid",
        ),
        (b'{"v": 1, "cmd": "ADD", "pod": {"uid": "u", "namespace": "a", "name": "b"}, "netns": "rel"}\n', "absolute"),
        (
            b'{"v": 1, "cmd": "ADD", "pod": {"uid": "u", "namespace": "a", "name": "b"}, "netns": "/x",'
            b' "ips": ["nope"]}\n',
            "invalid ip",
        ),
    ],
)
def test_malformed_requests_refused(server, payload: bytes, message: str) -> None:
    _, handler, path = server
    reply = raw(path, payload)
    assert reply["ok"] is False and message in reply["error"] and reply["retry"] is False
    assert handler.calls == []


def test_slow_client_is_bounded(server, monkeypatch) -> None:
    import node_agent.serve.cni_server as mod

    monkeypatch.setattr(mod, "READ_TIMEOUT", 0.2)
    _, _, path = server
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b'{"v": 1,')  # never finishes the line
        reply = json.loads(s.recv(4096))
    assert reply["ok"] is False and "in time" in reply["error"]


def test_status_command_table_and_json(server) -> None:
    _, _, path = server
    runner = CliRunner()
    out = runner.invoke(status, ["--cni-socket", path])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "UID", "MODE", "BACKEND", "STATE", "NETNS"]
    assert "failed (netns not found)" in lines[1]
    assert "proxy: connected (p1)" in out.output
    out = runner.invoke(status, ["--json", "--cni-socket", path])
    data = json.loads(out.output)
    assert data["pods"][0]["uid"] == UID and data["pods"][0]["state"] == "failed"
    assert data["backend"] == "iptables"


def test_status_without_agent_is_a_clear_error(tmp_path: Path) -> None:
    out = CliRunner().invoke(status, ["--cni-socket", str(tmp_path / "none.sock")])
    assert out.exit_code != 0 and "is the agent running" in out.output


def test_a_del_says_what_its_plugin_removes_itself(server) -> None:
    _, handler, path = server
    sidecar_del = PluginEvent("DEL", "cid", "/proc/1/ns/net", "eth0", "app", "web", UID, (), "sidecar",
                              removes=("iptables", "nft"))
    assert send_event(path, sidecar_del, timeout=5).state == "removed"
    assert send_event(path, event("DEL"), timeout=5).state == "removed"
    assert [c for c in handler.calls if c[0] == "DEL"] == [("DEL", UID, ("iptables", "nft")), ("DEL", UID, None)]


@pytest.mark.parametrize("removes", [
    {"backend": "ebpf", "iptables": "auto"},
    {"backend": "iptables", "iptables": "$(reboot)"},
    {"backend": "nftables", "iptables": 3},
    ["iptables", "nft"],
    "iptables",
])
def test_a_bad_removes_field_is_refused(server, removes: Any) -> None:
    _, handler, path = server
    line = PluginEvent("DEL", "cid", "/proc/1/ns/net", "eth0", "app", "web", UID, (), "sidecar").to_json()
    line["removes"] = removes
    reply = raw(path, (json.dumps(line) + "\n").encode())
    assert reply["ok"] is False and "removes" in reply["error"] and not handler.calls
