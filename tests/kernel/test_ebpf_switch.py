"""eBPF next to the iptables backend: switching a pod between them, and the hybrid (inbound via iptables)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.backends.base import PodTarget

from cni.contract.spec import SidecarSpec
from tests.kernel.ebpf_fixtures import PodEnv, pod_env

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
pytest.importorskip("bcc")
iptables_backend = pytest.importorskip("node_agent.backends.iptables.backend")

from node_agent.backends.ebpf import pinning  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402

OUT_ONLY = SidecarSpec(include_inbound_ports=())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def backends(tmp_path: Path, env: PodEnv) -> Iterator[tuple[EbpfBackend, object, PodTarget]]:
    state = tmp_path / "state"
    ipt = iptables_backend.IptablesBackend("auto")
    ebpf = EbpfBackend(state)
    target = env.target()
    yield ebpf, ipt, target
    try:
        ebpf.remove(target)
        ipt.remove(target)
    finally:
        pinning.unmount_bpffs(state)


def outbound_lands_on_proxy(env: PodEnv) -> None:
    got = env.connect(env.peer_v4, 8080)
    assert got["ok"], got
    assert got["reply"]["name"] == "proxy", got
    assert got["reply"]["orig"] == f"{env.peer_v4}:8080"


def test_switch_iptables_to_ebpf_and_back(env, backends):
    ebpf, ipt, target = backends
    env.start_server(env.pod_ns, 15001, "proxy", cgroup=env.cgroup)
    env.start_server(env.peer_ns, 8080, "server")
    ipt.apply(target, OUT_ONLY)
    outbound_lands_on_proxy(env)
    ipt.remove(target)
    ebpf.apply(target, OUT_ONLY)
    assert ebpf.check(target, OUT_ONLY) == []
    outbound_lands_on_proxy(env)
    ebpf.remove(target)
    ipt.apply(target, OUT_ONLY)
    outbound_lands_on_proxy(env)
    assert not ebpf.installed(target)


def test_hybrid_inbound_via_iptables(env, backends, tmp_path):
    ebpf, ipt, target = backends
    hybrid = EbpfBackend(ebpf.state_dir, inbound_fallback=ipt)
    env.start_server(env.pod_ns, 15001, "proxy", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=env.cgroup)
    env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)
    env.start_server(env.peer_ns, 8080, "server")
    hybrid.apply(target, SidecarSpec())
    assert hybrid.check(target, SidecarSpec()) == []
    outbound_lands_on_proxy(env)
    got = env.connect_from_peer(env.pod_v4, 8080)
    assert got["reply"]["name"] == "inbound-proxy" and got["reply"]["orig"] == f"{env.pod_v4}:8080"
    hybrid.remove(target)
    assert not hybrid.installed(target)
    assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"
    assert env.connect(env.peer_v4, 8080)["reply"]["name"] == "server"


def test_hybrid_ambient_inbound_via_iptables(env, backends, tmp_path):
    from cni.contract.spec import AmbientSpec
    from tests.kernel.ebpf_fixtures import make_cgroup, remove_cgroup

    ebpf, ipt, target = backends
    proxy_cg = make_cgroup(Path(f"{env.cgroup}-proxy"))
    try:
        hybrid = EbpfBackend(ebpf.state_dir, inbound_fallback=ipt, proxy_cgroup=proxy_cg)
        env.start_server(env.pod_ns, 15001, "proxy", cgroup=proxy_cg)
        env.start_server(env.pod_ns, 15006, "inbound-proxy", cgroup=proxy_cg)
        env.start_server(env.pod_ns, 8080, "app", cgroup=env.cgroup)
        env.start_server(env.peer_ns, 8080, "server")
        hybrid.apply(target, AmbientSpec())
        assert hybrid.check(target, AmbientSpec()) == []
        outbound_lands_on_proxy(env)
        got = env.connect_from_peer(env.pod_v4, 8080)
        assert got["reply"]["name"] == "inbound-proxy" and got["reply"]["orig"] == f"{env.pod_v4}:8080"
        assert env.connect(env.peer_v4, 8080, mark=0x539)["reply"]["name"] == "server"
        hybrid.remove(target)
        assert env.connect_from_peer(env.pod_v4, 8080)["reply"]["name"] == "app"
    finally:
        env.close()
        remove_cgroup(proxy_cg)
