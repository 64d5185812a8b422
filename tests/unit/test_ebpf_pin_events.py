"""The pin-directory watches (`pin_events`) and `IntactPods.unchanged` over them, on plain directories
(inotify behaves alike on the bpffs: the kernel side is tests/kernel/test_ebpf_change_count.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.backends import full_reads
from node_agent.backends.ebpf.intact_cache import IntactPods
from node_agent.backends.ebpf.pin_events import PinEvents
from node_agent.backends.ebpf.pod_state import Hooks


@pytest.fixture
def events() -> Iterator[PinEvents]:
    ev = PinEvents.open()
    assert ev is not None
    yield ev
    ev.close()


def test_changes_are_reported_under_their_key_and_a_removed_directory_is_no_longer_watched(
    tmp_path: Path, events: PinEvents
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert events.watch("A", str(a)) and events.watch("B", str(b))
    assert events.drain() == (set(), False)
    (a / "pin").touch()
    assert events.drain() == ({"A"}, False)
    (a / "pin").rename(a / "other")
    (a / "other").chmod(0o600)  # an attribute change leaves the pins as they were: not reported alone
    assert events.drain() == ({"A"}, False)
    (a / "other").chmod(0o644)
    assert events.drain() == (set(), False)
    (b / "x").touch()
    os.unlink(b / "x")
    b.rmdir()
    assert events.drain() == ({"B"}, False)
    assert not events.watching("B") and events.watching("A")
    b.mkdir()  # recreated: another directory, not watched until asked
    (b / "y").touch()
    assert events.drain() == (set(), False)


def test_unwatch_and_rewatch_leave_no_stale_reports(tmp_path: Path, events: PinEvents) -> None:
    a = tmp_path / "a"
    a.mkdir()
    assert events.watch("A", str(a))
    (a / "pin").touch()
    events.unwatch("A")
    assert events.drain() == (set(), False)  # what came before the unwatch is dropped with it
    assert events.watch("A", str(a)) and events.watch("A", str(a))  # a second watch replaces the first
    assert events.drain() == (set(), False)
    assert not events.watch("gone", str(tmp_path / "missing"))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def remembered(pods: IntactPods, uid: str, pdir: Path, generation: int | None = 7) -> None:
    pdir.mkdir(exist_ok=True)
    time.sleep(0.02)  # its mtime older than the coarse clock's tick: remembered
    pods.remember(uid, ("spec",), (), str(pdir), 1, b"cfg", Hooks(), None, generation)


def test_unchanged_answers_for_pods_nothing_happened_to(tmp_path: Path) -> None:
    clock = Clock()
    pods = IntactPods(clock)
    node = tmp_path / "node"
    node.mkdir()
    remembered(pods, "p1", tmp_path / "p1")
    remembered(pods, "p2", tmp_path / "p2")
    remembered(pods, "p3", tmp_path / "p3", generation=None)  # no count when it was read
    assert pods.unchanged(["p1", "p2"], 7, str(node)) == set()  # the node's watch is new: its past unknown
    assert pods.unchanged(["p1", "p2", "p3", "unknown"], 7, str(node)) == {"p1", "p2"}
    assert pods.unread == 2
    assert pods.unchanged(["p1"], 8, str(node)) == set()  # the count moved
    assert pods.unchanged(["p1"], None, str(node)) == set()  # the count cannot be had
    (tmp_path / "p1" / "pin").touch()  # a pin made: p1 forgotten (read in full next), p2 still answered
    assert pods.unchanged(["p1", "p2"], 7, str(node)) == {"p2"}
    assert not pods.still("p1", ("spec",), str(tmp_path / "p1"), tmp_path, 3, 7)
    (node / "pin").touch()  # the node's directory: nobody this time, nobody forgotten
    assert pods.unchanged(["p2"], 7, str(node)) == set()
    assert pods.unchanged(["p2"], 7, str(node)) == {"p2"}
    clock.t += full_reads.FULL_EVERY  # its full read is due
    assert pods.unchanged(["p2"], 7, str(node)) == set()
    pods.clear()
    assert pods.unchanged(["p2"], 7, str(node)) == set()


def test_pods_remembered_together_come_due_for_their_full_read_apart(tmp_path: Path) -> None:
    clock = Clock()
    pods = IntactPods(clock)
    node = tmp_path / "node"
    node.mkdir()
    uids = [f"pod-{i}" for i in range(40)]
    for uid in uids:
        (tmp_path / uid).mkdir()
    time.sleep(0.02)
    for uid in uids:
        pods.remember(uid, ("spec",), (), str(tmp_path / uid), 1, b"cfg", Hooks(), None, 7)
    pods.unchanged(uids, 7, str(node))
    start = clock.t
    clock.t = start + full_reads.FULL_EVERY * (1 - full_reads.SPREAD / 2)  # half way into the spread
    assert 0 < len(pods.unchanged(uids, 7, str(node))) < len(uids)


def test_lost_events_leave_no_pod_answered_for_until_its_next_full_read(tmp_path: Path) -> None:
    pods = IntactPods(Clock())
    node = tmp_path / "node"
    node.mkdir()
    remembered(pods, "p1", tmp_path / "p1")
    pods.unchanged(["p1"], 7, str(node))
    assert pods.unchanged(["p1"], 7, str(node)) == {"p1"}
    events = pods._pins
    assert events is not None
    real = events.drain
    events.drain = lambda: (set(), True)  # type: ignore[method-assign]  # a queue overflow
    assert pods.unchanged(["p1"], 7, str(node)) == set()
    events.drain = real  # type: ignore[method-assign]
    assert pods.unchanged(["p1"], 7, str(node)) == set()  # whatever the lost events were about
    remembered(pods, "p1", tmp_path / "p1")  # its next full read found it intact
    assert pods.unchanged(["p1"], 7, str(node)) == {"p1"}
