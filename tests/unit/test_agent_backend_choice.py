"""Which backend holds a pod: the node's, the fallback when the node's backend declines the spec
(fallback_reason) or (auto only) the pod's cgroup is unknown, and a clean move when the agent restarts with
another backend. Fakes only (no root)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node_agent.netns.finder import NetnsLocation
from node_agent.reconcile.loop import Reconciler

from tests.unit.agent_fakes import FakeBackend, FakeHub
from tests.unit.test_agent_reconcile import AMBIENT, UID, Env, pod


class FakeEbpf(FakeBackend):
    name = "ebpf"
    needs_cgroup = True

    def __init__(self, reason: str | None = None) -> None:
        super().__init__()
        self.reason = reason
        self.closed = 0
        self.cgroups: list[str | None] = []

    def fallback_reason(self, spec: object) -> str | None:
        return self.reason

    def apply(self, target: Any, spec: object) -> None:
        self.cgroups.append(target.cgroup_path)
        super().apply(target, spec)

    def close(self) -> None:
        self.closed += 1


class FakeIptables(FakeBackend):
    name = "iptables"


def make(env: Env, backend: FakeBackend, fallback: FakeBackend | None, *, cgroup_fallback: bool,
         factory: Any = None) -> Reconciler:
    env.backend = backend
    return Reconciler(
        env.store, backend, env.hub, env.pins, env.records,
        scan=env.scan, read_ips=lambda path: ("10.9.9.9",), find_by_ips=env.by_ips, conntrack=env.ct,
        clock=env.clock, fallback=fallback, cgroup_fallback=cgroup_fallback, backend_factory=factory,
    )


def with_cgroup(env: Env, cgroup: str | None) -> None:
    def scan() -> dict[str, list[NetnsLocation]]:
        import os

        return {u: [NetnsLocation(u, 100, str(p), os.stat(p).st_ino, cgroup)] for u, p in env.netns.items()}

    env.scan = scan  # type: ignore[method-assign]


def row(r: Reconciler, uid: str) -> dict[str, Any]:
    return next(x for x in r.status() if x["uid"] == uid)


def test_declined_spec_goes_to_the_fallback(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.fake_netns(UID)
    with_cgroup(env, "/sys/fs/cgroup/unified/k/pod" + UID)
    ebpf, ipt = FakeEbpf(reason="no proxy cgroup"), FakeIptables()
    r = make(env, ebpf, ipt, cgroup_fallback=False)
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert row(r, UID)["state"] == "enrolled" and row(r, UID)["backend"] == "iptables"
    assert ipt.rules == {UID: 1} and not ebpf.rules


def test_known_cgroup_goes_to_ebpf_with_the_cgroup(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.fake_netns(UID)
    cg = "/sys/fs/cgroup/unified/k/pod" + UID
    with_cgroup(env, cg)
    ebpf, ipt = FakeEbpf(), FakeIptables()
    r = make(env, ebpf, ipt, cgroup_fallback=True)
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert row(r, UID)["backend"] == "ebpf" and ebpf.cgroups == [cg] and not ipt.rules


def test_unknown_cgroup_falls_back_only_with_auto(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.fake_netns(UID)
    ebpf, ipt = FakeEbpf(), FakeIptables()
    r = make(env, ebpf, ipt, cgroup_fallback=True)  # auto
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert row(r, UID)["backend"] == "iptables" and ipt.rules == {UID: 1}

    (tmp_path / "forced").mkdir()
    env2 = Env(tmp_path / "forced")
    env2.fake_netns(UID)
    ebpf2, ipt2 = FakeEbpf(), FakeIptables()
    r2 = make(env2, ebpf2, ipt2, cgroup_fallback=False)  # ebpf forced: the node's backend, which refuses
    env2.set(AMBIENT, pod(UID))
    r2.reconcile()
    assert row(r2, UID)["backend"] == "ebpf" and not ipt2.rules


def test_restart_with_other_backend_moves_the_pod(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.fake_netns(UID)
    with_cgroup(env, "/sys/fs/cgroup/unified/k/pod" + UID)
    ipt = FakeIptables()
    r = make(env, ipt, None, cgroup_fallback=False)
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert row(r, UID)["backend"] == "iptables" and ipt.rules == {UID: 1}

    # the agent restarts with --backend ebpf (its iptables fallback sees the old rules and clears them)
    env.hub = FakeHub()
    ebpf = FakeEbpf()
    r2 = make(env, ebpf, ipt, cgroup_fallback=False)
    r2.adopt()
    r2.reconcile()
    assert row(r2, UID)["state"] == "enrolled" and row(r2, UID)["backend"] == "ebpf"
    assert ebpf.rules == {UID: 1} and not ipt.rules
    r2.close_backends()
    assert ebpf.closed == 1

    # and back to --backend iptables: no eBPF instance on the node, the factory builds one to clear the pod
    env.hub = FakeHub()
    ipt3 = FakeIptables()
    built: list[str] = []

    def factory(name: str) -> FakeBackend | None:
        built.append(name)
        return ebpf if name == "ebpf" else None

    r3 = make(env, ipt3, None, cgroup_fallback=False, factory=factory)
    r3.adopt()
    r3.reconcile()
    assert row(r3, UID)["state"] == "enrolled" and row(r3, UID)["backend"] == "iptables"
    assert ipt3.rules == {UID: 1} and not ebpf.rules and built == ["ebpf"]


def test_del_of_a_pod_only_pinned_by_an_earlier_agent_removes_its_pins(tmp_path: Path) -> None:
    env = Env(tmp_path)
    ebpf = FakeEbpf()
    ebpf.rules[UID] = 1  # a sidecar pod redirected by the previous agent run; this one never saw its ADD
    ebpf.pinned_pods = lambda: list(ebpf.rules)  # type: ignore[attr-defined]
    r = make(env, ebpf, FakeIptables(), cgroup_fallback=False)
    assert r.cni_del(UID).ok
    assert ebpf.removes == 1 and not ebpf.rules
    assert r.cni_del(UID).ok and ebpf.removes == 1  # nothing pinned any more: nothing to do
