"""A pod's programs are loaded side by side (`program_loads`): every program loaded, or none left open.
A pinned program's id is remembered per pin file (`pinning.pinned_prog_id`), and a pin made again is read
again."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

from node_agent.backends.ebpf import bpfsys, pinning  # noqa: E402
from node_agent.backends.ebpf.loader import CompiledObject, Program  # noqa: E402
from node_agent.backends.ebpf.program_loads import load_programs, start_loads  # noqa: E402


def _insn(code: int, dst: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst, 0, imm)


RETURN_1 = _insn(0xB7, dst=0, imm=1) + _insn(0x95)  # r0 = 1; exit
NO_EXIT = _insn(0xB7, dst=0, imm=1)  # the verifier refuses a program that falls off its end


def _object(bodies: dict[str, bytes]) -> CompiledObject:
    programs = {name: Program(name, bpfsys.PROG_TYPE_SOCK_OPS, 0, body, ()) for name, body in bodies.items()}
    return CompiledObject(programs=programs, maps={})


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_every_program_is_loaded() -> None:
    names = [f"hrtest_ok{i}" for i in range(6)]
    loaded = load_programs(_object(dict.fromkeys(names, RETURN_1)), {}, names, ambient=False)
    try:
        assert list(loaded) == names
        ids = {bpfsys.prog_info(fd).prog_id for fd in loaded.values()}
        assert len(ids) == len(names)  # six distinct programs in the kernel
    finally:
        for fd in loaded.values():
            os.close(fd)


def test_one_refused_program_leaves_nothing_open() -> None:
    bodies = {f"hrtest_ok{i}": RETURN_1 for i in range(5)} | {"hrtest_bad": NO_EXIT}
    names = ["hrtest_ok0", "hrtest_bad", "hrtest_ok1", "hrtest_ok2", "hrtest_ok3", "hrtest_ok4"]
    before = _open_fds()
    with pytest.raises(bpfsys.BpfSysError) as caught:
        load_programs(_object(bodies), {}, names, ambient=False)
    assert "hrtest_bad" in str(caught.value) and caught.value.log  # the verifier's own words come along
    assert _open_fds() == before


def test_discarded_loads_leave_nothing_open() -> None:
    """Loads started beside other work (a pod's TC programs) and dropped because that work failed."""
    bodies = {"hrtest_ok0": RETURN_1, "hrtest_ok1": RETURN_1, "hrtest_bad": NO_EXIT}
    before = _open_fds()
    start_loads(_object(bodies), {}, list(bodies), ambient=False).discard()
    start_loads(_object(dict.fromkeys(("hrtest_ok0", "hrtest_ok1"), RETURN_1)), {}, ["hrtest_ok0", "hrtest_ok1"],
                ambient=False).discard()
    assert _open_fds() == before


def test_a_pinned_program_id_follows_the_pin(tmp_path: Path) -> None:
    root = pinning.ensure_bpffs(tmp_path / "state")
    try:
        path = root / "hrtest_prog"
        loaded = load_programs(
            _object({"hrtest_a": RETURN_1, "hrtest_b": RETURN_1}), {}, ["hrtest_a", "hrtest_b"], ambient=False
        )
        try:
            a, b = (bpfsys.prog_info(loaded[n]).prog_id for n in ("hrtest_a", "hrtest_b"))
            assert pinning.pinned_prog_id(path) is None
            pinning.pin(loaded["hrtest_a"], path)
            assert pinning.pinned_prog_id(path) == a
            assert pinning.pinned_prog_id(path) == a  # remembered
            pinning.pin(loaded["hrtest_b"], path)  # replaced: a new pin file
            assert pinning.pinned_prog_id(path) == b
            assert pinning.pinned_ids([path, root / "hrtest_none"]) == {b}
            pinning.unpin(path)
            assert pinning.pinned_prog_id(path) is None
        finally:
            for fd in loaded.values():
                os.close(fd)
    finally:
        pinning.unmount_bpffs(tmp_path / "state")
