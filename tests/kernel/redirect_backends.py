"""Kernel-test fixtures that install pod redirection through a RedirectBackend, one of four:

    iptables-legacy   IptablesBackend("legacy")
    iptables-nft      IptablesBackend("nft")
    nftables          NftablesBackend() (one `table inet headrace`, libnftables in-process)
    ebpf              EbpfBackend(<node state dir>, proxy_cgroup=<node proxy cgroup>)

so one test body proves the same behaviour on each. The node (`make_node(headrace=None, pod_cgroups=True)`)
has only bridge + host-local in its chain: nothing but the backend under test redirects. Every pod has a
cgroup v2 directory (kubelet-like), and the tests run the app's clients and the sidecar proxy's listeners
inside it (`cgroup=pod.cgroup`), the ambient node proxy's listeners in the node's proxy cgroup: cgroup eBPF
programs act only on their cgroup's processes, iptables ignores cgroups, so the same traffic serves all.

    @over_backends_and_families()                  # test ids [iptables-legacy-4] ... [ebpf-6]
    def test_x(redirect: Redirect, family: int) -> None:
        app = redirect.pod("app")
        redirect.apply(app, SidecarSpec())        # backend.apply + backend.check == []

Teardown removes what each backend installed (backend.remove, then nothing of ours may be left) and
unmounts the eBPF backend's bpffs; the node fixture then removes pods, netns and cgroups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from node_agent.backends.base import PodTarget, RedirectBackend, RedirectSpec

from cni.kernel.flavour import Flavour
from tests.harness.node import Pod, SimNode

BACKENDS = ("iptables-legacy", "iptables-nft", "nftables", "ebpf")
FAMILIES = (4, 6)


def ip(pod: Pod, family: int) -> str:
    return pod.ipv4 if family == 4 else pod.ipv6


def pod_target(pod: Pod, families: tuple[int, ...] = FAMILIES) -> PodTarget:
    """The PodTarget the agent would build for a pod (its IPs of the given families, its pod cgroup)."""
    ips = tuple(e["address"] for e in pod.result.get("ips", []) if (6 if ":" in e["address"] else 4) in families)
    return PodTarget(
        uid=pod.uid,
        namespace=pod.namespace,
        name=pod.name,
        netns_path=pod.netns.path,
        ips=ips,
        cgroup_path=pod.pod_cgroup,
    )


@dataclass
class Redirect:
    """The backend under test on one simulated node, and the pods it redirected (removed in teardown)."""

    name: str
    backend: RedirectBackend
    node: SimNode
    proxy_cgroup: str  # the ambient node proxy's cgroup v2 dir (where its listeners run)
    targets: dict[str, PodTarget] = field(default_factory=dict)

    @property
    def flavour(self) -> Flavour | None:
        """The iptables flavour of an iptables backend, None for nftables and eBPF."""
        if self.name == "iptables-legacy":
            return "legacy"
        if self.name == "iptables-nft":
            return "nft"
        return None

    def pod(self, name: str, namespace: str = "default") -> Pod:
        return self.node.add_pod(namespace, name)

    def pods(self, n: int) -> list[Pod]:
        return [self.pod(f"p{i}") for i in range(n)]

    def target(self, pod: Pod, families: tuple[int, ...] = FAMILIES) -> PodTarget:
        return pod_target(pod, families)

    def apply(self, pod: Pod, spec: RedirectSpec, families: tuple[int, ...] = FAMILIES) -> PodTarget:
        """Install spec in the pod through the backend (re-applying replaces); the backend finds it intact."""
        target = self.target(pod, families)
        self.targets[pod.uid] = target
        self.backend.apply(target, spec)
        assert self.backend.check(target, spec) == [], f"{self.name}: redirection not intact after apply"
        return target

    def remove_all(self) -> list[str]:
        """backend.remove for every pod applied (each tried, even after a failure); the pods that still
        have something of ours afterwards, or whose removal failed."""
        left: list[str] = []
        for uid, target in list(self.targets.items()):
            del self.targets[uid]
            try:
                self.backend.remove(target)
                if self.backend.installed(target):
                    left.append(uid)
            except Exception as exc:  # teardown: report every pod, still remove the others
                left.append(f"{uid} ({exc})")
        return left


def _ebpf_problems() -> list[str]:
    from node_agent.backends.select import ebpf_problems

    return list(ebpf_problems())


def make_backend(name: str, node: SimNode) -> RedirectBackend:
    if name == "ebpf":
        problems = _ebpf_problems()
        if problems:
            pytest.skip(f"eBPF cannot run here: {'; '.join(problems)}")
        from node_agent.backends.ebpf.backend import EbpfBackend

        return EbpfBackend(node.state_dir, proxy_cgroup=node.proxy_cgroup())
    if name == "nftables":
        from node_agent.backends.nftables.backend import NftablesBackend

        return NftablesBackend()
    from node_agent.backends.iptables.backend import IptablesBackend

    return IptablesBackend(name.removeprefix("iptables-"))


def redirect_fixture(make_node: Callable[..., SimNode], name: str) -> Iterator[Redirect]:
    """Body of the `redirect` fixture (a test module defines the fixture with request.param)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    node = make_node(headrace=None, pod_cgroups=True)
    backend = make_backend(name, node)
    rd = Redirect(name, backend, node, str(node.proxy_cgroup()))
    try:
        yield rd
    finally:
        try:
            left = rd.remove_all()
        finally:
            backend.close()  # the descriptors it holds (eBPF: the node maps and programs)
            if name == "ebpf":
                from node_agent.backends.ebpf import pinning

                pinning.unmount_bpffs(node.state_dir)
        assert not left, f"{name}: something of ours left after remove in pods {left}"


def _param(values: tuple[Any, ...], reason: str | None) -> pytest.ParameterSet:
    marks: list[pytest.MarkDecorator] = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(*values, marks=marks, id="-".join(str(v) for v in values))


def over_backends(xfail: Mapping[str, str] | None = None) -> pytest.MarkDecorator:
    """Parametrize the `redirect` fixture over BACKENDS; xfail maps a backend to a (strict) xfail reason."""
    xf = dict(xfail or {})
    return pytest.mark.parametrize("redirect", [_param((b,), xf.get(b)) for b in BACKENDS], indirect=True)


def over_backends_and_families(
    families: tuple[int, ...] = FAMILIES, xfail: Mapping[tuple[str, int], str] | None = None
) -> pytest.MarkDecorator:
    """Parametrize (`redirect`, `family`) over BACKENDS x families; ids like `ebpf-6`."""
    xf = dict(xfail or {})
    params = [_param((b, f), xf.get((b, f))) for b in BACKENDS for f in families]
    return pytest.mark.parametrize(("redirect", "family"), params, indirect=["redirect"])
