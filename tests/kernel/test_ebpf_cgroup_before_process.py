"""The runtime's real order (containerd, CRI-O): the kubelet makes the pod-level cgroup, the CNI ADD runs
while no process of the pod exists, then the first process starts in that cgroup. The pod's cgroup is
found from its uid (both kubelet drivers, under a configurable root), the eBPF programs attach at ADD,
and the first process's traffic is redirected."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni.contract.spec import SidecarSpec
from tests.kernel.ebpf_fixtures import PodEnv, make_cgroup, pod_env, remove_cgroup, suffix

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
pytest.importorskip("bcc")

from node_agent.backends.ebpf import pinning, pod_cgroup  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402
from node_agent.reconcile.pod_netns import PodNetns, Scan  # noqa: E402
from node_agent.reconcile.state import PodState  # noqa: E402

UID = "7d1c3e52-2b4f-4e55-8a0e-1f6a9c2d4b11"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def cgroup_root(env: PodEnv) -> Iterator[Path]:
    """A private stand-in for the node's cgroup root (the kubelet's tree goes below it)."""
    root = make_cgroup(env.cgroup.parent / f"headrace-test-root-{suffix()}")
    try:
        yield root
    finally:
        remove_cgroup(root)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[EbpfBackend]:
    state = tmp_path / "state"
    yield EbpfBackend(state)
    pinning.unmount_bpffs(state)


@pytest.mark.parametrize(
    "rel",
    [
        f"kubepods/burstable/pod{UID}",
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice",
        f"kubepods/pod{UID}",  # cgroupfs, Guaranteed
    ],
)
def test_cgroup_dir_first_then_add_then_first_process(env, cgroup_root, backend, monkeypatch, rel):
    # 1. the kubelet creates the pod cgroup; no process in it
    pod_dir = cgroup_root / rel
    pod_dir.mkdir(parents=True)
    assert (pod_dir / "cgroup.procs").read_text() == ""
    # 2. ADD: the agent finds the directory from the uid alone (the root configured as on a node)
    monkeypatch.setenv(pod_cgroup.ROOTS_ENV, str(cgroup_root))
    st = PodState(uid=UID, namespace="default", name="app", mode="sidecar", spec=SidecarSpec(),
                  netns=env.pod_ns_path, inode=1)
    netns = PodNetns(None, dict, lambda u, ips: None, lambda p: (), needs_cgroup=True)  # type: ignore[arg-type,return-value]
    netns.fill_cgroup(st, Scan(lambda: {}))
    assert st.cgroup_path == str(pod_dir)
    target = dataclasses.replace(env.target(), uid=UID, cgroup_path=st.cgroup_path)
    backend.apply(target, SidecarSpec(include_inbound_ports=()))
    try:
        # 3. the pod's first process starts in its cgroup (a container below the pod level)
        container = pod_dir / "ctr1"
        container.mkdir()
        env.start_server(env.pod_ns, 15001, "proxy", cgroup=pod_dir)
        env.start_server(env.peer_ns, 8080, "server")
        got = env.connect(env.peer_v4, 8080, cgroup=container)
        assert got["ok"], got
        assert got["reply"]["name"] == "proxy" and got["reply"]["orig"] == f"{env.peer_v4}:8080"
    finally:
        env.close()
        backend.remove(target)
