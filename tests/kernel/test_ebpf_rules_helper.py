"""An eBPF ambient pod's rules part written by the rules helper child (a real pod netns and cgroup, real
iptables-nft rules): the same rules as the agent writes itself, recorded as verified; a helper killed,
stuck or failing never leaves a pod half-applied (the agent writes the rules, or the apply fails and takes
its eBPF part out); the helper ends with the process that started it. Traffic through these rules: the
agent-level ambient tests, whose agents run the helper on a node with two CPUs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_agent.backends.base import BackendError, PodTarget
from node_agent.backends.ebpf import loader, pinning
from node_agent.backends.ebpf.backend import EbpfBackend
from node_agent.backends.iptables.backend import IptablesBackend
from node_agent.backends.iptables.rules_helper import RulesHelper
from node_agent.kernel.netns_runner import staying_in

from cni.contract.spec import AmbientSpec
from tests.kernel.ebpf_fixtures import PodEnv, pod_env, proxy_cgroup_of, removed_after
from tests.unit.test_rules_helper import CHILD, gone, ready

pytestmark = pytest.mark.kernel

SPEC = AmbientSpec()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def proxy_cgroup(env: PodEnv) -> Iterator[Path]:
    yield from proxy_cgroup_of(env)


Make = Callable[..., tuple[EbpfBackend, IptablesBackend, RulesHelper]]


@pytest.fixture
def make(tmp_path: Path, proxy_cgroup: Path) -> Iterator[Make]:
    """An eBPF backend whose ambient inbound is iptables-nft, written by a helper (real, or a stand-in)."""
    made: list[tuple[EbpfBackend, Path]] = []
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def build(stand_in: str = "", **kw: float) -> tuple[EbpfBackend, IptablesBackend, RulesHelper]:
        command = [sys.executable, str(script), stand_in, "0"] if stand_in else None
        helper = RulesHelper("nft", command=command, **kw)
        inbound = IptablesBackend("nft")
        state = tmp_path / f"state{len(made)}"
        backend = EbpfBackend(state, proxy_cgroup=proxy_cgroup, ambient_inbound=inbound, rules_helper=helper)
        made.append((backend, state))
        loader.compile_object()
        backend.prepare()  # starts the helper
        ready(helper)
        return backend, inbound, helper

    yield build
    for backend, state in made:
        backend.close()
        pinning.unmount_bpffs(state)


@pytest.fixture
def target(env: PodEnv) -> PodTarget:
    return env.target()


def test_the_helper_writes_the_rules_the_agent_records_as_verified(make: Make, env: PodEnv, target: PodTarget) -> None:
    backend, inbound, helper = make()
    for _ in removed_after(env, backend):
        backend.apply(target, SPEC)
        assert helper.answered == 1 and helper.starts == 1
        assert backend.check(target, SPEC) == []
        assert inbound.shortcut is not None and inbound.shortcut.written(target.netns_path) is not None
        backend.remove(target)
        assert not backend.installed(target) and not inbound.installed(target)
        backend.apply(target, SPEC)  # again, once removed: the same
        assert helper.answered == 2 and backend.check(target, SPEC) == []


def test_a_killed_helper_leaves_the_agent_writing_until_it_is_back(make: Make, env: PodEnv, target: PodTarget) -> None:
    backend, _inbound, helper = make(restart_after=0.0)
    for _ in removed_after(env, backend):
        proc = helper._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        gone(helper)
        backend.apply(target, SPEC)  # written by the agent (and the helper started again)
        assert helper.answered == 0 and backend.check(target, SPEC) == []
        ready(helper)
        assert helper.starts == 2
        backend.remove(target)
        backend.apply(target, SPEC)
        assert helper.answered == 1 and backend.check(target, SPEC) == []


def test_a_stuck_helper_is_killed_and_the_pod_still_gets_its_rules(make: Make, env: PodEnv, target: PodTarget) -> None:
    backend, _inbound, helper = make("hang", reply_timeout=0.5, restart_after=60.0)
    stuck = helper._proc
    assert stuck is not None
    for _ in removed_after(env, backend):
        backend.apply(target, SPEC)
        assert stuck.poll() is not None and backend.check(target, SPEC) == []


def test_a_failed_rules_part_takes_a_new_pods_ebpf_part_out(make: Make, env: PodEnv, target: PodTarget) -> None:
    backend, inbound, helper = make("fail")
    for _ in removed_after(env, backend):
        with pytest.raises(BackendError, match="no such netns"):
            backend.apply(target, SPEC)
        assert helper.answered == 1
        assert not backend.installed(target) and not inbound.installed(target)
        assert not (backend.state_dir / "bpf" / pinning.pod_dir_name(target.uid)).exists()


PARENT = r"""
import sys, time
from node_agent.backends.iptables.rules_helper import RulesHelper
from node_agent.kernel.netns_runner import staying_in
helper = RulesHelper("nft")
helper.start()
while not helper.ready:
    time.sleep(0.01)
print(helper._proc.pid, flush=True)
time.sleep(60)
"""


def test_the_helper_ends_with_the_process_that_started_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5.0
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "the helper outlived the process that started it"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


def test_a_helper_started_from_inside_a_pod_netns_runs_in_the_agents_own(env: PodEnv) -> None:
    """A restart comes from an apply thread, inside a pod netns: the child must not start there (it would
    keep that netns alive)."""
    helper = RulesHelper("nft")
    try:
        with staying_in(env.pod_ns_path):
            helper.start()
        ready(helper)
        assert helper._proc is not None
        assert os.stat(f"/proc/{helper._proc.pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    finally:
        helper.stop()
