"""headrace-cni's compiled front (`cni/front/front.c`), as the kernel runs it from the launcher's `#!` line:
the request line is the interpreter's byte for byte (`cni.contract.relay.request_line`), what it does not
relay or the agent does not run reaches the plugin's own code with the configuration intact, and a
hostile or stalled agent neither kills it nor holds it past the relay's bounds. The answers both
launchers share are in test_cni_relay.py (each case through both)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.install_cni.runtime import front_binary
from node_agent.lab.plugin_launcher import write_plugin_launcher

from cni.contract import errors, relay
from cni.plugin import launch, relay_client
from tests.unit.test_cni_agent_client import FakeAgent
from tests.unit.test_cni_plugin_process import PREV_100, Env, env, pod_netns

__all__ = ["env", "pod_netns"]  # fixtures

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0",
       "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-1", "CNI_PATH": "/opt/cni/bin"}
ANSWER = b'{"cniVersion": "1.0.0"}\n'


@pytest.fixture
def agent(env: Env) -> Iterator[Callable[..., FakeAgent]]:
    made: list[FakeAgent] = []

    def make(**replies: Callable[[dict[str, Any]], Any]) -> FakeAgent:
        made.append(FakeAgent(env.sock, **replies))
        return made[-1]

    yield make
    for a in made:
        a.close()


def launchers(env: Env, tmp_path: Path) -> dict[str, Path]:
    out = {}
    for kind, front in (("python", False), ("front", True)):
        (tmp_path / kind).mkdir()
        out[kind] = tmp_path / kind / "headrace-cni"
        write_plugin_launcher(out[kind], str(env.sock), front=front)
    return out


def run(launcher: Path, stdin: bytes, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(launcher)], input=stdin, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          timeout=30, check=False)


def padded(conf: dict[str, Any], line_bytes: int, env: dict[str, str]) -> bytes:
    """conf with a padding field that makes the request line exactly line_bytes long."""
    body = json.dumps({**conf, "pad": ""}).encode()
    line = relay.request_line(env, body)
    assert line is not None
    return json.dumps({**conf, "pad": "p" * (line_bytes - len(line))}).encode()


def test_the_front_is_built() -> None:
    assert front_binary(), "cni/front/headrace-cni-front missing: `make front` (make setup builds it)"


def test_the_fronts_constants_are_the_pythons() -> None:
    """Each `#define NAME value /* module.CONSTANT */` of front.c against that constant."""
    source = (Path(front_binary()).parent / "front.c").read_text()
    found = re.findall(r"^#define \w+ +(\(1 << 20\)|\d+|\"\w+\") +/\* ([\w.]+)\.(\w+)", source, re.M)
    modules = {"relay": relay, "relay_client": relay_client, "cni.contract.errors": errors}
    values = {"(1 << 20)": 1 << 20}
    seen = 0
    for value, module, name in found:
        if module not in modules:
            continue
        expected = getattr(modules[module], name)
        got = values.get(value) or int(value)
        if isinstance(expected, float):  # seconds in Python, milliseconds in C
            expected = round(expected * 1000)
        assert got == expected, (module, name)
        seen += 1
    assert seen == 6, found
    # the commands it relays (relay.COMMANDS), as the interpreter's launcher relays them
    relayed = re.search(r"^static const char \*const COMMANDS\[\] = \{(.*)\}; +/\* relay\.COMMANDS \*/$", source, re.M)
    assert relayed is not None
    assert re.findall(r'"(\w+)"', relayed.group(1)) == list(relay.COMMANDS)
    assert launch.RELAYED_COMMANDS == tuple(c.encode() for c in relay.COMMANDS)


def test_request_lines_are_the_interpreters_byte_for_byte(env: Env, tmp_path: Path, agent: Any) -> None:
    raw = agent(v3=lambda req: relay.done_frame(0, ANSWER))
    paths = launchers(env, tmp_path)
    # the front relays and prints the answer itself: it never gets to run the interpreter
    os.unlink(paths["front"].parent / f".{paths['front'].name}-front" / "python3")
    conf = env.conf()
    cases: list[tuple[dict[str, str], bytes]] = [
        ({**ENV, "CNI_NETNS": env.netns}, json.dumps(conf).encode()),
        ({**ENV, "CNI_NETNS": env.netns, "CNI_ARGS": 'a="q\\uote";b=\\\\x'},  # quotes and backslashes
         b" \x0b\x0c\t\r\n" + json.dumps(conf, indent=2).replace("\n", "\r\n").encode() + b"\r\n \t"),
        ({"CNI_COMMAND": "ADD", "CNI_NETNS": env.netns, "CNI_ARGS": ""}, json.dumps(conf).encode()),  # few keys
        ({**ENV, "CNI_NETNS": env.netns, "CNI_PATH": " spaced ~ path "}, b'{"x":"\\u00e9\xc3\xa9\\n"}'),
        ({**ENV, "CNI_NETNS": env.netns}, padded(conf, relay.MAX_LINE_BYTES, {**ENV, "CNI_NETNS": env.netns})),
        ({"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}, json.dumps(env.conf("1.1.0", prev=None)).encode()),
    ]
    for environ, stdin in cases:
        expected = relay.request_line(environ, stdin)
        assert expected is not None
        for kind, path in paths.items():
            raw.lines.clear()
            proc = run(path, stdin, environ)
            assert (proc.returncode, proc.stdout) == (0, ANSWER), (kind, proc.stderr)
            assert raw.lines == [expected], kind


@pytest.mark.parametrize("case", ["not ascii", "not printable", "not an object", "over the line limit"])
def test_what_the_front_does_not_relay_reaches_the_plugin_intact(env: Env, tmp_path: Path, agent: Any,
                                                                 case: str) -> None:
    """Not relayed, by either launcher: the plugin's own path gets the whole configuration (the pod is
    non-mesh in its pod source, so it answers with the prevResult)."""
    raw = agent(v3=lambda req: relay.done_frame(0, ANSWER))  # version 2 refused: the plugin's own path
    env.pod("shop", "web")
    environ = {**ENV, "CNI_NETNS": env.netns}
    stdin = json.dumps(env.conf()).encode()
    if case == "not ascii":
        environ["CNI_PATH"] = "/opt/cni/b\u00efn:/usr/lib/cni"
    elif case == "not printable":
        environ["CNI_PATH"] = "/opt/cni/bin\t"
    elif case == "not an object":
        stdin = b"[" + stdin + b"]"
    else:  # past the front's stdin buffer too: it is handed on through a memory file
        stdin = padded(env.conf(), 300_000, environ)
    for kind, path in launchers(env, tmp_path).items():
        raw.requests.clear()
        proc = run(path, stdin, environ)
        assert 3 not in [r["v"] for r in raw.requests], kind
        if case == "not an object":
            assert proc.returncode == 1 and b"JSON object" in proc.stdout, (kind, proc.stdout)
        else:
            assert (proc.returncode, json.loads(proc.stdout)) == (0, PREV_100), (kind, proc.stdout, proc.stderr)


def test_other_commands_get_stdin_untouched(env: Env, tmp_path: Path) -> None:
    for kind, path in launchers(env, tmp_path).items():
        proc = run(path, b'{"cniVersion": "0.4.0"}', {"CNI_COMMAND": "VERSION"})
        assert proc.returncode == 0 and json.loads(proc.stdout)["cniVersion"] == "0.4.0", kind


@pytest.mark.parametrize("answer", [
    pytest.param([3.0], id="stalls-past-the-first-answer-bound"),
    pytest.param(None, id="closes"),
    pytest.param(b"HR3 " + b"x" * 200, id="header-without-end"),
    pytest.param(b"HR3 done 0 5\n{}", id="payload-cut-short"),
])
def test_a_bad_agent_means_the_own_path_in_bounded_time(env: Env, tmp_path: Path, agent: Any,
                                                        answer: Any) -> None:
    """No answer within 2 s, a connection closed after a large request, an endless header, a cut-short
    payload: the plugin's own path, after at most the first-answer bound."""
    agent(v3=lambda req: answer)
    env.pod("shop", "web")
    environ = {**ENV, "CNI_NETNS": env.netns}
    stdin = padded(env.conf(), relay.MAX_LINE_BYTES - 10, environ)
    for kind, path in launchers(env, tmp_path).items():
        started = time.monotonic()
        proc = run(path, stdin, environ)
        assert (proc.returncode, json.loads(proc.stdout)) == (0, PREV_100), (kind, proc.stdout, proc.stderr)
        assert time.monotonic() - started < 2.9, kind
    notes = [r["msg"] for r in env.log_lines() if r["msg"].startswith("agent not usable, standalone path")]
    assert len(notes) == 2 and notes[0] == notes[1], notes  # both launchers say the same


