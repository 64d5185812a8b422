"""Differential fuzzing of headrace-cni's two launchers: the compiled front (`cni/front/front.c`) and the
interpreter's relay (`cni.plugin.relay_client`) get the same hostile agent answers (frames valid and
bent: headers without an end, odd whitespace, long or signed numbers, payloads cut short, bytes that are
no frame at all, several frames in a row) and the same awkward invocations (CNI_ARGS and configurations
with quotes, backslashes, control characters, non-ASCII, whitespace around the object). Hypothesis draws
the cases (derandomized). Invariant: both send the agent the same request line (or none), print the same
bytes and exit with the same status, and the plugin logs the same messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cni.contract import relay
from tests.faults.plugin_inputs import FUZZ
from tests.unit.test_cni_agent_client import FakeAgent
from tests.unit.test_cni_front import launchers, run
from tests.unit.test_cni_plugin_process import Env, env, pod_netns

__all__ = ["env", "pod_netns"]  # fixtures
pytestmark = pytest.mark.faults

EXAMPLES = 200

_space = st.sampled_from([b" ", b"  ", b"\t", b"\x0b", b"\x0c", b"\r", b" \r"])
_number = st.one_of(
    st.integers(0, 300).map(lambda n: str(n).encode()),
    st.integers(0, 3000).map(lambda n: str(n).encode()),
    st.integers(0, 10**12).map(lambda n: str(n).encode()),
    st.sampled_from([b"-1", b"+5", b"0x10", b"1e3", b"\xd9\xa3", b"", b"00000000017"]),
)
_word = st.sampled_from([b"done", b"done", b"wait", b"wait", b"standalone", b"DONE", b"other", b"HR3", b""])


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    magic = draw(st.sampled_from([b"HR3", b"HR3", b"HR3", b"HR2", b"hr3", b""]))
    count = draw(st.integers(0, 3))
    words = [magic, draw(_word), *(draw(_number) for _ in range(count))]
    out = b""
    for w in words:
        out += w + draw(_space)
    return draw(st.sampled_from([b"", b" "])) + out + draw(st.sampled_from([b"\n", b"\n", b"", b"\r\n"]))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["done", "done-short", "wait", "standalone", "header", "header", "header", "bytes",
                                 "long"]))
    payload = draw(st.binary(max_size=64))
    if kind == "done":
        return relay.done_frame(draw(st.integers(0, 255)), payload)
    if kind == "done-short":
        return relay.done_frame(draw(st.integers(0, 255)), payload)[: -draw(st.integers(1, 8))]
    if kind == "wait":
        return relay.wait_frame(draw(st.integers(0, 200)) / 1000)
    if kind == "standalone":
        return relay.standalone_frame()
    if kind == "header":
        return draw(headers()) + payload
    if kind == "long":
        return b"HR3 " + b"9" * draw(st.integers(60, 80)) + draw(st.sampled_from([b"", b"\n"]))
    return payload


_args_char = st.sampled_from([*'ab=;"\\ ~\t', "\x7f", "\u00e9", "\x01"])
_extra = st.text(alphabet=st.sampled_from([*'ab"\\ \t\n\r', "\u00e9", "\x00", "\u2028"]), max_size=12)


RACED = (b"the agent did not finish the ADD in time",
         b"the agent's answer was cut short or not one of protocol version 3")


def settled(out: bytes, replies: list[bytes]) -> bytes:
    """A launcher's output with its one race taken out: the fake agent hangs up right after its last frame,
    and after a short `wait` whether the launcher's deadline or the hang-up comes first decides between
    these two details of the same failure (code 103); both launchers meet both."""
    if replies and b"wait" in replies[-1]:
        for detail in RACED:
            out = out.replace(detail, b"<the wait's deadline or the hang-up>")
    return out


class Agent:
    """One fake agent for all examples: it answers each version 3 request with the current `replies`."""

    def __init__(self, env: Env) -> None:
        self.replies: list[bytes] = []
        self.fake = FakeAgent(env.sock, v3=lambda req: list(self.replies))


@pytest.fixture
def agent(env: Env) -> Iterator[Agent]:
    made = Agent(env)
    yield made
    made.fake.close()


@given(replies=st.lists(frames(), min_size=1, max_size=3), cni_args_tail=st.text(_args_char, max_size=6),
       extra=st.none() | _extra, before=st.sampled_from([b"", b" \n", b"\t\x0b\x0c"]),
       after=st.sampled_from([b"", b"\r\n", b"  "]))
@settings(FUZZ, max_examples=EXAMPLES)
def test_the_front_and_the_interpreter_answer_alike(env: Env, agent: Agent, tmp_path_factory: Any,
                                                     replies: list[bytes], cni_args_tail: str, extra: str | None,
                                                     before: bytes, after: bytes) -> None:
    env.pod("shop", "web")  # non-mesh in the plugin's own pod source: its own path answers the same way
    tmp: Path = tmp_path_factory.mktemp("front-fuzz")
    paths = launchers(env, tmp)
    conf = env.conf() if extra is None else env.conf(note=extra)
    stdin = before + json.dumps(conf, ensure_ascii=False).encode() + after
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0", "CNI_NETNS": env.netns,
               "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-1;FUZZ="
                           + cni_args_tail,
               "CNI_PATH": "/opt/cni/bin"}
    seen: dict[str, tuple[int, bytes, list[bytes], list[str]]] = {}
    agent.replies = replies
    for kind, path in paths.items():
        agent.fake.lines.clear()
        log_from = len(env.log.read_bytes()) if env.log.exists() else 0
        proc = run(path, stdin, environ)
        logged = env.log.read_bytes()[log_from:].decode(errors="replace").splitlines() if env.log.exists() else []
        msgs = [json.loads(line)["msg"] for line in logged if line.strip()]
        seen[kind] = (proc.returncode, settled(proc.stdout, replies), [x for x in agent.fake.lines if b'"v":3' in x],
                      msgs)
        assert proc.stderr == b"", (kind, proc.stderr)
    code, _out, lines, msgs = seen["front"]
    event(f"exit {code}, relayed {len(lines)}: " + (msgs[0][:40] if msgs else "nothing logged"))
    assert seen["front"] == seen["python"]
