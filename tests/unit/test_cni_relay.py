"""The launcher's relayed commands (protocol version 3): the framing, the plugin's side against a fake agent
(run as the runtime runs it, through a launcher that names the fake's socket), and the agent's side
(`serve/relayed_commands.py`) with a fake one-request ADD and a fake agent part of the DEL."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.plugin_launcher import write_plugin_launcher
from node_agent.serve.add_request import WarmAddRequest
from node_agent.serve.cni_request import RequestError
from node_agent.serve.relayed_commands import relayed_command

from cni.contract import agent_add, errors, relay
from cni.plugin.cni_env import CniEnv
from cni.plugin.log import JsonLog
from cni.plugin.netconf import NetConf
from cni.plugin.relayed import Declined
from tests.unit.test_cni_agent_client import FakeAgent
from tests.unit.test_cni_plugin_process import PREV_100, Env, assert_error, env, pod_netns

__all__ = ["env", "pod_netns"]  # fixtures

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/p",
       "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web", "CNI_PATH": "/opt/cni/bin"}


# ---------------------------------------------------------------------------------------------------
# framing


def test_request_line_carries_the_env_and_the_configuration_as_they_came() -> None:
    env = dict(ENV, CNI_ARGS='a="q\\uote"')
    line = relay.request_line(env, b'{"cniVersion": "1.0.0",\n "name": "n\\"x"}\n')
    assert line is not None and line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert obj == {"v": 3, "cmd": "ADD", "env": env, "stdin": {"cniVersion": "1.0.0", "name": 'n"x'}}


def test_del_gc_and_status_are_relayed_and_the_other_commands_are_not() -> None:
    status = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}
    line = relay.request_line(status, b'{"cniVersion": "1.1.0"}')
    assert line is not None and json.loads(line) == {"v": 3, "cmd": "STATUS", "env": status,
                                                      "stdin": {"cniVersion": "1.1.0"}}
    for command in ("DEL", "GC"):
        line = relay.request_line(dict(ENV, CNI_COMMAND=command), b"{}")
        assert line is not None and json.loads(line)["cmd"] == command
    for command in ("CHECK", "VERSION", "add"):
        assert relay.request_line(dict(ENV, CNI_COMMAND=command), b"{}") is None
    assert relay.request_line({k: v for k, v in ENV.items() if k != "CNI_COMMAND"}, b"{}") is None


@pytest.mark.parametrize("env, stdin", [
    (dict(ENV, CNI_PATH="/opt/cni/b\u00efn"), b"{}"),  # not ASCII
    (dict(ENV, CNI_ARGS="a\tb"), b"{}"),  # not printable
    (ENV, b"[1, 2]"),  # not an object
    (ENV, b""),
    (ENV, b'{"x": "' + b"a" * relay.MAX_LINE_BYTES + b'"}'),  # too long for one request line
])
def test_what_is_not_relayed(env: dict[str, str], stdin: bytes) -> None:
    assert relay.request_line(env, stdin) is None


@pytest.mark.parametrize("header, parsed", [
    (b"HR3 done 0 17", ("done", 0, 17)),
    (b"HR3 done 1 0", ("done", 1, 0)),
    (b"HR3 wait 20000", ("wait", 20000, 0)),
    (b"HR3 standalone", ("standalone", 0, 0)),
    (b"HR3 done 0", None),
    (b"HR3 done 256 1", None),
    (b"HR3 done 0 -1", None),
    (b"HR3 done 0 99999999999", None),
    (b"HR3 wait", None),
    (b"HR3 standalone 1", None),
    (b"HR3 other 1 1", None),
    (b'{"ok": false}', None),
    (b"", None),
])
def test_reply_headers(header: bytes, parsed: tuple[str, int, int] | None) -> None:
    assert relay.parse_header(header) == parsed


def test_frames_parse_back() -> None:
    head, _, rest = relay.done_frame(1, b'{"code": 7}\n').partition(b"\n")
    assert relay.parse_header(head) == ("done", 1, len(rest)) and rest == b'{"code": 7}\n'
    assert relay.parse_header(relay.wait_frame(2.5).rstrip()) == ("wait", 2500, 0)
    assert relay.parse_header(relay.standalone_frame().rstrip()) == ("standalone", 0, 0)


# ---------------------------------------------------------------------------------------------------
# the plugin's side


@pytest.fixture(params=[False, True], ids=["python-launcher", "compiled-front"])
def front(request: pytest.FixtureRequest) -> bool:
    """Each of the plugin side's cases through both launchers install-cni lays: the interpreter's relay
    (`cni.plugin.relay_client`), and the compiled front's (`cni/front/front.c`), which runs the
    interpreter with the relay's outcome when the agent did not run the ADD."""
    return bool(request.param)


