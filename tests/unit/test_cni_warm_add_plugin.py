"""headrace-cni's one-request ADD against a fake agent that speaks version 2 (a subprocess, like the runtime
runs it): what the plugin does with each answer, its time bounds, and what it imports on that path."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from cni.contract import agent_add, events
from tests.unit.test_cni_agent_client import FakeAgent
from tests.unit.test_cni_plugin_process import PREV_100, Env, _modules_after, assert_error, env, pod_netns

__all__ = ["env", "pod_netns"]  # fixtures

SIDECAR = {"sidecar.istio.io/status": "{}"}


def line(obj: dict[str, Any]) -> bytes:
    return events.encode_line(obj)


def v1_refusal(req: dict[str, Any]) -> bytes:
    return b'{"ok": false, "error": "version 1 must not be asked", "retry": false}\n'


def test_agent_answers_none_in_one_round_trip(env: Env) -> None:
    env.pod("shop", "web")
    agent = FakeAgent(env.sock, v1_refusal, v2=lambda r: line(agent_add.none_reply("not in the mesh")))
    try:
        assert env.run("ADD", env.conf()) == (0, PREV_100)
        assert len(agent.requests) == 1
        req = agent.requests[0]
        assert req["v"] == 2 and req["cmd"] == "ADD" and req["netns"] == env.netns
        assert req["pod"] == {"namespace": "shop", "name": "web", "uid": "uid-1"}
        assert req["ips"] == ["10.7.0.5/24"] and req["exclude_namespaces"] == ["kube-system"]
        assert req["rules"] == {"backend": "iptables", "iptables": "auto"}
        assert any(r["msg"] == "mode none: not in the mesh" for r in env.log_lines())
    finally:
        agent.close()


def test_sidecar_applied_by_the_agent_runs_nothing(env: Env) -> None:
    env.pod("shop", "web", annotations=SIDECAR)
    agent = FakeAgent(env.sock, v1_refusal, v2=lambda r: line(agent_add.done_reply("sidecar", "enrolled", "nftables")))
    try:
        # PATH without any tool: the standalone path could not have applied anything
        assert env.run("ADD", env.conf(backend="nftables"), PATH="/nonexistent") == (0, PREV_100)
        assert agent.requests[0]["rules"]["backend"] == "nftables"
        assert any(r["msg"] == "sidecar redirect applied by the agent" for r in env.log_lines())
    finally:
        agent.close()


def test_excluded_or_anonymous_pods_need_no_round_trip(env: Env) -> None:
    agent = FakeAgent(env.sock, v1_refusal, v2=lambda r: line(agent_add.none_reply("x")))
    try:
        conf = env.conf(exclude_namespaces=["kube-system", "shop"])
        assert env.run("ADD", conf)[0] == 0
        assert env.run("ADD", env.conf(), CNI_ARGS="IgnoreUnknown=1")[0] == 0
        assert agent.requests == []
    finally:
        agent.close()


@pytest.mark.parametrize(
    "answer",
    [
        line(agent_add.standalone_reply("pod not in the agent's pod source")),
        b'{"ok": false, "error": "unsupported protocol version \'2\' (agent speaks 1)", "retry": false}\n',
        b"garbage\n",
        None,  # hangs up
    ],
)
def test_standalone_path_runs_when_the_agent_does_not_take_the_add(env: Env, answer: bytes | None) -> None:
    env.pod("shop", "web")  # non-mesh: the plugin's own pod source says so
    agent = FakeAgent(env.sock, v1_refusal, v2=lambda r: answer)
    try:
        assert env.run("ADD", env.conf()) == (0, PREV_100)
        assert any(r["msg"] == "mode none: pod source" for r in env.log_lines())
    finally:
        agent.close()


def test_a_slow_agent_costs_a_non_mesh_pod_at_most_the_first_answer_bound(env: Env) -> None:
    env.pod("shop", "web")

    def slow(req: dict[str, Any]) -> bytes:
        time.sleep(6)
        return line(agent_add.none_reply("late"))

    agent = FakeAgent(env.sock, v1_refusal, v2=slow)
    try:
        start = time.monotonic()
        assert env.run("ADD", env.conf(agent_timeout=30)) == (0, PREV_100)
        assert time.monotonic() - start < 5
        assert any("did not answer in time" in r["msg"] for r in env.log_lines())
    finally:
        agent.close()


def test_ambient_interim_then_final(env: Env) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "ambient"})

    def enrol(req: dict[str, Any]) -> bytes:
        return line(agent_add.interim_reply("ambient")) + line(agent_add.done_reply("ambient", "enrolled"))

    agent = FakeAgent(env.sock, v1_refusal, v2=enrol)
    try:
        assert env.run("ADD", env.conf()) == (0, PREV_100)
        assert len(agent.requests) == 1
    finally:
        agent.close()


def test_ambient_waits_past_the_first_bound_once_the_agent_holds_it(env: Env) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "ambient"})
    # interim at once, the final line 2.5 s later: longer than the first-answer bound (2 s)
    parts: list[bytes | float | None] = [line(agent_add.interim_reply("ambient")), 2.5,
                                  line(agent_add.done_reply("ambient", "enrolled"))]
    agent = FakeAgent(env.sock, v1_refusal, v2=lambda r: parts)
    try:
        start = time.monotonic()
        assert env.run("ADD", env.conf(agent_timeout=10)) == (0, PREV_100)
        assert time.monotonic() - start > 2.4
    finally:
        agent.close()


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (line(agent_add.interim_reply("ambient")), 103),  # then hangs up: the agent held the pod
        (line(agent_add.interim_reply("ambient")) + line(agent_add.failed_reply("ambient", "no proxy", True)), 11),
        (line(agent_add.failed_reply("ambient", "netns refused", False)), 104),
        (line(agent_add.failed_reply("sidecar", "bad port 'x'", False, 101)), 101),
    ],
)
def test_failures_the_plugin_reports(env: Env, answer: bytes, code: int) -> None:
    env.pod("shop", "web", labels={"istio.io/dataplane-mode": "ambient"})
    agent = FakeAgent(env.sock, v1_refusal, v2=lambda r: answer)
    try:
        assert_error(env.run("ADD", env.conf()), code)
        assert len(agent.requests) == 1  # no standalone retry
    finally:
        agent.close()


def test_sidecar_apply_failure_in_the_agent_falls_back(env: Env) -> None:
    """The agent could not apply: the plugin tries itself (here its nft tool is missing: its own error)."""
    env.pod("shop", "web", annotations=SIDECAR)
    agent = FakeAgent(env.sock, v1_refusal,
                      v2=lambda r: line(agent_add.failed_reply("sidecar", "sidecar rules: boom", True)))
    try:
        out = assert_error(env.run("ADD", env.conf(backend="nftables"), PATH="/nonexistent"), 102)
        assert "nftables" in out["msg"]
        assert any("could not apply the sidecar redirect" in r["msg"] for r in env.log_lines())
    finally:
        agent.close()


def test_agent_path_imports_stay_lean(env: Env) -> None:
    """With an agent answering, an ADD loads neither the pod source nor the mode decision, and no heavy
    stdlib module (`socket` included: the client uses `_socket`)."""
    env.pod("shop", "web")
    agent = FakeAgent(env.sock, v1_refusal, v2=lambda r: line(agent_add.none_reply("x")))
    try:
        conf = env.conf()
        code = (
            "import os\n"
            "from cni.plugin import entry as plugin\n"
            "environ = dict(os.environ, CNI_COMMAND='ADD', CNI_CONTAINERID='c1', CNI_IFNAME='eth0',"
            f" CNI_NETNS={env.netns!r}, CNI_ARGS='K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web')\n"
            f"rc, out = plugin.run(environ, {json.dumps(conf).encode()!r})\n"
            "assert rc == 0, out\n"
        )
        mods = _modules_after(env, code)
    finally:
        agent.close()
    assert "cni.plugin.agent_add_client" in mods
    assert not {"cni.plugin.pod_source", "cni.plugin.decide", "cni.contract.kube_objects", "cni.plugin.standalone",
                "cni.contract.membership", "cni.plugin.agent_client"} & mods
    from tests.unit.test_cni_plugin_process import HEAVY_STDLIB

    assert not set(HEAVY_STDLIB) & {m.split(".")[0] for m in mods}
