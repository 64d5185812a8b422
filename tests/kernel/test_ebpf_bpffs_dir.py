"""--bpffs-dir on the real kernel: the pins kept in a directory of the node's bpffs, bind-mounted at
<state-dir>/bpf, outlive the mount namespace of the agent's container; a restarted agent adopts the pod as it
is (the same programs attached, no window without them) where, with a bpffs of its own, it loads and attaches
everything again. The node's bpffs is one the test mounts under its temp dir (never the machine's
/sys/fs/bpf), unmounted afterwards."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni.contract.spec import SidecarSpec
from tests.kernel.ebpf_fixtures import PodEnv, pod_env

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
bcc = pytest.importorskip("bcc")

from node_agent.backends.ebpf import bpfsys, cgroup_programs, pinning  # noqa: E402
from node_agent.backends.ebpf.attach import Cgroup  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402

SIDECAR_OUT = SidecarSpec(include_inbound_ports=())
LOGGER = "headrace.backend.ebpf"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


def unmount_all(path: Path) -> None:
    """Every mount at path (the test's own: a bpffs or a bind)."""
    while pinning.mount_fstype(path) is not None:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


@pytest.fixture
def node_bpffs(tmp_path: Path) -> Iterator[Path]:
    """A bpffs instance of the test's own, standing for the node's /sys/fs/bpf."""
    mnt = tmp_path / "sys-fs-bpf"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        unmount_all(mnt)


@pytest.fixture
def state(tmp_path: Path, node_bpffs: Path) -> Iterator[Path]:
    """The agent's state dir; <state-dir>/bpf unmounted after (before the node's bpffs)."""
    path = tmp_path / "state"
    try:
        yield path
    finally:
        unmount_all(path / "bpf")


@pytest.fixture
def agents(state: Path) -> Iterator[Callable[..., EbpfBackend]]:
    """EbpfBackends on the state dir, as agents started one after another; those still open closed after."""
    made: list[EbpfBackend] = []

    def make(**options: Any) -> EbpfBackend:
        made.append(EbpfBackend(state, **options))
        return made[-1]

    yield make
    for b in made:
        if not b._closed:
            b.close()


def restart_container(backend: EbpfBackend) -> None:
    """The agent's container stops (a rolling update: a clean shutdown that leaves every pod as it is) and
    its mount namespace goes, with every mount made in it: <state-dir>/bpf."""
    backend.close()
    unmount_all(backend.state_dir / "bpf")


def attached_ids(cg: Path) -> set[int]:
    """The ids of the programs attached to the cgroup at the hooks we use."""
    with Cgroup(cg) as c:
        return {pid for atype in cgroup_programs.OUR_ATTACH_TYPES for pid in c.attached(atype)}


def apply_events(caplog: pytest.LogCaptureFixture, uid: str) -> list[str]:
    return [str(r.__dict__["event"]) for r in caplog.records
            if r.__dict__.get("pod") == uid and r.__dict__.get("event") in ("ebpf_intact", "ebpf_applied")]


def pin_foreign_program(path: Path) -> None:
    """Someone else's program pinned at path ('return 1')."""
    insns = bytes.fromhex("b7000000010000009500000000000000")
    fd = bpfsys.prog_load(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, insns, "foreign_c4", bpfsys.ATTACH_CGROUP_INET4_CONNECT)
    try:
        pinning.pin(fd, path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("in_node_bpffs", [True, False], ids=["bpffs-dir", "own-bpffs"])
def test_a_pod_is_adopted_after_a_container_restart_only_with_its_pins_in_the_nodes_bpffs(
        env, node_bpffs, state, agents, caplog, in_node_bpffs):
    node_dir = node_bpffs / "headrace"
    options = {"bpffs_dir": node_dir} if in_node_bpffs else {}
    (node_bpffs / "other").mkdir()  # another tool's pins beside ours
    pin_foreign_program(node_bpffs / "other" / "foreign_c4")
    env.start_server(env.pod_ns, 15001, "proxy", cgroup=env.cgroup)
    env.start_server(env.peer_ns, 8080, "server")
    target = env.target()
    caplog.set_level(logging.INFO, logger=LOGGER)

    first = agents(**options)
    first.apply(target, SIDECAR_OUT)
    assert pinning.mount_fstype(state / "bpf") == "bpf"  # a bind of a bpffs directory reads as a bpffs
    assert (node_dir / target.uid).is_dir() is in_node_bpffs
    if in_node_bpffs:
        assert node_dir.stat().st_mode & 0o777 == 0o700
    ids = attached_ids(env.cgroup)
    assert ids and env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"

    restart_container(first)
    assert pinning.mount_fstype(state / "bpf") is None
    caplog.clear()
    second = agents(**options)
    assert second.pinned_pods() == ([target.uid] if in_node_bpffs else [])  # before anything is mounted
    second.apply(target, SIDECAR_OUT)
    if in_node_bpffs:  # adopted: nothing loaded, detached or attached
        assert apply_events(caplog, target.uid) == ["ebpf_intact"]
        assert attached_ids(env.cgroup) == ids
    else:  # the pins went with the mount: every program loaded and attached again
        assert apply_events(caplog, target.uid) == ["ebpf_applied"]
        assert not attached_ids(env.cgroup) & ids
    assert second.check(target, SIDECAR_OUT) == []
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"

    second.remove(target)
    second.close()  # no pod left: our pins and the mount go, the node's other pins stay
    assert pinning.mount_fstype(state / "bpf") is None
    assert not node_dir.exists()
    assert pinning.pinned_prog_id(node_bpffs / "other" / "foreign_c4") is not None
    assert attached_ids(env.cgroup) == set()


def test_without_a_bpffs_above_the_directory_the_pins_stay_in_a_bpffs_of_its_own(env, tmp_path, state, agents, caplog):
    """A node with no bpffs at the directory's parent: warned, and the pod redirected all the same."""
    node_dir = tmp_path / "no-bpffs" / "headrace"
    node_dir.parent.mkdir()
    env.start_server(env.pod_ns, 15001, "proxy", cgroup=env.cgroup)
    env.start_server(env.peer_ns, 8080, "server")
    target = env.target()
    caplog.set_level(logging.INFO, logger=LOGGER)
    backend = agents(bpffs_dir=node_dir)
    backend.apply(target, SIDECAR_OUT)
    assert [r.__dict__.get("event") for r in caplog.records if r.levelno == logging.WARNING] == ["ebpf_pins_private"]
    assert not node_dir.exists()
    assert (state / "bpf" / target.uid).is_dir() and pinning.mount_fstype(state / "bpf") == "bpf"
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "proxy"
    backend.remove(target)
    backend.close()
    assert pinning.mount_fstype(state / "bpf") is None