def launched(env: Env, tmp_path: Path, front: bool = False) -> Callable[..., tuple[int, Any]]:
    """env.run, through a launcher that relays to the fake agent's socket (as install-cni lays one)."""
    launcher = tmp_path / "headrace-cni"
    write_plugin_launcher(launcher, str(env.sock), front=front)

    def run(conf: dict[str, Any], **extra: str) -> tuple[int, Any]:
        e = {"PATH": "/usr/bin:/bin", **ENV, "CNI_NETNS": env.netns,
             "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-1", **extra}
        proc = subprocess.run([str(launcher)], input=json.dumps(conf).encode(), env=e, capture_output=True,
                              timeout=30)
        assert proc.stderr == b"", proc.stderr
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None

    return run


def test_done_is_printed_as_the_agent_sent_it(env: Env, tmp_path: Path, front: bool) -> None:
    answer = b'{"cniVersion": "1.0.0", "ips": []}\n'
    agent = FakeAgent(env.sock, v3=lambda r: relay.done_frame(0, answer))
    try:
        assert launched(env, tmp_path, front)(env.conf()) == (0, json.loads(answer))
        [req] = agent.requests
        assert req["v"] == 3 and req["env"]["CNI_NETNS"] == env.netns and req["stdin"] == env.conf()
        assert "PATH" not in req["env"]
    finally:
        agent.close()
    assert env.log_lines() == []  # the agent logged this ADD


def test_a_failed_add_is_exit_status_1_with_the_error_object(env: Env, tmp_path: Path, front: bool) -> None:
    err = {"cniVersion": "1.0.0", "code": 101, "msg": "bad annotation"}
    agent = FakeAgent(env.sock, v3=lambda r: relay.done_frame(1, json.dumps(err).encode() + b"\n"))
    try:
        assert launched(env, tmp_path, front)(env.conf()) == (1, err)
    finally:
        agent.close()


def test_standalone_runs_the_plugins_own_path_without_asking_again(env: Env, tmp_path: Path, front: bool) -> None:
    env.pod("shop", "web")  # non-mesh in the plugin's own pod source
    agent = FakeAgent(env.sock, v3=lambda r: relay.standalone_frame())
    try:
        assert launched(env, tmp_path, front)(env.conf()) == (0, PREV_100)
        assert [r["v"] for r in agent.requests] == [3]
    finally:
        agent.close()
    assert any(r["msg"] == "agent left the ADD to the plugin" for r in env.log_lines())


@pytest.mark.parametrize("answer", [
    b'{"ok":false,"error":"unsupported protocol version \'3\' (agent speaks 2)","retry":false}\n',
    b"garbage\n",
    b"HR3 done 0 500\n{}",  # cut short
    None,  # hangs up
])
def test_an_agent_that_does_not_take_it_means_the_own_path(env: Env, tmp_path: Path, front: bool,
                                                           answer: bytes | None) -> None:
    env.pod("shop", "web")
    agent = FakeAgent(env.sock, v3=lambda r: answer)
    try:
        assert launched(env, tmp_path, front)(env.conf()) == (0, PREV_100)
        assert [r["v"] for r in agent.requests] == [3]  # the same agent is not asked twice
    finally:
        agent.close()
    assert any(r["msg"].startswith("agent not usable, standalone path") for r in env.log_lines())


def test_no_agent_at_all(env: Env, tmp_path: Path, front: bool) -> None:
    env.pod("shop", "web")
    assert launched(env, tmp_path, front)(env.conf()) == (0, PREV_100)
    assert any("does not exist" in r["msg"] for r in env.log_lines())


def test_wait_then_done(env: Env, tmp_path: Path, front: bool) -> None:
    frames: list[bytes | float | None] = [relay.wait_frame(5), 2.5, relay.done_frame(0, json.dumps(PREV_100).encode())]
    agent = FakeAgent(env.sock, v3=lambda r: frames)
    try:
        assert launched(env, tmp_path, front)(env.conf()) == (0, PREV_100)  # past the 2 s first-answer bound
    finally:
        agent.close()


