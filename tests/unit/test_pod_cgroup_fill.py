"""Where the agent takes a pod's cgroup from (eBPF nodes): the kubelet's directory for the pod when there is
one (a few stats, no /proc scan), else the pod's processes (pure, a private tmp dir as the cgroup root)."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_agent.backends.ebpf import pod_cgroup
from node_agent.netns.finder import NetnsLocation
from node_agent.reconcile.pod_netns import PodNetns, Scan
from node_agent.reconcile.state import PodState

from cni.contract.spec import SidecarSpec

UID = "0f6d8a3c-2b1e-4c1a-9a55-7d2f7f1c0e11"


def _state() -> PodState:
    return PodState(uid=UID, namespace="default", name="app", mode="sidecar", spec=SidecarSpec(), inode=7)


def _netns() -> PodNetns:
    return PodNetns(None, dict, lambda u, ips: None, lambda p: (), needs_cgroup=True)  # type: ignore[arg-type,return-value]


def test_the_kubelets_directory_is_taken_without_a_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pod_dir = tmp_path / "kubepods" / "burstable" / f"pod{UID}"
    pod_dir.mkdir(parents=True)
    monkeypatch.setenv(pod_cgroup.ROOTS_ENV, str(tmp_path))

    def no_scan() -> dict[str, list[NetnsLocation]]:
        raise AssertionError("scanned /proc although the kubelet's directory was there")

    st = _state()
    _netns().fill_cgroup(st, Scan(no_scan))
    assert st.cgroup_path == str(pod_dir)


def test_without_it_the_pods_process_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pod_cgroup.ROOTS_ENV, str(tmp_path))  # nothing below it
    other_netns = NetnsLocation(UID, 11, "/proc/11/ns/net", 8, "/elsewhere")
    own = NetnsLocation(UID, 12, "/proc/12/ns/net", 7, "/sys/fs/cgroup/machine.slice/app")
    st = _state()
    _netns().fill_cgroup(st, Scan(lambda: {UID: [other_netns, own]}))
    assert st.cgroup_path == "/sys/fs/cgroup/machine.slice/app"
    st = _state()
    _netns().fill_cgroup(st, Scan(lambda: {}))
    assert st.cgroup_path is None
