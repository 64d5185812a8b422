"""The node's change count in the eBPF drift poll (`bpf_watch`, `intact_cache`), without a kernel: a count
that stands still spares the map and hook reads, anything else does not; a count that cannot start is
said once and not tried again. The kernel side: tests/kernel/test_ebpf_change_count.py."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from node_agent.backends.base import BackendError
from node_agent.backends.ebpf import bpf_watch
from node_agent.backends.ebpf.intact_cache import IntactPods
from node_agent.backends.ebpf.loader import CompiledObject
from node_agent.backends.ebpf.pod_state import Hooks

NO_MAP = 999_999  # no such descriptor: a read of the node map through it fails ("not intact")


def remembered(tmp_path: Path, generation: int | None) -> tuple[IntactPods, Path]:
    pods, pdir = IntactPods(clock=lambda: 0.0), tmp_path / "pins"
    pdir.mkdir()
    time.sleep(0.05)  # the directory's mtime older than the coarse clock's tick: it can be remembered
    pods.remember("uid", "wanted", ("hr_connect4",), str(pdir), 7, b"cfg", Hooks(), None, generation)
    return pods, pdir


def test_a_count_that_stood_still_answers_without_the_map_and_hook_reads(tmp_path: Path) -> None:
    pods, pdir = remembered(tmp_path, generation=5)
    no_cgroup = tmp_path / "no-cgroup"  # opening it would fail
    assert pods.still("uid", "wanted", str(pdir), no_cgroup, NO_MAP, generation=5)
    assert (pods.shortcuts, pods.quiet) == (1, 1)
    assert not pods.still("uid", "wanted", str(pdir), no_cgroup, NO_MAP, generation=6)  # moved: read, fails
    assert not pods.still("uid", "wanted", str(pdir), no_cgroup, NO_MAP, generation=None)  # not counted
    assert pods.quiet == 1


def test_a_still_count_does_not_cover_the_pins_or_a_new_spec(tmp_path: Path) -> None:
    pods, pdir = remembered(tmp_path, generation=5)
    assert not pods.still("uid", "other spec", str(pdir), tmp_path, NO_MAP, generation=5)
    (pdir / "hr_extra").write_text("")  # a pin made (or removed) moves the directory's mtime
    assert not pods.still("uid", "wanted", str(pdir), tmp_path, NO_MAP, generation=5)
    assert pods.quiet == 0


def test_a_pod_remembered_without_a_count_is_never_quiet(tmp_path: Path) -> None:
    pods, pdir = remembered(tmp_path, generation=None)
    assert not pods.still("uid", "wanted", str(pdir), tmp_path / "no-cgroup", NO_MAP, generation=None)
    assert pods.quiet == 0


def test_the_count_starts_once_the_object_is_there_and_a_failure_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    count = bpf_watch.ChangeCount(True, tmp_path)
    asked: list[int] = []

    def compiling() -> CompiledObject:
        asked.append(1)
        raise BackendError("being compiled")

    assert count.read(compiling) is None and count.read(compiling) is None and len(asked) == 2  # tried again
    starts: list[int] = []

    def refuse(obj: object, scratch: Path) -> bpf_watch.BpfWatch:
        starts.append(1)
        raise bpf_watch.WatchError("no tracefs with syscall tracepoints is mounted")

    monkeypatch.setattr(bpf_watch.BpfWatch, "start", staticmethod(refuse))
    with caplog.at_level(logging.WARNING, logger="headrace.backend.ebpf"):
        assert count.read(lambda: object()) is None  # type: ignore[arg-type, return-value]
        assert count.read(lambda: object()) is None  # type: ignore[arg-type, return-value]
    assert starts == [1] and count.problem is not None
    assert [r.getMessage() for r in caplog.records].count(
        "ebpf change count unavailable: no tracefs with syscall tracepoints is mounted; every eBPF pod is read "
        "back in full each poll") == 1
    off = bpf_watch.ChangeCount(False, tmp_path)
    assert off.read(compiling) is None and len(asked) == 2  # off: the object is not even asked for


def test_the_tracepoint_ids_come_from_a_mounted_tracefs(tmp_path: Path) -> None:
    for name, number in (("sys_enter_bpf", "586\n"), ("sys_exit_bpf", "585\n")):
        events = tmp_path / "tracing" / "events" / "syscalls" / name
        events.mkdir(parents=True)
        (events / "id").write_text(number)
    names = ("sys_enter_bpf", "sys_exit_bpf")
    assert bpf_watch.tracepoint_ids(names, (tmp_path / "nothing", tmp_path / "tracing")) == {
        "sys_enter_bpf": 586, "sys_exit_bpf": 585}
    with pytest.raises(bpf_watch.WatchError, match="no tracefs"):
        bpf_watch.tracepoint_ids(names, (tmp_path / "nothing",))