@pytest.mark.parametrize("after_wait", [None, b"garbage\n"])
def test_a_held_pod_without_an_answer_fails_closed(env: Env, tmp_path: Path, front: bool,
                                                   after_wait: bytes | None) -> None:
    env.pod("shop", "web")  # the own path would have said non-mesh: it must not run
    agent = FakeAgent(env.sock, v3=lambda r: [relay.wait_frame(5), after_wait])
    try:
        out = assert_error(launched(env, tmp_path, front)(env.conf()), errors.AGENT_UNREACHABLE)
        assert out["msg"] == "headrace agent did not finish the ADD"
        assert [r["v"] for r in agent.requests] == [3]
    finally:
        agent.close()


def test_an_invocation_that_cannot_be_relayed_takes_the_one_request_add(env: Env, tmp_path: Path, front: bool) -> None:
    agent = FakeAgent(env.sock, v2=lambda r: agent_add_line(agent_add.none_reply("x")))
    try:
        assert launched(env, tmp_path, front)(env.conf(), CNI_PATH="/opt/cni/b\u00efn") == (0, PREV_100)
        assert [r["v"] for r in agent.requests] == [2]
    finally:
        agent.close()


STATUS_ENV = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}


def test_a_status_the_agent_answers_is_printed_without_the_plugins_own_check(env: Env, tmp_path: Path,
                                                                             front: bool) -> None:
    agent = FakeAgent(env.sock, v3=lambda r: relay.done_frame(0, b""))
    launcher = tmp_path / "headrace-cni"
    write_plugin_launcher(launcher, str(env.sock), front=front)
    conf = env.conf("1.1.0", prev=None, objects_dir=str(tmp_path / "missing"))  # the own check would fail
    try:
        proc = subprocess.run([str(launcher)], input=json.dumps(conf).encode(),
                              env={"PATH": "/usr/bin:/bin", **STATUS_ENV}, capture_output=True, timeout=30)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
        [req] = agent.requests
        assert req["cmd"] == "STATUS" and req["env"] == STATUS_ENV and req["stdin"] == conf
    finally:
        agent.close()
    assert env.log_lines() == []


@pytest.mark.parametrize("answer", [lambda r: relay.standalone_frame(), lambda r: b"garbage\n", None])
def test_a_status_the_agent_does_not_answer_is_the_plugins_own(env: Env, tmp_path: Path, front: bool,
                                                               answer: Callable[[Any], bytes] | None) -> None:
    agent = FakeAgent(env.sock, v3=answer) if answer is not None else None
    launcher = tmp_path / "headrace-cni"
    write_plugin_launcher(launcher, str(env.sock), front=front)
    conf = env.conf("1.1.0", prev=None, objects_dir=str(tmp_path / "missing"))
    try:
        proc = subprocess.run([str(launcher)], input=json.dumps(conf).encode(),
                              env={"PATH": "/usr/bin:/bin", **STATUS_ENV}, capture_output=True, timeout=30)
    finally:
        if agent is not None:
            agent.close()
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == errors.PLUGIN_NOT_AVAILABLE
    assert "missing is not a directory" in json.loads(proc.stdout)["details"]


AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def test_a_del_the_agent_runs_is_its_answer(env: Env, tmp_path: Path, front: bool) -> None:
    agent = FakeAgent(env.sock, v3=lambda r: relay.done_frame(0, b""))
    try:
        assert launched(env, tmp_path, front)(env.conf(), CNI_COMMAND="DEL") == (0, None)
        [req] = agent.requests
        assert req["v"] == 3 and req["cmd"] == "DEL" and req["stdin"] == env.conf()
    finally:
        agent.close()
    assert env.log_lines() == []  # the agent logged this DEL


def test_a_del_the_agent_declines_is_the_plugins_own_and_still_tells_it(env: Env, tmp_path: Path,
                                                                        front: bool) -> None:
    env.pod("shop", "web", labels=AMBIENT)
    agent = FakeAgent(env.sock, v3=lambda r: relay.standalone_frame())
    try:
        assert launched(env, tmp_path, front)(env.conf(), CNI_COMMAND="DEL") == (0, None)
        assert [(r["v"], r["cmd"]) for r in agent.requests] == [(3, "DEL"), (1, "DEL")]
    finally:
        agent.close()


