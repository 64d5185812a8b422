"""The eBPF drift poll's shortcut (`intact_cache`): a pod found intact is read back with one stat, one map
lookup and one query per hook (and, with inbound on TC, its netns' TC announcements and a tcx query).
Each kind of tampering with its redirection after that is still found by the next check, the full read
comes back after `FULL_EVERY`, and a changed spec is never answered from the shortcut. Real programs on
a real cgroup, bpffs, TC filters and tcx."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_agent.backends import full_reads
from node_agent.backends.base import PodTarget

from cni.contract.spec import SidecarSpec
from cni.kernel.netns import run_in_thread
from tests.kernel.ebpf_fixtures import PodEnv, drop_node_config_entries, ebpf_backend, pod_env, removed_after

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
bcc = pytest.importorskip("bcc")

from node_agent.backends.ebpf import bpfsys, intact_cache, maps, pinning, tc  # noqa: E402
from node_agent.backends.ebpf.attach import Cgroup  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402

SPEC = SidecarSpec(include_inbound_ports=())  # outbound only: no TC part, so the shortcut applies
ALLOW = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1; exit


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend(tmp_path: Path, clock: Clock) -> Iterator[EbpfBackend]:
    for b in ebpf_backend(tmp_path / "state"):  # closed and unmounted when the test is done
        b.intact = intact_cache.IntactPods(clock)
        yield b


@pytest.fixture
def target(env: PodEnv, backend: EbpfBackend) -> Iterator[PodTarget]:
    yield from removed_after(env, backend)


def foreign_connect4() -> int:
    return bpfsys.prog_load(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, ALLOW, "hrtest_c4", bpfsys.ATTACH_CGROUP_INET4_CONNECT)


def detach_ours(env: PodEnv, backend: EbpfBackend, target: PodTarget) -> None:
    fd = pinning.open_pinned(backend.state_dir / "bpf" / target.uid / "hr_connect4")
    assert fd is not None
    try:
        with Cgroup(env.cgroup) as c:
            c.detach(fd, bpfsys.ATTACH_CGROUP_INET4_CONNECT)
    finally:
        os.close(fd)


def attach_foreign(env: PodEnv, backend: EbpfBackend, target: PodTarget) -> None:
    fd = foreign_connect4()
    try:
        with Cgroup(env.cgroup) as c:
            bpfsys.prog_attach(fd, c.fd, bpfsys.ATTACH_CGROUP_INET4_CONNECT, bpfsys.F_ALLOW_MULTI)
    finally:
        os.close(fd)


def unpin_ours(env: PodEnv, backend: EbpfBackend, target: PodTarget) -> None:
    pinning.unpin(backend.state_dir / "bpf" / target.uid / "hr_connect4")


def pin_unwanted(env: PodEnv, backend: EbpfBackend, target: PodTarget) -> None:
    fd = foreign_connect4()
    try:
        bpfsys.obj_pin(fd, str(backend.state_dir / "bpf" / target.uid / "hr_tc_ingress"))
    finally:
        os.close(fd)


def drop_node_entry(env: PodEnv, backend: EbpfBackend, target: PodTarget) -> None:
    drop_node_config_entries(backend.state_dir)


TAMPERING: dict[str, tuple[Callable[[PodEnv, EbpfBackend, PodTarget], None], str]] = {
    "program detached": (detach_ours, "hr_connect4 is not attached"),
    "foreign program at our hook": (attach_foreign, "foreign eBPF program"),
    "program unpinned": (unpin_ours, "hr_connect4 is not pinned"),
    "unwanted program pinned": (pin_unwanted, "hr_tc_ingress is installed but not wanted"),
    "node entry gone": (drop_node_entry, "no entry in the node's eBPF pod config map"),
}


def read_intact(backend: EbpfBackend, target: PodTarget, spec: SidecarSpec = SPEC) -> None:
    """A full read finds the pod intact and the next check takes the shortcut (the pin directory's mtime
    must be older than the coarse clock's tick first)."""
    time.sleep(0.05)
    assert backend.check(target, spec) == []
    shortcuts = backend.intact.shortcuts
    assert backend.check(target, spec) == [] and backend.intact.shortcuts == shortcuts + 1


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_tampering_after_an_intact_read_is_found(env: PodEnv, backend: EbpfBackend, target: PodTarget,
                                                 kind: str) -> None:
    tamper, finding = TAMPERING[kind]
    backend.apply(target, SPEC)
    read_intact(backend, target)
    shortcuts = backend.intact.shortcuts
    tamper(env, backend, target)  # at once: within the tick of the last read for the pins
    problems = backend.check(target, SPEC)
    assert any(finding in p for p in problems), problems
    assert backend.intact.shortcuts == shortcuts
    backend.apply(target, SPEC)  # the repair
    read_intact(backend, target)


def test_a_pin_directory_changed_in_the_tick_of_the_full_read_is_not_remembered(
        env: PodEnv, backend: EbpfBackend, target: PodTarget) -> None:
    """bpffs takes file times from the coarse clock: two changes in one tick leave one mtime, so a read in
    the tick of a change must not be the reference for the next ones."""
    backend.apply(target, SPEC)
    shortcuts = backend.intact.shortcuts
    pdir = str(backend.state_dir / "bpf" / target.uid)
    for _ in range(50):  # a full read in the same tick as the apply's last pin (retried until one is)
        assert backend.check(target, SPEC) == []
        if pinning.dir_identity(pdir)[1] >= time.clock_gettime_ns(pinning.CLOCK_REALTIME_COARSE):
            break
        backend.apply(target, dataclasses.replace(SPEC, exclude_outbound_ports=(9999,)))
        backend.apply(target, SPEC)
    else:
        pytest.fail("no full read in the tick of a pin change in 50 tries")
    unpin_ours(env, backend, target)
    assert any("hr_connect4 is not pinned" in p for p in backend.check(target, SPEC))
    assert backend.intact.shortcuts == shortcuts


def test_the_full_read_comes_back_and_a_new_spec_is_never_answered_by_the_shortcut(
        env: PodEnv, backend: EbpfBackend, target: PodTarget, clock: Clock) -> None:
    """The pod's pinned config changed (nothing runs from it: only the full read compares it with the
    node's entry and the wanted spec) is found once FULL_EVERY has passed; a check against another spec
    reads in full at once."""
    backend.apply(target, SPEC)
    read_intact(backend, target)
    fd = pinning.open_pinned(backend.state_dir / "bpf" / target.uid / "hr_cfg")
    assert fd is not None
    try:
        raw = bpfsys.map_lookup(fd, b"\0\0\0\0", maps.CONFIG_SIZE)
        assert raw is not None
        bpfsys.map_update(fd, b"\0\0\0\0", bytes(len(raw)))
    finally:
        os.close(fd)
    assert backend.check(target, SPEC) == []  # the shortcut: nothing it reads changed
    clock.t += full_reads.FULL_EVERY
    assert backend.check(target, SPEC) != []
    backend.apply(target, SPEC)
    read_intact(backend, target)
    shortcuts = backend.intact.shortcuts
    assert backend.check(target, SidecarSpec(include_inbound_ports=(), exclude_outbound_ports=(9999,))) != []
    assert backend.intact.shortcuts == shortcuts


TC_SPEC = SidecarSpec()  # inbound on TC: the shortcut stands on the netns' TC and link announcements


def in_pod(env: PodEnv, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", env.pod_ns, *argv], check=True)


def tc_filter_deleted(env: PodEnv) -> None:
    in_pod(env, "tc", "filter", "del", "dev", "eth0", "ingress", "pref", str(tc.HR_PRIO), "handle", "1", "bpf")


def foreign_filter_ahead(env: PodEnv) -> None:
    in_pod(env, "tc", "filter", "add", "dev", "eth0", "ingress", "pref", "1", "u32", "match", "u32", "0", "0")


def interface_added(env: PodEnv) -> None:
    in_pod(env, "ip", "link", "add", "hrv0", "type", "veth", "peer", "name", "hrv1")


def tcx_program(env: PodEnv) -> None:
    """A tcx ingress program (bpf(2): nothing announced) that passes every packet, before our filters."""
    prog = bpfsys.prog_load(bpfsys.PROG_TYPE_SCHED_CLS, bytes.fromhex("b7000000000000009500000000000000"),
                            "hrtest_tcx", 0)

    def attach() -> None:
        bpfsys.prog_attach(prog, socket.if_nametoindex("eth0"), bpfsys.ATTACH_TCX_INGRESS, 0)

    try:
        run_in_thread(env.pod_ns_path, attach, name="test-tcx")
    finally:
        os.close(prog)


TC_TAMPERING: dict[str, tuple[Callable[[PodEnv], None], str]] = {
    "our filter deleted": (tc_filter_deleted, "TC ingress program missing on eth0"),
    "foreign filter ahead": (foreign_filter_ahead, "foreign TC u32 filter pref 1"),
    "interface added": (interface_added, "TC ingress program missing on hrv0"),
    "tcx program": (tcx_program, "tcx program"),
}


@pytest.mark.parametrize("kind", list(TC_TAMPERING))
def test_tc_tampering_after_an_intact_read_is_found(env: PodEnv, backend: EbpfBackend, target: PodTarget,
                                                    kind: str) -> None:
    tamper, finding = TC_TAMPERING[kind]
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
    backend.apply(target, TC_SPEC)
    read_intact(backend, target, TC_SPEC)
    shortcuts = backend.intact.shortcuts
    tamper(env)
    problems = backend.check(target, TC_SPEC)
    assert any(finding in p for p in problems), problems
    assert backend.intact.shortcuts == shortcuts
    if kind == "tcx program":
        detach_tcx(env)
    backend.apply(target, TC_SPEC)  # the repair
    read_intact(backend, target, TC_SPEC)
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "inbound-proxy"


def detach_tcx(env: PodEnv) -> None:
    def detach() -> None:
        index = socket.if_nametoindex("eth0")
        for prog_id, link_id in bpfsys.tcx_query(index, bpfsys.ATTACH_TCX_INGRESS):
            bpfsys.tcx_detach(index, bpfsys.ATTACH_TCX_INGRESS, prog_id, link_id)

    run_in_thread(env.pod_ns_path, detach, name="test-tcx")


def test_tc_watches_are_closed_with_their_pod(env: PodEnv, backend: EbpfBackend, target: PodTarget) -> None:
    """A TC watch socket holds its netns: it goes when the pod's redirection is removed."""
    backend.apply(target, TC_SPEC)
    read_intact(backend, target, TC_SPEC)
    fds = len(os.listdir("/proc/self/fd"))
    backend.remove(target)
    assert len(os.listdir("/proc/self/fd")) == fds - 1
