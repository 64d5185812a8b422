"""The rules helper's channel and lifecycle with stand-in children (no kernel): requests answered in
order, a child that exits, garbles, hangs or is not ready yet never holds a pod (HelperGone: the caller
writes the rules itself), one that is gone is started again, none after stop; when a node gets one; what
the child answers (`rules_helper_main.serve`)."""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.backends.base import BackendError, PodTarget
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.iptables.rules_helper import (
    READY,
    FrameError,
    HelperGone,
    RulesError,
    RulesHelper,
    for_rules,
    read_frame,
    write_frame,
)
from node_agent.backends.iptables.rules_helper_main import serve

from cni.contract.spec import AmbientSpec

TARGET = PodTarget("uid-1", "default", "app", "/run/netns/pod", 7, ("10.0.0.5",), None)

# a stand-in child: READY after `delay`, then per request the behaviour named by argv[1]
CHILD = r"""
import os, pickle, struct, sys, time
mode, delay = sys.argv[1], float(sys.argv[2])
def send(obj):
    data = pickle.dumps(obj); os.write(1, struct.pack("<I", len(data)) + data)
time.sleep(delay)
send((0, None, None))
inp = sys.stdin.buffer
while True:
    head = inp.read(4)
    if len(head) < 4:
        sys.exit(0)
    rid, target, spec = pickle.loads(inp.read(struct.unpack("<I", head)[0]))
    if mode == "echo":
        send((rid, None, target.uid.encode()))
    elif mode == "fail":
        send((rid, "iptables apply for pod default/app: no such netns", None))
    elif mode == "exit":
        sys.exit(3)
    elif mode == "garble":
        os.write(1, b"\xff\xff\xff\x7fjunk")
    elif mode == "hang":
        time.sleep(60)
"""


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Callable[..., RulesHelper]]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    made: list[RulesHelper] = []

    def make(mode: str, delay: float = 0.0, **kw: Any) -> RulesHelper:
        helper = RulesHelper("nft", command=[sys.executable, str(script), mode, str(delay)], **kw)
        made.append(helper)
        return helper

    yield make
    for helper in made:
        helper.stop()


def ready(helper: RulesHelper, timeout: float = 10.0) -> RulesHelper:
    helper.start()
    deadline = time.monotonic() + timeout
    while not helper.ready:
        assert time.monotonic() < deadline, "the helper never said it was ready"
        time.sleep(0.01)
    return helper