@pytest.mark.parametrize("answer, why", [
    ([3.0], "the agent did not answer in time"),  # stalls past the first-answer bound
    ([relay.wait_frame(1), 3.0], "the agent did not finish the DEL in time"),  # held, then no answer
])
def test_a_del_the_agent_did_not_take_or_finish_is_the_plugins_own_without_a_second_wait(
        env: Env, tmp_path: Path, front: bool, answer: list[bytes | float | None], why: str) -> None:
    """Unlike an ADD, a DEL the agent held and did not finish does not fail: the plugin's own DEL runs,
    and does not ask that agent again."""
    env.pod("shop", "web", labels=AMBIENT)
    agent = FakeAgent(env.sock, v3=lambda r: answer)
    try:
        assert launched(env, tmp_path, front)(env.conf(), CNI_COMMAND="DEL") == (0, None)
        assert [r["v"] for r in agent.requests] == [3]
    finally:
        agent.close()
    assert any(r["msg"] == f"DEL not delivered to the agent: {why}" for r in env.log_lines()), env.log_lines()


def agent_add_line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def test_a_relayed_command_loads_only_the_launcher(env: Env, tmp_path: Path) -> None:
    agent = FakeAgent(env.sock, v3=lambda r: relay.done_frame(0, b"{}\n"))
    launcher = tmp_path / "headrace-cni"
    write_plugin_launcher(launcher, str(env.sock))
    text = launcher.read_text().splitlines()
    python = text[0][2:].split()[0]
    try:
        proc = subprocess.run([python, "-IS", "-X", "importtime", str(launcher)], input=json.dumps(env.conf()).encode(),
                              env={**ENV, "CNI_NETNS": env.netns}, capture_output=True, timeout=30)
    finally:
        agent.close()
    assert proc.returncode == 0 and proc.stdout == b"{}\n"
    ours = {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines() if "|" in line}
    ours = {m for m in ours if m.startswith("cni")}
    assert ours == {"cni", "cni.plugin", "cni.plugin.launch", "cni.plugin.relay_client", "cni.contract",
                    "cni.contract.relay"}, ours


# ---------------------------------------------------------------------------------------------------
# the agent's side


class Warm:
    """A fake one-request ADD: records the requests, answers with `reply` (after an interim if asked)."""

    def __init__(self, reply: dict[str, Any], interim: bool = False) -> None:
        self.reply = reply
        self.interim = interim
        self.requests: list[WarmAddRequest] = []
        self.afterwards: list[str] = []  # what ran after the reply

    def __call__(self, req: WarmAddRequest, interim: Callable[[dict[str, Any]], None],
                 later: Callable[[Callable[[], None]], None]) -> dict[str, Any]:
        self.requests.append(req)
        if self.interim:
            interim(agent_add.interim_reply("ambient"))
        later(lambda: self.afterwards.append(req.uid))
        return self.reply


def agent_side(env: Env, warm: Warm, conf: dict[str, Any] | None = None, own: str | None = None,
               check: Callable[[str], None] = lambda path: None, **env_fields: str) -> tuple[bytes, list[bytes]]:
    sent: list[bytes] = []
    obj = {"v": 3, "cmd": "ADD", "env": {**ENV, "CNI_NETNS": env.netns, **env_fields},
           "stdin": env.conf() if conf is None else conf}
    frame = relayed_command(obj, own or str(env.sock), warm, check, sent.append)
    return frame, sent


def done(frame: bytes) -> tuple[int, Any]:
    head, _, payload = frame.partition(b"\n")
    kind, status, n = relay.parse_header(head) or ("", 0, 0)
    assert kind == "done" and len(payload) == n
    return status, json.loads(payload)


def test_agent_runs_the_plugins_add(env: Env) -> None:
    warm = Warm(agent_add.done_reply("sidecar", "enrolled", "nftables"))
    frame, sent = agent_side(env, warm)
    assert done(frame) == (0, PREV_100) and sent == []
    [req] = warm.requests
    assert (req.namespace, req.name, req.netns, req.ips) == ("shop", "web", env.netns, ("10.7.0.5",))
    assert any(r["msg"] == "ADD ok (relayed to the agent)" for r in env.log_lines())  # the configured log file


