"""The node's change count (`bpf_watch`) on the real kernel: the tracepoint program counts the bpf(2)
attaches, detaches and map writes of other processes, not the agent's own, and of the map writes only
those on maps named like ours (another agent writing its own maps leaves it still); while it stands still a pod
found intact is polled without its map and hook reads, and each kind of tampering by another process is
still found by the next check (it moved the count). Polls answered without a look (`EbpfBackend.unchanged`,
the agent's drift pass skips those pods): while the count stands still and the pod's pin directory and the
node's are untouched; each kind of tampering — a bpf(2) detach or map write, a pin removed, a TC filter
ahead of ours — ends that at once, and the check that follows finds it. Real programs on a real cgroup and
pins on a real bpffs; the tampering runs in a child process, as another tool on the node would."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.backends.base import PodTarget

from cni.contract.spec import AmbientSpec, SidecarSpec
from tests.kernel.ebpf_fixtures import (
    DETACH,
    DROP_ENTRIES,
    TRIES,
    PodEnv,
    ebpf_backend,
    in_child,
    pod_env,
    removed_after,
)

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
bcc = pytest.importorskip("bcc")

from node_agent.backends.ebpf import bpfsys, btf_layout, intact_cache, pinning, pod_index  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402

SPEC = SidecarSpec(include_inbound_ports=())  # outbound only: no TC part
UNPIN = "import os, sys; os.unlink(sys.argv[1])"

ATTACH_FOREIGN = """
import sys
from node_agent.backends.ebpf import bpfsys
from node_agent.backends.ebpf.attach import Cgroup
allow = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1; exit
fd = bpfsys.prog_load(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, allow, "hrtest_c4", bpfsys.ATTACH_CGROUP_INET4_CONNECT)
with Cgroup(sys.argv[1]) as c:
    bpfsys.prog_attach(fd, c.fd, bpfsys.ATTACH_CGROUP_INET4_CONNECT, bpfsys.F_ALLOW_MULTI)
"""
TCX = """
import socket, sys
from node_agent.backends.ebpf import bpfsys
index = socket.if_nametoindex("eth0")
if sys.argv[1] == "attach":  # passes every packet, ahead of our TC filters
    prog = bpfsys.prog_load(bpfsys.PROG_TYPE_SCHED_CLS, bytes.fromhex("b7000000000000009500000000000000"),
                            "hrtest_tcx", 0)
    bpfsys.prog_attach(prog, index, bpfsys.ATTACH_TCX_INGRESS, 0)
else:
    for prog_id, link_id in bpfsys.tcx_query(index, bpfsys.ATTACH_TCX_INGRESS):
        bpfsys.tcx_detach(index, bpfsys.ATTACH_TCX_INGRESS, prog_id, link_id)
"""

MAP_WRITES = """
import ctypes, struct, sys
from node_agent.backends.ebpf import bpfsys
BATCH_UPDATE, BATCH_DELETE = 26, 27
fd = bpfsys.map_create(bpfsys.MapSpec(1, 8, 8, 64, 0), sys.argv[1]) if sys.argv[1] else bpfsys.obj_get(sys.argv[2])
size = bpfsys.map_info(fd).spec.value_size
key = struct.pack("=Q", 0xFFFF_FFFF_FFF0)
for _ in range(5):
    bpfsys.map_update(fd, key, bytes(size))
    bpfsys.map_delete(fd, key)
keys, values = ctypes.create_string_buffer(key, 8), ctypes.create_string_buffer(size)
# union bpf_attr batch: in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
for cmd in (BATCH_UPDATE, BATCH_DELETE):
    attr = bpfsys._attr("=QQQQIIQQ", 0, 0, ctypes.addressof(keys), ctypes.addressof(values), 1, fd, 0, 0)
    bpfsys._bpf(cmd, attr, "batch")
