"""Which legacy pods the drift poll skips: the x_tables change count where it was at their last intact read."""

from __future__ import annotations

import importlib.util
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from node_agent.backends import full_reads
from node_agent.backends.ebpf import loader
from node_agent.backends.iptables.xt_changes import QuietLegacyPods

from cni.contract.spec import AmbientSpec, SidecarSpec

AMBIENT, SIDECAR = AmbientSpec(), SidecarSpec()


class FakeCount:
    def __init__(self) -> None:
        self.value: int | None = 5

    def read(self, _obj: Callable[[], loader.CompiledObject]) -> int | None:
        return self.value


@pytest.fixture
def quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[QuietLegacyPods, FakeCount, list[float]]:
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "cache"))
    clock = [100.0]
    q = QuietLegacyPods(tmp_path, clock=lambda: clock[0])
    count = FakeCount()
    q.count = count  # type: ignore[assignment]
    return q, count, clock


def test_a_pod_is_skipped_while_the_count_stands_where_its_intact_read_was(
        quiet: tuple[QuietLegacyPods, FakeCount, list[float]]) -> None:
    q, count, clock = quiet
    q.intact("a", SIDECAR, 5)
    q.intact("b", SIDECAR, 4)  # read before a change elsewhere: read again
    q.intact("c", SIDECAR, None)  # no count when it was read: nothing known
    polls = [("a", SIDECAR, False), ("b", SIDECAR, False), ("c", SIDECAR, False), ("d", SIDECAR, False)]
    assert q.unchanged(polls) == {"a"}
    assert q.unchanged([("a", SidecarSpec(exclude_inbound_ports=(22,)), False)]) == set()  # another spec: read
    count.value = 6  # another process replaced a table somewhere on the node
    assert q.unchanged(polls) == set()
    count.value = None  # the count stopped, or a command is in flight
    assert q.unchanged(polls) == set()
    count.value = 5
    clock[0] += full_reads.FULL_EVERY  # its full read is due
    assert q.unchanged(polls) == set()


def test_pods_read_in_the_same_pass_come_due_for_their_full_read_at_different_passes(
        quiet: tuple[QuietLegacyPods, FakeCount, list[float]]) -> None:
    q, _, clock = quiet
    polls = [(f"pod-{i}", SIDECAR, False) for i in range(200)]
    for uid, spec, _ in polls:
        q.intact(uid, spec, 5)
    start = clock[0]
    skipped = []
    for step in range(0, 17):
        clock[0] = start + full_reads.FULL_EVERY * (1 - full_reads.SPREAD) + step
        skipped.append(len(q.unchanged(polls)))
    assert skipped[0] == 200 and skipped[-1] == 0  # none due 45 s on, all 60 s on
    assert all(0 < n < 200 for n in skipped[2:-2])  # in between, a few more each second
    assert max(a - b for a, b in itertools.pairwise(skipped)) <= 40


def test_an_ambient_pod_is_skipped_only_when_its_rules_alone_are_due(
        quiet: tuple[QuietLegacyPods, FakeCount, list[float]]) -> None:
    q, _, _ = quiet
    q.intact("a", AMBIENT, 5)
    assert q.unchanged([("a", AMBIENT, True)]) == {"a"}
    assert q.unchanged([("a", AMBIENT, False)]) == set()  # its policy routing is due too


def test_forgetting_and_a_failed_read_end_the_skipping(quiet: tuple[QuietLegacyPods, FakeCount, list[float]]) -> None:
    q, _, _ = quiet
    q.intact("a", SIDECAR, 5)
    q.intact("b", SIDECAR, 5)
    q.forget("a")  # an apply or a removal of the agent's
    q.intact("b", SIDECAR, None)  # a read that found problems (or raised)
    assert q.unchanged([("a", SIDECAR, False), ("b", SIDECAR, False)]) == set()


def test_no_polls_read_no_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "cache"))
    q = QuietLegacyPods(tmp_path)
    reads: list[int] = []

    def read() -> int:
        reads.append(1)
        return 5

    q.read = read  # type: ignore[method-assign]
    assert q.unchanged([]) == set() and reads == []


def test_without_bcc_the_count_says_so_once_and_starts_no_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "cached_available", lambda: False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bcc" else find_spec(name, *a))
    started: list[int] = []
    monkeypatch.setattr(loader, "compile_in_background", lambda _verify: started.append(1))
    q = QuietLegacyPods(tmp_path)
    with caplog.at_level(logging.WARNING, logger="headrace.backend.ebpf"):
        assert q.read() is None and q.read() is None
    assert started == [] and q.count.problem is not None
    assert "bcc is not importable: install python3-bpfcc" in q.count.problem
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["x_tables change count unavailable"]
    q.intact("a", SIDECAR, None)
    assert q.unchanged([("a", SIDECAR, False)]) == set()  # every legacy pod polled, as without the count


def test_the_node_probe_rules_are_read_again_only_when_the_count_moved_the_ips_changed_or_a_minute_passed() -> None:
    from node_agent.agent.node_rules import unless_unchanged

    synced: list[list[str]] = []
    count: list[int | None] = [7]
    clock = [0.0]
    sync = unless_unchanged(synced.append, lambda: count[0], lambda: clock[0])
    sync(["10.0.0.2"])
    sync(["10.0.0.2"])  # nothing replaced anywhere since: not read
    assert synced == [["10.0.0.2"]]
    sync(["10.0.0.2", "10.0.0.3"])  # another pod enrolled
    count[0] = 8  # another process replaced a table
    sync(["10.0.0.2", "10.0.0.3"])
    clock[0] = full_reads.FULL_EVERY  # the full read is due
    sync(["10.0.0.2", "10.0.0.3"])
    count[0] = None  # no count (or a command in flight): every call reads
    sync(["10.0.0.2", "10.0.0.3"])
    sync(["10.0.0.2", "10.0.0.3"])
    assert len(synced) == 6


def test_a_failed_node_sync_is_tried_again() -> None:
    from node_agent.agent.node_rules import unless_unchanged

    calls: list[int] = []

    def failing(_ips: list[str]) -> None:
        calls.append(1)
        raise OSError("iptables-save failed")

    sync = unless_unchanged(failing, lambda: 3)
    for _ in range(2):
        with pytest.raises(OSError):
            sync(["10.0.0.2"])
    assert len(calls) == 2