def test_what_the_add_leaves_for_later_runs_after_the_final_frame(env: Env) -> None:
    warm = Warm(agent_add.done_reply("sidecar", "enrolled", "nftables"))
    later: list[Callable[[], None]] = []
    obj = {"v": 3, "cmd": "ADD", "env": {**ENV, "CNI_NETNS": env.netns}, "stdin": env.conf()}
    frame = relayed_command(obj, str(env.sock), warm, lambda p: None, lambda b: None, later.append)
    assert done(frame)[0] == 0 and warm.afterwards == [] and len(later) == 1
    later[0]()
    assert len(warm.afterwards) == 1


def test_agent_sends_wait_with_the_configured_timeout(env: Env) -> None:
    warm = Warm(agent_add.done_reply("ambient", "enrolled"), interim=True)
    frame, sent = agent_side(env, warm, env.conf(agent_timeout=7))
    assert done(frame)[0] == 0 and sent == [relay.wait_frame(7)]


@pytest.mark.parametrize("case", ["other socket", "excluded", "no pod", "agent declines", "netns refused"])
def test_agent_leaves_to_the_plugin(env: Env, case: str) -> None:
    warm = Warm(agent_add.standalone_reply("pod not in the agent's pod source") if case == "agent declines"
                else agent_add.none_reply("x"))
    kwargs: dict[str, Any] = {}
    if case == "other socket":
        kwargs["own"] = "/run/elsewhere.sock"
    elif case == "excluded":
        kwargs["conf"] = env.conf(exclude_namespaces=["shop"])
    elif case == "no pod":
        kwargs["CNI_ARGS"] = "IgnoreUnknown=1"

    def refuse(path: str) -> None:
        raise RequestError("netns refused: not a pod's")

    if case == "netns refused":
        kwargs["check"] = refuse
    frame, _ = agent_side(env, warm, **kwargs)
    assert frame == relay.standalone_frame()
    assert len(warm.requests) == (1 if case == "agent declines" else 0)


@pytest.mark.parametrize("conf_change, code", [
    ({"prevResult": None}, errors.INVALID_NETWORK_CONFIG),
    ({"cniVersion": "9.9.9"}, errors.INCOMPATIBLE_VERSION),
])
def test_agent_answers_the_plugins_errors(env: Env, conf_change: dict[str, Any], code: int) -> None:
    conf = {k: v for k, v in {**env.conf(), **conf_change}.items() if v is not None}
    frame, _ = agent_side(env, Warm(agent_add.none_reply("x")), conf)
    status, out = done(frame)
    assert status == 1 and out["code"] == code


def test_agent_answers_a_bad_env_like_the_plugin(env: Env) -> None:
    status, out = done(agent_side(env, Warm(agent_add.none_reply("x")), CNI_CONTAINERID="-bad")[0])
    assert status == 1 and out["code"] == errors.INVALID_ENV


def agent_status(env: Env, conf: dict[str, Any], own: str | None = None) -> bytes:
    obj = {"v": 3, "cmd": "STATUS", "env": STATUS_ENV, "stdin": conf}
    return relayed_command(obj, own or str(env.sock), Warm(agent_add.none_reply("x")), lambda p: None, lambda b: None)


def test_agent_answers_status_ready_for_its_own_socket_and_the_plugins_errors_otherwise(env: Env) -> None:
    conf = env.conf("1.1.0", prev=None, objects_dir="/nonexistent")  # the plugin's own source: not the agent's
    assert agent_status(env, conf) == relay.done_frame(0, b"")
    assert env.log_lines() == []  # a ready STATUS is not logged (asked every few seconds)
    status, out = done(agent_status(env, env.conf("1.0.0", prev=None)))
    assert status == 1 and out["code"] == errors.INCOMPATIBLE_VERSION and "STATUS" in out["msg"]
    status, out = done(agent_status(env, {"cniVersion": "1.1.0"}))  # no name, no type
    assert status == 1 and out["code"] == errors.INVALID_NETWORK_CONFIG
    assert agent_status(env, conf, own="/run/elsewhere.sock") == relay.standalone_frame()