@pytest.mark.parametrize("answer", [
    b"HR3 wait 5 7\n", b"HR3 standalone 1\n", b"HR3 done 0\n{}", b"HR3 done 256 2\n{}", b"HR3 done 0 1048577\n{}",
    b"HR3 done 0 12345678901\n{}", b"HR3\tdone\x0b0 3\r\n{}\n", b" HR3 done 0 3\n{}\n", b"HR3 standalone",
    b"HR3 wait 100\nHR3 wait 100\n", b"HR3 wait 100\nHR3 done 0 3\n{}\n", b"HR3 done -1 3\n{}\n",
    b"HR3 done 0 3", b"hr3 standalone\n", b"HR3 done 00000000001 1\n{",
])
def test_edge_headers_are_read_as_the_interpreter_reads_them(env: Env, tmp_path: Path, agent: Any,
                                                            answer: bytes) -> None:
    agent(v3=lambda req: answer)
    env.pod("shop", "web")
    environ = {**ENV, "CNI_NETNS": env.netns}
    out = {kind: run(path, json.dumps(env.conf()).encode(), environ) for kind, path in launchers(env, tmp_path).items()}
    assert (out["front"].returncode, out["front"].stdout) == (out["python"].returncode, out["python"].stdout)


def test_the_front_outside_a_launcher_answers_with_a_cni_error(tmp_path: Path) -> None:
    proc = subprocess.run([front_binary()], input=b"{}", env={"CNI_COMMAND": "ADD"}, capture_output=True,
                          timeout=10, check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == errors.INTERNAL_ERROR


def test_a_missing_interpreter_is_a_cni_error(env: Env, tmp_path: Path) -> None:
    path = launchers(env, tmp_path)["front"]
    os.unlink(path.parent / f".{path.name}-front" / "python3")
    proc = run(path, b"{}", {"CNI_COMMAND": "VERSION"})
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and out["code"] == errors.INTERNAL_ERROR and "interpreter" in out["msg"], out