"""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[EbpfBackend]:
    for b in ebpf_backend(tmp_path / "state", change_count=True):  # closed and unmounted afterwards
        b.intact = intact_cache.IntactPods(lambda: 1000.0)  # no FULL_EVERY expiry during a test
        yield b


@pytest.fixture
def target(env: PodEnv, backend: EbpfBackend) -> Iterator[PodTarget]:
    yield from removed_after(env, backend)


def quiet_check(backend: EbpfBackend, target: PodTarget, spec: SidecarSpec = SPEC) -> None:
    """Checks until one is answered by a still count (all find the pod intact)."""
    time.sleep(0.05)  # the pin directory's mtime older than the coarse clock's tick
    for _ in range(TRIES):
        quiet = backend.intact.quiet
        assert backend.check(target, spec) == []
        if backend.intact.quiet == quiet + 1:
            return
    pytest.fail(f"no check in {TRIES} was answered by a still count")


def test_the_count_runs_its_tracefs_read_leaves_no_mount_and_own_writes_do_not_count(
    env: PodEnv, backend: EbpfBackend, target: PodTarget, tmp_path: Path
) -> None:
    backend.apply(target, SPEC)
    quiet_check(backend, target)
    assert backend.changes.watch is not None and backend.changes.problem is None
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        assert not [line for line in fh if str(tmp_path) in line and "tracefs" in line]
    watch = backend.changes.watch
    fd = pinning.open_pinned(backend.state_dir / "bpf" / pinning.NODE_DIR / pod_index.CONFIG)
    assert fd is not None
    try:
        for _ in range(TRIES):  # this process writes a map: not counted (another may write meanwhile)
            before = watch.generation()
            bpfsys.map_update(fd, struct.pack("=Q", 0xFFFF_FFFF_FFFF), bytes(bpfsys.map_info(fd).spec.value_size))
            bpfsys.map_delete(fd, struct.pack("=Q", 0xFFFF_FFFF_FFFF))
            if watch.generation() == before:
                break
        else:
            pytest.fail("every own write moved the count")
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["program detached", "foreign program at our hook", "node entry gone"])
def test_tampering_by_another_process_is_found_by_the_next_check(
    env: PodEnv, backend: EbpfBackend, target: PodTarget, kind: str
) -> None:
    backend.apply(target, SPEC)
    quiet_check(backend, target)  # the map and hook reads are skipped now: only the count can tell
    before = backend.changes.read(backend._object)
    pdir = backend.state_dir / "bpf" / target.uid
    if kind == "program detached":
        in_child(DETACH, str(pdir / "hr_connect4"), str(env.cgroup), str(bpfsys.ATTACH_CGROUP_INET4_CONNECT))
        want = "hr_connect4 is not attached"
    elif kind == "foreign program at our hook":
        in_child(ATTACH_FOREIGN, str(env.cgroup))
        want = "foreign eBPF program"
    else:
        in_child(DROP_ENTRIES, str(backend.state_dir / "bpf" / pinning.NODE_DIR / pod_index.CONFIG))
        want = "no entry in the node's eBPF pod config map"
    after = backend.changes.read(backend._object)
    assert before is not None and after is not None and after > before
    problems = backend.check(target, SPEC)
    assert any(want in p for p in problems), problems
    backend.apply(target, SPEC)  # repaired, then quiet again
    assert backend.check(target, SPEC) == []
    quiet_check(backend, target)


def test_a_tcx_program_put_ahead_of_our_tc_filters_is_found_though_the_tcx_query_was_skipped(
    env: PodEnv, backend: EbpfBackend, target: PodTarget
) -> None:
    """Inbound on TC: a quiet poll looks only at the netns' TC announcements; a tcx attach (bpf(2), which
    nothing announces) moved the count, so the next check asks for tcx programs again."""
    spec = SidecarSpec()
    backend.apply(target, spec)
    quiet_check(backend, target, spec)
    in_child(TCX, "attach", netns=env.pod_ns_path)
    try:
        problems = backend.check(target, spec)
        assert any("tcx program" in p for p in problems), problems
    finally:
        in_child(TCX, "detach", netns=env.pod_ns_path)
    backend.apply(target, spec)
    quiet_check(backend, target, spec)


# Polls answered without a look (`EbpfBackend.unchanged`: the agent's drift pass skips those pods).


def answered(backend: EbpfBackend, target: PodTarget, spec: SidecarSpec | AmbientSpec = SPEC) -> None:
    """Checks (each finding the pod intact) until a poll is answered without a look."""
    time.sleep(0.05)  # the pin directory's mtime older than the coarse clock's tick
    for _ in range(TRIES):  # another process on the machine may move the count meanwhile
        assert backend.check(target, spec) == []
        if backend.unchanged([(target.uid, spec, False)]) == {target.uid}:
            return
    pytest.fail(f"no poll in {TRIES} was answered without a look")


@pytest.mark.parametrize("kind", ["program detached", "node entry gone", "pin removed", "node pin removed"])
def test_tampering_ends_the_unread_polls_and_the_next_check_finds_it(
    env: PodEnv, backend: EbpfBackend, target: PodTarget, kind: str
) -> None:
    backend.apply(target, SPEC)
    answered(backend, target)
    unread = backend.intact.unread
    pdir = backend.state_dir / "bpf" / target.uid
    node = backend.state_dir / "bpf" / pinning.NODE_DIR
    if kind == "program detached":  # bpf(2): the count moves
        in_child(DETACH, str(pdir / "hr_connect4"), str(env.cgroup), str(bpfsys.ATTACH_CGROUP_INET4_CONNECT))
        want = "hr_connect4 is not attached"
    elif kind == "node entry gone":
        in_child(DROP_ENTRIES, str(node / pod_index.CONFIG))
        want = "no entry in the node's eBPF pod config map"
    elif kind == "pin removed":  # an unlink on the bpffs: no bpf(2) call, the pin directory's watch tells
        in_child(UNPIN, str(pdir / "hr_connect4"))
        want = "hr_connect4 is not pinned"
    else:  # the node's pin directory: no pod is answered for this pass (each pod's own read decides)
        in_child(UNPIN, str(node / pod_index.CONFIG))
        want = "node"
    assert backend.unchanged([(target.uid, SPEC, False)]) == set()
    assert backend.intact.unread == unread
    problems = backend.check(target, SPEC)
    assert any(want in p for p in problems), problems
    backend.apply(target, SPEC)  # repaired, then answered for again
    answered(backend, target)


def test_tc_announcements_and_applies_end_the_unread_polls(
    env: PodEnv, backend: EbpfBackend, target: PodTarget
) -> None:
    """Inbound on TC: a filter added in the pod netns (rtnetlink announces it, no bpf(2) call) is not
    answered for; nor is a pod just applied (its next poll reads it)."""
    spec = SidecarSpec()
    backend.apply(target, spec)
    answered(backend, target, spec)
    subprocess.run(["tc", "-n", env.pod_ns, "filter", "add", "dev", "eth0", "ingress", "pref", "1", "u32", "match",
                    "u32", "0", "0"], check=True)
    assert backend.unchanged([(target.uid, spec, False)]) == set()
    problems = backend.check(target, spec)
    assert any("foreign" in p or "ahead" in p for p in problems), problems
    backend.apply(target, spec)
    answered(backend, target, spec)
    backend.apply(target, spec)  # intact: nothing changes, yet the pod is read again before it is answered for
    assert backend.unchanged([(target.uid, spec, False)]) == set()
    answered(backend, target, spec)


@pytest.fixture
def rules_inbound(tmp_path: Path) -> Iterator[EbpfBackend]:
    """A backend whose pods' inbound goes on the iptables fallback (a rules part in their check)."""
    from node_agent.backends.iptables.backend import IptablesBackend

    for b in ebpf_backend(tmp_path / "state2", change_count=True, inbound_fallback=IptablesBackend("nft")):
        b.intact = intact_cache.IntactPods(lambda: 1000.0)
        yield b


