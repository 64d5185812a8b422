"""Shared pytest fixtures: kernel-test gating and simulated nodes (tests/harness)."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from tests.harness.node import SimNode

KERNEL_DIR = Path(__file__).parent / "kernel"


CGROUP_PREFIXES = ("headrace-", "hrpm-")  # the nodes' and pods' cgroups (lab, eBPF fixtures), podman's parents


def leftovers() -> set[str]:
    """What tests must never leave behind: bpffs and nsfs mounts (pins, named netns), named netns and the
    cgroups the tests make."""
    out: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("bpf", "nsfs"):
                out.add(f"{fstype} mount {fields[4]}")
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        out |= {f"netns {p.name}" for p in netns_dir.iterdir()}
    for hierarchy in Path("/sys/fs/cgroup").glob("*/"):  # cgroup v2 (unified) and each v1 controller
        out |= {f"cgroup {p}" for p in hierarchy.glob("*") if p.name.startswith(CGROUP_PREFIXES) and p.is_dir()}
    return out


def terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (`kill`, a CI job cancelled, a timeout) ends the run the way Ctrl-C does: pytest then tears
    down every fixture in use, so the netns, cgroups, pod processes and mounts of the running tests go
    too. Python's default for SIGTERM is to die at once, without any teardown."""
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, terminated)


def sweep_stale() -> None:
    """What a run killed with SIGKILL left (no teardown can run then): its nodes' cgroup subtrees and the
    pod processes inside them, removed before this run starts."""
    if os.geteuid() != 0:
        return
    from node_agent.lab.simnode import remove_stale_node_cgroups

    for base in remove_stale_node_cgroups():
        print(f"removed {base}, left by a killed test run")


sweep_stale()
_AT_START = leftovers()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The whole run fails when it left a mount or a netns behind (each test removes its own, even on
    failure; a module- or session-scoped fixture by its end)."""
    left = sorted(leftovers() - _AT_START)
    if not left:
        return
    others = other_pytest_runs()
    if others:  # what they hold right now cannot be told apart from ours: say so, do not fail
        print(f"\nleft behind, or held by the other test runs on this machine (pids {others}):\n  "
              + "\n  ".join(left))
        return
    print("\nthe tests left these behind:\n  " + "\n  ".join(left))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def other_pytest_runs() -> list[int]:
    """Pids of other pytest processes (a developer's parallel runs; never the case in CI)."""
    ours = {os.getpid(), os.getppid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"pytest") or arg == b"pytest" for arg in argv[:3]):
            found.append(int(entry.name))
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/kernel is a kernel test; skip those clearly when not root."""
    for item in items:
        if KERNEL_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="kernel tests need root")
        for item in items:
            if "kernel" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., SimNode]]:
    """Factory for simulated nodes; every node (its pods, netns, bridge) is removed after the test."""
    nodes: list[SimNode] = []

    def factory(**kwargs: Any) -> SimNode:
        node = SimNode.create(tmp_path / f"node{len(nodes)}", **kwargs)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.close()


@pytest.fixture
def sim_node(make_node: Callable[..., SimNode]) -> SimNode:
    """A dual-stack node whose chain is bridge + host-local + headrace-cni (default settings)."""
    return make_node(headrace={})


@pytest.fixture
def plain_node(make_node: Callable[..., SimNode]) -> SimNode:
    """A dual-stack node whose chain is only bridge + host-local (no headrace)."""
    return make_node(headrace=None)


def have(binary: str) -> bool:
    return shutil.which(binary) is not None


@pytest.fixture(scope="session", autouse=True)
def shared_bpf_object_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One compiled eBPF object for the whole session: every agent a test starts (each with a fresh state
    dir) reads it instead of compiling again (seconds each on a loaded machine)."""
    if os.environ.get("HEADRACE_BPF_CACHE_DIR"):
        yield
        return
    cache = tmp_path_factory.mktemp("bpf-cache")
    cache.chmod(0o700)
    os.environ["HEADRACE_BPF_CACHE_DIR"] = str(cache)
    try:
        yield
    finally:
        os.environ.pop("HEADRACE_BPF_CACHE_DIR", None)