def gone(helper: RulesHelper, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while helper._proc is not None:
        assert time.monotonic() < deadline, "the helper's end was not noticed"
        time.sleep(0.01)


def test_requests_are_answered_by_the_child(child: Callable[..., RulesHelper]) -> None:
    helper = ready(child("echo"))
    futs = [helper.submit(TARGET, AmbientSpec()) for _ in range(3)]
    assert [helper.result(f) for f in futs] == [b"uid-1"] * 3
    assert helper.starts == 1 and helper.answered == 3


def test_a_failed_apply_in_the_child_is_a_rules_error(child: Callable[..., RulesHelper]) -> None:
    helper = ready(child("fail"))
    with pytest.raises(RulesError, match="no such netns"):
        helper.result(helper.submit(TARGET, AmbientSpec()))
    assert helper.ready  # the child stays


def test_a_child_not_ready_yet_takes_nothing(child: Callable[..., RulesHelper]) -> None:
    helper = child("echo", delay=5.0)
    helper.start()
    with pytest.raises(HelperGone, match="starting"):
        helper.submit(TARGET, AmbientSpec())


@pytest.mark.parametrize("mode", ["exit", "garble"])
def test_a_child_that_exits_or_garbles_fails_its_request_and_is_started_again(
        child: Callable[..., RulesHelper], mode: str) -> None:
    helper = ready(child(mode, restart_after=0.0))
    first = helper._proc
    assert first is not None
    with pytest.raises(HelperGone):
        helper.result(helper.submit(TARGET, AmbientSpec()))
    gone(helper)
    assert first.poll() is not None  # ended (killed when it garbled)
    with pytest.raises(HelperGone, match="not running"):
        helper.submit(TARGET, AmbientSpec())  # this one starts it again
    ready(helper)
    assert helper.starts == 2


def test_a_child_that_does_not_answer_is_killed(child: Callable[..., RulesHelper]) -> None:
    helper = ready(child("hang", reply_timeout=0.3, restart_after=60.0))
    proc = helper._proc
    assert proc is not None
    t0 = time.monotonic()
    with pytest.raises(HelperGone, match="stuck"):
        helper.result(helper.submit(TARGET, AmbientSpec()))
    assert time.monotonic() - t0 < 5.0 and proc.poll() is not None and helper._proc is None
    with pytest.raises(HelperGone, match="not running"):  # not again before restart_after
        helper.submit(TARGET, AmbientSpec())
    assert helper.starts == 1


def test_nothing_starts_after_stop(child: Callable[..., RulesHelper]) -> None:
    helper = ready(child("echo", restart_after=0.0))
    proc = helper._proc
    assert proc is not None
    helper.stop()
    assert proc.poll() is not None
    with pytest.raises(HelperGone):
        helper.submit(TARGET, AmbientSpec())
    helper.start()
    time.sleep(0.2)
    assert helper.starts == 1 and helper._proc is None


def test_a_node_gets_a_helper_for_iptables_rules_on_two_cpus_unless_turned_off() -> None:
    nft = IptablesBackend("nft")
    got = for_rules(nft, {}, cpus=2)
    assert got is not None and got.flavour == "nft"
    assert for_rules(nft, {}, cpus=1) is None
    assert for_rules(nft, {"HEADRACE_RULES_HELPER": "off"}, cpus=4) is None
    assert for_rules(object(), {}, cpus=4) is None  # nftables: written by the agent
    assert for_rules(None, {}, cpus=4) is None


def test_frames_round_trip_and_bad_ones_are_refused() -> None:
    r, w = os.pipe()
    write_frame(w, (5, TARGET, AmbientSpec()))
    os.close(w)
    with os.fdopen(r, "rb") as stream:
        assert read_frame(stream) == (5, TARGET, AmbientSpec())
        with pytest.raises(EOFError):
            read_frame(stream)
    for raw in (b"\x01\x00", b"\xff\xff\xff\x7f", b"\x04\x00\x00\x00ab", b"\x02\x00\x00\x00ab"):
        with pytest.raises(FrameError):
            read_frame(io.BytesIO(raw))


class StubRules:
    """What `serve` asks of its backend."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.applied: list[str] = []
        self.forgotten: list[str] = []
        self.shortcut = self

    def apply_after(self, target: PodTarget, spec: object, first: object) -> None:
        if self.fail:
            raise BackendError("iptables apply for pod default/app: boom")
        self.applied.append(target.uid)

    def written(self, netns_path: str) -> bytes | None:
        return b"\x00\x00\x00\x09"

    def forget_applied(self, target: PodTarget) -> None:
        self.forgotten.append(target.uid)


def served(rules: StubRules, *requests: object) -> list[Any]:
    inp = io.BytesIO()
    for req in requests:
        r, w = os.pipe()
        write_frame(w, req)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            inp.write(f.read())
    inp.seek(0)
    r, w = os.pipe()
    assert serve(rules, inp, w) == 0  # type: ignore[arg-type]
    os.close(w)
    out = []
    with os.fdopen(r, "rb") as f:
        while True:
            try:
                out.append(read_frame(f))
            except EOFError:
                return out


def test_the_child_answers_each_request_and_keeps_nothing() -> None:
    rules = StubRules()
    replies = served(rules, (1, TARGET, AmbientSpec()), (2, "not a target", AmbientSpec()))
    assert replies[0] == (READY, None, None)
    assert replies[1] == (1, None, b"\x00\x00\x00\x09")
    assert replies[2][0] == 2 and "not a pod and a spec" in replies[2][1]
    assert rules.applied == rules.forgotten == ["uid-1"]


def test_the_childs_failed_apply_is_its_answer() -> None:
    replies = served(StubRules(fail=True), (1, TARGET, AmbientSpec()))
    assert replies[1] == (1, "iptables apply for pod default/app: boom", None)
