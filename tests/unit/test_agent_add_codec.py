"""The one-request ADD's wire format (cni.contract.agent_add): the exact bytes of the request and of each
reply kind (golden file tests/golden/agent_add/wire.golden), the plugin's reading of replies (every kind,
an old agent's refusal, malformed ones), and the agent's validation of requests (serve/add_request.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from node_agent.serve.add_request import is_v2, parse_add_request
from node_agent.serve.cni_request import RequestError, parse_request

from cni.contract import agent_add, events
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "agent_add" / "wire.golden"
UID = "0f6c2b1e-8a3d-4b8e-9a55-2f1c7d9e4b10"


def _request(**change: Any) -> dict[str, Any]:
    req = agent_add.add_request("c0ffee", "/var/run/netns/cni-1", "eth0", "shop", "web", UID,
                                ["10.7.0.5/24", "fd00:7::5/64"], "nftables", "auto", ["kube-system"])
    for key, value in change.items():
        if value is None:
            req.pop(key, None)
        else:
            req[key] = value
    return req


def test_wire_format_golden() -> None:
    lines = [
        ("request", _request()),
        ("reply none", agent_add.none_reply("not in the mesh (agent's pod cache)")),
        ("reply sidecar applied", agent_add.done_reply("sidecar", "enrolled", "nftables")),
        ("reply interim (ambient)", agent_add.interim_reply("ambient")),
        ("reply ambient enrolled", agent_add.done_reply("ambient", "enrolled")),
        ("reply standalone", agent_add.standalone_reply("pod not in the agent's pod source")),
        ("reply failed (bad annotation)", agent_add.failed_reply("sidecar", "bad port", retry=False, code=101)),
        ("reply failed (ambient)", agent_add.failed_reply("ambient", "timed out", retry=True, state="pending")),
    ]
    text = "".join(f"# {what}\n{events.encode_line(obj).decode()}" for what, obj in lines)
    assert_golden(GOLDEN, text)


@pytest.mark.parametrize(
    ("obj", "kind", "fields"),
    [
        (agent_add.none_reply("x"), "done", {"mode": "none", "reason": "x"}),
        (agent_add.done_reply("sidecar", "enrolled", "iptables"), "done", {"mode": "sidecar", "backend": "iptables"}),
        (agent_add.interim_reply("ambient"), "interim", {"mode": "ambient"}),
        (agent_add.standalone_reply("why"), "standalone", {"error": "why"}),
        (agent_add.failed_reply("sidecar", "bad", False, 101), "failed", {"code": 101, "retry": False}),
        (agent_add.failed_reply("ambient", "later", True), "failed", {"code": 0, "retry": True}),
        # what serve/cni_request.py of a version-1 agent answers
        ({"ok": False, "error": "unsupported protocol version '2' (agent speaks 1)", "retry": False}, "standalone", {}),
    ],
)
def test_parse_reply(obj: dict[str, Any], kind: str, fields: dict[str, Any]) -> None:
    reply = agent_add.parse_reply(json.loads(events.encode_line(obj)))
    assert reply.kind == kind
    for key, value in fields.items():
        assert getattr(reply, key) == value


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        {"ok": "yes"},
        {"ok": True, "state": "enrolled"},  # a version-1 answer
        {"v": 3, "ok": True, "mode": "none"},
        {"v": True, "ok": True, "mode": "none"},
        {"v": 2, "ok": True},
        {"v": 2, "ok": True, "mode": "bogus"},
        {"v": 2, "ok": True, "mode": "none", "interim": True},
        {"v": 2, "ok": True, "mode": 5},
        {"v": 2, "ok": False, "mode": "sidecar", "error": "x", "code": "101"},
        {"v": 2, "ok": False, "mode": "sidecar", "error": "x", "code": True},
        {"v": 2, "ok": False, "mode": "sidecar", "error": "x", "code": 5000},
        {"v": 2, "ok": False, "mode": "sidecar", "error": ["x"]},
    ],
)
def test_malformed_replies_are_refused(obj: Any) -> None:
    with pytest.raises(agent_add.ReplyError):
        agent_add.parse_reply(obj)


def test_the_version_one_parser_refuses_version_two_with_the_marker() -> None:
    """What makes an old agent's answer recognisable: the plugin falls back on this prefix."""
    with pytest.raises(RequestError) as exc:
        parse_request(events.encode_line(_request()))
    assert str(exc.value).startswith(agent_add.UNSUPPORTED_VERSION_PREFIX)


def test_valid_request() -> None:
    obj = json.loads(events.encode_line(_request()))
    assert is_v2(obj)
    req = parse_add_request(obj)
    assert (req.namespace, req.name, req.uid, req.netns) == ("shop", "web", UID, "/var/run/netns/cni-1")
    assert req.ips == ("10.7.0.5", "fd00:7::5") and req.backend == "nftables" and req.iptables == "auto"
    assert req.exclude_namespaces == ("kube-system",) and req.container_id == "c0ffee"
    assert not is_v2({"v": True}) and not is_v2({"v": 1}) and not is_v2([2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cmd": "DEL"}, "has only ADD"),
        ({"pod": None}, "no 'pod' object"),
        ({"pod": {"namespace": "Shop", "name": "web", "uid": ""}}, "invalid namespace"),
        ({"pod": {"namespace": "shop", "name": "", "uid": ""}}, "invalid pod name"),
        ({"pod": {"namespace": "shop", "name": "web", "uid": "not a uid; rm -rf"}}, "invalid pod uid"),
        ({"pod": {"namespace": "shop", "name": "web", "uid": 7}}, "invalid pod uid"),
        ({"netns": "relative/path"}, "absolute path"),
        ({"netns": "/run/netns/a\x00b"}, "absolute path"),
        ({"netns": "/" + "a" * 5000}, "longer than"),
        ({"netns": None}, "absolute path"),
        ({"ips": ["10.0.0.1"] * 17}, "too many ips"),
        ({"ips": ["10.0.0.300"]}, "invalid ip"),
        ({"ips": "10.0.0.1"}, "list of strings"),
        ({"rules": None}, "no 'rules' object"),
        ({"rules": {"backend": "pf"}}, "unknown rules backend"),
        ({"rules": {"backend": "iptables", "iptables": "xt"}}, "unknown iptables setting"),
        ({"exclude_namespaces": "kube-system"}, "exclude_namespaces"),
        ({"exclude_namespaces": ["a"] * 300}, "exclude_namespaces"),
        ({"exclude_namespaces": ["ok", "Not OK"]}, "invalid excluded namespace"),
        ({"container_id": "x" * 2000}, "container_id"),
        ({"container_id": 5}, "container_id"),
    ],
)
def test_invalid_requests_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_add_request(_request(**change))


def test_unknown_fields_are_ignored() -> None:
    assert parse_add_request(_request(future={"x": 1})).name == "web"