@pytest.mark.parametrize("obj", [
    {"v": 3, "cmd": "CHECK", "env": dict(ENV, CNI_COMMAND="CHECK"), "stdin": {}},
    {"v": 3, "cmd": "STATUS", "env": ENV, "stdin": {}},  # cmd and CNI_COMMAND differ
    {"v": 3, "cmd": "ADD", "env": {**ENV, "PATH": "/bin"}, "stdin": {}},
    {"v": 3, "cmd": "ADD", "env": {**ENV, "CNI_ARGS": 1}, "stdin": {}},
    {"v": 3, "cmd": "ADD", "env": ENV, "stdin": "{}"},
    {"v": 3, "cmd": "ADD", "stdin": {}},
])
def test_malformed_relay_requests_are_refused(obj: dict[str, Any]) -> None:
    with pytest.raises(RequestError):
        relayed_command(obj, "/run/x.sock", Warm(agent_add.none_reply("x")), lambda p: None, lambda b: None)


class Deleting:
    """A fake agent part of the DEL: records the pods it is asked about, or declines."""

    def __init__(self, decline: str = "") -> None:
        self.decline = decline
        self.asked: list[tuple[str, str]] = []

    def __call__(self, env: CniEnv, conf: NetConf, log: JsonLog, hold: Callable[[], None]) -> None:
        self.asked.append((env.k8s.namespace, env.k8s.name))
        if self.decline:
            raise Declined(self.decline)
        hold()


def agent_del(env: Env, deleting: Deleting | None, conf: dict[str, Any] | None = None,
              sent: list[bytes] | None = None, **env_fields: str) -> bytes:
    obj = {"v": 3, "cmd": "DEL", "env": {**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": env.netns, **env_fields},
           "stdin": env.conf() if conf is None else conf}
    return relayed_command(obj, str(env.sock), Warm(agent_add.none_reply("x")), lambda p: None,
                           (sent if sent is not None else []).append, delete=deleting)


def test_agent_runs_the_plugins_del_with_its_own_part(env: Env) -> None:
    deleting = Deleting()
    sent: list[bytes] = []
    assert agent_del(env, deleting, env.conf(agent_timeout=7), sent) == relay.done_frame(0, b"")
    assert deleting.asked == [("shop", "web")]
    assert sent == [relay.wait_frame(7)]  # before the agent's removal: the launcher waits as for a DEL event
    assert any(r["msg"] == "DEL ok (relayed to the agent)" for r in env.log_lines())


@pytest.mark.parametrize("case", ["no pod identity", "excluded namespace"])
def test_a_del_of_no_pod_is_done_without_the_agents_part(env: Env, case: str) -> None:
    deleting = Deleting()
    if case == "no pod identity":
        frame = agent_del(env, deleting, CNI_ARGS="IgnoreUnknown=1")
    else:
        frame = agent_del(env, deleting, env.conf(exclude_namespaces=["shop"]))
    assert frame == relay.done_frame(0, b"") and deleting.asked == []
    assert any(r["msg"].startswith("mode none:") for r in env.log_lines())


@pytest.mark.parametrize("deleting", [Deleting("the plugin's rules"), None])
def test_a_del_the_agent_leaves_to_the_plugin(env: Env, deleting: Deleting | None) -> None:
    assert agent_del(env, deleting) == relay.standalone_frame()


def test_a_del_with_a_bad_configuration_is_the_plugins_error(env: Env) -> None:
    deleting = Deleting()
    status, out = done(agent_del(env, deleting, {"cniVersion": "1.0.0", "name": "n"}))
    assert status == 1 and out["code"] == errors.INVALID_NETWORK_CONFIG and deleting.asked == []


def test_agent_answers_gc_as_the_plugin_does(env: Env) -> None:
    obj = {"v": 3, "cmd": "GC", "env": {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"},
           "stdin": env.conf("1.1.0", prev=None)}
    assert relayed_command(obj, str(env.sock), Warm(agent_add.none_reply("x")), lambda p: None,
                           lambda b: None) == relay.done_frame(0, b"")
    assert any(r["msg"] == "GC ok (relayed to the agent)" for r in env.log_lines())
    obj["stdin"] = env.conf("1.0.0", prev=None)
    status, out = done(relayed_command(obj, str(env.sock), Warm(agent_add.none_reply("x")), lambda p: None,
                                       lambda b: None))
    assert status == 1 and out["code"] == errors.INCOMPATIBLE_VERSION
