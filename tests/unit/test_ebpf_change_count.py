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

    def refuse(obj: object, scratch: Path, spec: bpf_watch.WatchSpec) -> bpf_watch.BpfWatch:
        starts.append(1)
        raise bpf_watch.WatchError("no tracefs with syscall tracepoints is mounted")

    monkeypatch.setattr(bpf_watch.BpfWatch, "start", staticmethod(refuse))
    with caplog.at_level(logging.WARNING, logger="headrace.backend.ebpf"):
        assert count.read(lambda: object()) is None  # type: ignore[arg-type, return-value]
        assert count.read(lambda: object()) is None  # type: ignore[arg-type, return-value]
    assert starts == [1] and count.problem is not None
    assert [r.getMessage() for r in caplog.records].count(
        "ebpf change count unavailable: no tracefs with syscall tracepoints is mounted; every pod it covers is "
        "read back in full each poll") == 1
    off = bpf_watch.ChangeCount(False, tmp_path)
    assert off.read(compiling) is None and len(asked) == 2  # off: the object is not even asked for


def test_the_tracepoint_ids_come_from_a_mounted_tracefs(tmp_path: Path) -> None:
    for name, number in (("sys_enter_bpf", "586\n"), ("sys_exit_bpf", "585\n")):
        events = tmp_path / "tracing" / "events" / "syscalls" / name
        events.mkdir(parents=True)
        (events / "id").write_text(number)
    spec = bpf_watch.BPF_WATCH
    assert bpf_watch.tracepoint_ids(spec, (tmp_path / "nothing", tmp_path / "tracing")) == {
        "syscalls/sys_enter_bpf": 586, "syscalls/sys_exit_bpf": 585}
    with pytest.raises(bpf_watch.WatchError, match="no tracefs"):
        bpf_watch.tracepoint_ids(spec, (tmp_path / "nothing",))


SUBMIT_FORMAT = """name: io_uring_submit_req
ID: 2140
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * ctx;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * req;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u8 opcode;\toffset:32;\tsize:1;\tsigned:0;
\tfield:__data_loc char[] op_str;\toffset:52;\tsize:4;\tsigned:0;
"""


def _tracefs(root: Path, uring: dict[str, str] | None) -> None:
    for name in ("sys_enter_setsockopt", "sys_exit_setsockopt"):
        (root / "events" / "syscalls" / name).mkdir(parents=True)
        (root / "events" / "syscalls" / name / "id").write_text("7\n")
    for name, text in (uring or {}).items():
        (root / "events" / "io_uring" / name).mkdir(parents=True)
        (root / "events" / "io_uring" / name / "id").write_text("9\n")
        (root / "events" / "io_uring" / name / "format").write_text(text)


def test_the_x_tables_count_watches_io_uring_where_the_kernel_has_it_and_checks_its_layout(tmp_path: Path) -> None:
    spec = bpf_watch.XT_WATCH
    _tracefs(tmp_path / "none", None)  # no io_uring in this kernel: the syscalls alone
    assert set(bpf_watch.tracepoint_ids(spec, (tmp_path / "none",))) == {
        "syscalls/sys_enter_setsockopt", "syscalls/sys_exit_setsockopt"}
    complete = SUBMIT_FORMAT.replace("io_uring_submit_req", "io_uring_complete").replace(
        "\tfield:u8 opcode;\toffset:32;\tsize:1;\tsigned:0;\n", "")
    _tracefs(tmp_path / "ok", {"io_uring_submit_req": SUBMIT_FORMAT, "io_uring_complete": complete})
    assert len(bpf_watch.tracepoint_ids(spec, (tmp_path / "ok",))) == 4
    moved = SUBMIT_FORMAT.replace("offset:32;\tsize:1", "offset:33;\tsize:1")
    _tracefs(tmp_path / "moved", {"io_uring_submit_req": moved, "io_uring_complete": complete})
    with pytest.raises(bpf_watch.WatchError, match="opcode is not at offset 32"):  # the program would misread it
        bpf_watch.tracepoint_ids(spec, (tmp_path / "moved",))


def test_field_layout_reads_offset_and_size() -> None:
    assert bpf_watch.field_layout(SUBMIT_FORMAT, "req") == (16, 8)
    assert bpf_watch.field_layout(SUBMIT_FORMAT, "op_str") == (52, 4)
    assert bpf_watch.field_layout(SUBMIT_FORMAT, "common_pid") == (4, 4)
    assert bpf_watch.field_layout(SUBMIT_FORMAT, "flags") is None