def test_only_polls_of_the_ebpf_part_alone_are_answered(
    env: PodEnv, rules_inbound: EbpfBackend, target: PodTarget
) -> None:
    """A pod whose check has a rules part (inbound on the iptables fallback) is answered for only when the
    unannounced part alone is due."""
    b, spec = rules_inbound, SidecarSpec()
    b.apply(target, spec)
    try:
        time.sleep(0.05)
        for _ in range(TRIES):
            assert b.check(target, spec) == []
            if b.unchanged([(target.uid, spec, True)]) == {target.uid}:
                break
        else:
            pytest.fail("the unannounced part was never answered for")
        assert b.unchanged([(target.uid, spec, False)]) == set()
    finally:
        b.remove(target)


def count_moved_by(backend: EbpfBackend, *args: str) -> bool:
    """Whether another process's map writes (`MAP_WRITES` with args) moved the count; a move by somebody
    else on the machine meanwhile is told apart by trying again."""
    watch = backend.changes.watch
    assert watch is not None
    for _ in range(TRIES):
        before = watch.generation()
        in_child(MAP_WRITES, *args)
        after = watch.generation()
        assert before is not None and after is not None
        if after == before:
            return False
        if after - before == 12:  # five updates, five deletes, two batches: all of them, nobody else's
            return True
    pytest.fail(f"the count moved by other processes in each of {TRIES} tries")


@pytest.mark.skipif(not btf_layout.VMLINUX.exists(), reason="this kernel has no BTF: every map write counts")
def test_writes_on_maps_that_are_not_ours_do_not_move_the_count(
    env: PodEnv, backend: EbpfBackend, target: PodTarget
) -> None:
    """Another eBPF agent writing its own maps (element and batch commands) leaves the count still, so the
    pods' polls stay unread; writes on ours, or on any map named like ours, count."""
    backend.apply(target, SPEC)
    answered(backend, target)
    assert backend.changes.watch is not None and backend.changes.watch.maps_told_apart
    assert not count_moved_by(backend, "cilium_ct4_glob")
    assert backend.unchanged([(target.uid, SPEC, False)]) == {target.uid}
    assert count_moved_by(backend, "hr_lookalike")
    assert count_moved_by(backend, "", str(backend.state_dir / "bpf" / pinning.NODE_DIR / pod_index.CONFIG))
    assert backend.unchanged([(target.uid, SPEC, False)]) == set()
    problems = backend.check(target, SPEC)
    assert problems == [] or any("node" in p for p in problems), problems  # the batch left the entry as it was


def test_without_the_kernels_btf_every_map_write_counts(
    env: PodEnv, backend: EbpfBackend, target: PodTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(btf_layout, "VMLINUX", tmp_path / "no-btf")
    backend.apply(target, SPEC)
    quiet_check(backend, target)
    assert backend.changes.watch is not None and not backend.changes.watch.maps_told_apart
    assert count_moved_by(backend, "cilium_ct4_glob")
