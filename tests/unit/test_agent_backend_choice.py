"""Which backend holds a pod: the node's, the fallback when the node's backend declines the spec
(fallback_reason) or (auto only) the pod's cgroup is unknown, and a clean move when the agent restarts with
another backend. Fakes only (no root)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from node_agent.backends.base import BackendError
from node_agent.netns.finder import NetnsLocation
from node_agent.reconcile.loop import Reconciler
from node_agent.reconcile.state import SIDECAR

from tests.unit.agent_fakes import FakeBackend, FakeHub
from tests.unit.test_agent_reconcile import AMBIENT, UID, UID2, Env, pod


class FakeEbpf(FakeBackend):
    name = "ebpf"
    needs_cgroup = True
    change_events = False

    def __init__(self, reason: str | None = None) -> None:
        super().__init__()
        self.reason = reason
        self.new_only = False  # the reason concerns pods it does not hold yet (its programs not compiled)
        self.closed = 0
        self.cgroups: list[str | None] = []
        self.pinned: set[str] = set()  # pods with state pinned outside their netns

    def fallback_reason(self, spec: object) -> str | None:
        return self.reason

    def declines_new_pods_only(self, spec: object) -> bool:
        return self.reason is not None and self.new_only

    def apply(self, target: Any, spec: object) -> None:
        self.cgroups.append(target.cgroup_path)
        super().apply(target, spec)

    def close(self) -> None:
        self.closed += 1

    def pinned_pods(self) -> list[str]:
        return sorted(self.pinned & set(self.rules))


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
    from node_agent.serve.status_client import state_text  # `headrace status` says why

    assert state_text(row(r, UID)) == "enrolled (on the iptables fallback: no proxy cgroup)"
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


def test_pods_held_by_the_node_backend_stay_while_it_declines_new_pods_only(tmp_path: Path) -> None:
    """An agent restarted where the node backend declines new pods only (`auto` with the eBPF programs being
    compiled, as after an upgrade that changed them, or not compiling): the pods it holds keep their
    redirection (not moved to the fallback), a new pod goes to the fallback."""
    env = Env(tmp_path)
    env.fake_netns(UID)
    with_cgroup(env, "/sys/fs/cgroup/unified/k/pod" + UID)
    ebpf, ipt = FakeEbpf(), FakeIptables()
    r = make(env, ebpf, ipt, cgroup_fallback=True)
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert row(r, UID)["backend"] == "ebpf" and ebpf.rules == {UID: 1}

    env.hub = FakeHub()
    ebpf.reason, ebpf.new_only = "eBPF is unavailable on this node: being compiled", True
    applies = ebpf.applies
    r2 = make(env, ebpf, ipt, cgroup_fallback=True)
    r2.adopt()
    r2.reconcile()
    assert row(r2, UID)["state"] == "enrolled" and row(r2, UID)["backend"] == "ebpf"
    assert ebpf.rules == {UID: 1} and ebpf.removes == 0 and ebpf.applies == applies and not ipt.rules
    new = "0f0e0d0c-0000-4000-8000-000000000002"
    env.fake_netns(new)
    env.set(AMBIENT, pod(UID), pod(new))
    r2.reconcile()
    assert row(r2, new)["state"] == "enrolled" and row(r2, new)["backend"] == "iptables" and ipt.rules == {new: 1}
    assert row(r2, UID)["backend"] == "ebpf" and ebpf.removes == 0

    # its redirection damaged meanwhile, and no repair possible without the programs: the fallback takes it
    ebpf.flush(UID)
    ebpf.fail_apply = True
    env.clock.t += 60  # a drift pass is due
    r2.reconcile()
    assert row(r2, UID)["state"] == "failed"
    env.clock.t += 60
    r2.reconcile()
    assert row(r2, UID)["state"] == "enrolled" and row(r2, UID)["backend"] == "iptables"
    assert ipt.rules == {UID: 1, new: 1} and not ebpf.rules

    # the programs compiled: pods move when the reconciler is asked to re-choose (the proxy's cgroup changed)
    ebpf.reason, ebpf.fail_apply = None, False
    r2.rechoose_backends()
    r2.reconcile()
    assert row(r2, UID)["backend"] == row(r2, new)["backend"] == "ebpf" and not ipt.rules

    ebpf.reason = "ambient over eBPF needs the node proxy's cgroup"
    ebpf.new_only = False  # a reason about the pods' spec: the pods it holds go to the fallback
    r2.rechoose_backends()
    r2.reconcile()
    assert row(r2, UID)["backend"] == row(r2, new)["backend"] == "iptables" and not ebpf.rules


def test_del_of_a_pod_only_pinned_by_an_earlier_agent_removes_its_pins(tmp_path: Path) -> None:
    env = Env(tmp_path)
    ebpf = FakeEbpf()
    ebpf.rules[UID] = 1  # a sidecar pod redirected by the previous agent run; this one never saw its ADD
    ebpf.pinned.add(UID)
    r = make(env, ebpf, FakeIptables(), cgroup_fallback=False)
    assert r.cni_del(UID).ok
    assert ebpf.removes == 1 and not ebpf.rules
    assert r.cni_del(UID).ok and ebpf.removes == 1  # nothing pinned any more: nothing to do


def test_boot_race_repair_picks_the_backend_like_choose(tmp_path: Path) -> None:
    """The reconciler writes a boot-race pod's rules: the node's backend when it can hold the pod, else the
    fallback (its cgroup unknown, whatever the setting, or the spec declined)."""
    import dataclasses

    from node_agent.backends.base import PodTarget

    from cni.contract.spec import SidecarSpec

    env = Env(tmp_path)
    ebpf, ipt = FakeEbpf(), FakeIptables()
    r = make(env, ebpf, ipt, cgroup_fallback=False)
    netns = env.fake_netns(UID)
    ino = netns.stat().st_ino
    with_cg = PodTarget(UID, "app", "p-1", str(netns), ino, ("10.0.0.5",), "/sys/fs/cgroup/k/pod" + UID)
    assert r.repair_sidecar(with_cg, SidecarSpec()).backend == "ebpf" and ebpf.rules == {UID: 1}
    no_cg = dataclasses.replace(with_cg, cgroup_path=None)
    out = r.repair_sidecar(no_cg, SidecarSpec())
    assert (out.backend, out.error) == ("iptables", "") and ipt.rules == {UID: 1}
    ebpf.reason = "TPROXY is not implemented in eBPF"
    ipt.rules.clear()
    assert r.repair_sidecar(with_cg, SidecarSpec()).backend == "iptables" and ipt.rules == {UID: 1}
    ipt.fail_apply = True
    out = r.repair_sidecar(with_cg, SidecarSpec())
    assert out.backend == "iptables" and "injected apply failure" in out.error
    assert r.managed_pods() == frozenset(), "repairs are not held: the monitor keeps reporting them"


def test_sidecar_pod_whose_netns_is_gone_is_cleared_by_its_pins(tmp_path: Path) -> None:
    env = Env(tmp_path)
    ebpf = FakeEbpf()
    with_cgroup(env, "/sys/fs/cgroup/unified/k/pod" + UID)
    r = make(env, ebpf, FakeIptables(), cgroup_fallback=False)
    netns = env.fake_netns(UID)
    env.set({}, pod(UID, annotations={"sidecar.istio.io/status": "{}"}))
    assert r.cni_sidecar_add(UID, "app", "p-1", str(netns), (), timeout=1).ok
    assert r.pods[UID].mode == SIDECAR and r.managed_pods() == frozenset({UID})
    ebpf.pinned.add(UID)
    env.pins.mounted.clear()  # the pod's netns is gone
    env.clock.t += 10
    r.reconcile()
    assert UID not in r.pods and not ebpf.rules and env.records.load_all() == {}


def test_a_move_to_ebpf_rewrites_the_fallback_rules_in_place_only_where_they_are_the_same_kind() -> None:
    """Moving an ambient pod from the fallback to a backend that keeps its inbound on a rules backend of the
    fallback's kind (eBPF's ambient inbound) leaves the old rules for the new apply to rewrite (no moment
    without redirection); any other move clears the old backend first."""
    from node_agent.reconcile.choice import rewrites_in_place

    from cni.contract.spec import AmbientSpec, SidecarSpec

    class Rules(FakeIptables):
        def __init__(self, flavour: str) -> None:
            super().__init__()
            self.flavour = flavour

    class WithInbound(FakeEbpf):
        def __init__(self, rules: FakeBackend) -> None:
            super().__init__()
            self.rules_backend = rules

        def rules_inbound(self, spec: object) -> FakeBackend | None:
            return self.rules_backend if isinstance(spec, AmbientSpec) else None

        def own_installed(self, target: Any) -> bool:
            return self.installed(target)

    nft = WithInbound(Rules("nft"))
    assert rewrites_in_place(Rules("nft"), nft, AmbientSpec())
    assert not rewrites_in_place(Rules("legacy"), nft, AmbientSpec())
    assert not rewrites_in_place(Rules("nft"), nft, SidecarSpec())
    assert not rewrites_in_place(FakeIptables(), FakeEbpf(), AmbientSpec())
    assert not rewrites_in_place(nft, Rules("nft"), AmbientSpec())


class Stepping(FakeBackend):
    """A rules backend that can step aside (StepsAside): every change goes into one shared event list."""

    def __init__(self, name: str, events: list[str]) -> None:
        super().__init__()
        self.name, self.events = name, events

    def apply(self, target: Any, spec: object) -> None:
        super().apply(target, spec)
        self.events.append(f"{self.name} apply")

    def remove(self, target: Any) -> None:
        super().remove(target)
        self.events.append(f"{self.name} remove")

    def remove_beside(self, target: Any, new: Any) -> None:
        if self.fail_apply:
            raise BackendError("injected removal failure")
        super().remove(target)
        self.events.append(f"{self.name} remove beside {new.name}")


def test_a_move_puts_the_new_redirection_in_beside_the_old_one_which_comes_out_after(tmp_path: Path) -> None:
    """An agent restarted with another backend: the new backend's apply goes in while the old one's rules are
    still there, and only then does the old one step aside. A failed apply leaves the old rules (the pod is
    never without redirection) and the move recorded, so a restarted agent finishes it; a pod removed in
    the middle of a move loses both."""
    env = Env(tmp_path)
    env.fake_netns(UID)
    events: list[str] = []
    ipt, nft = Stepping("iptables", events), Stepping("nftables", events)
    r = make(env, ipt, None, cgroup_fallback=False)
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert row(r, UID)["backend"] == "iptables" and events == ["iptables apply"]

    # --backend nftables, whose first apply fails: the iptables rules stay, the move is recorded
    env.hub, nft.fail_apply = FakeHub(), True
    r2 = make(env, nft, None, cgroup_fallback=False, factory=lambda name: ipt if name == "iptables" else None)
    r2.adopt()
    r2.reconcile()
    assert row(r2, UID)["state"] == "failed" and ipt.rules == {UID: 1} and not nft.rules
    assert env.records.load_all()[UID].backend == "nftables" and env.records.load_all()[UID].leaving == "iptables"

    # the agent restarts again (still nftables): it finishes the move, new rules first
    env.hub, nft.fail_apply = FakeHub(), False
    r3 = make(env, nft, None, cgroup_fallback=False, factory=lambda name: ipt if name == "iptables" else None)
    r3.adopt()
    assert row(r3, UID)["state"] == "moving", "the iptables rules hold it until the move is over"
    r3.reconcile()
    assert row(r3, UID)["state"] == "enrolled" and row(r3, UID)["backend"] == "nftables"
    assert events == ["iptables apply", "nftables apply", "iptables remove beside nftables"]
    assert nft.rules == {UID: 1} and not ipt.rules and env.records.load_all()[UID].leaving == ""

    # back to iptables, and the pod removed while the move is still failing: both backends' rules go
    env.hub, ipt.fail_apply = FakeHub(), True
    r4 = make(env, ipt, None, cgroup_fallback=False, factory=lambda name: nft if name == "nftables" else None)
    r4.adopt()
    r4.reconcile()
    assert row(r4, UID)["state"] == "failed" and nft.rules == {UID: 1}
    env.set(AMBIENT)
    env.clock.t += 60
    r4.reconcile()
    assert not nft.rules and not ipt.rules and env.records.load_all() == {}
    assert events[-1] == "nftables remove"


def test_a_pod_still_redirected_by_the_backend_it_leaves_shows_moving(tmp_path: Path) -> None:
    """While a move's apply runs, a pod whose old redirection stays until the new one is in shows `moving`
    (status and the pods-by-state gauge), not `pending`; `enrolled` once the new backend's is in. A pod
    whose old backend had to come out first shows `pending`: nothing redirects it meanwhile."""
    import threading

    from node_agent.reconcile.state import MOVING, NoMetrics, shown_state
    from node_agent.serve.status_client import state_text

    env = Env(tmp_path)
    env.fake_netns(UID)
    events: list[str] = []
    gate = threading.Event()

    class Slow(FakeEbpf):
        def apply(self, target: Any, spec: object) -> None:
            gate.wait(10)
            super().apply(target, spec)

    class SlowStepping(Stepping):
        def apply(self, target: Any, spec: object) -> None:
            gate.wait(10)
            super().apply(target, spec)

    class Counts(NoMetrics):
        def pod_states(self, counts: Mapping[str, int]) -> None:
            seen.append(dict(counts))

    ebpf, ipt = Slow(reason="no proxy cgroup"), Stepping("iptables", events)
    seen: list[dict[str, int]] = []
    r = make(env, ebpf, ipt, cgroup_fallback=False)
    r.metrics = Counts()
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert row(r, UID)["state"] == "enrolled" and ipt.rules == {UID: 1}

    ebpf.reason = None  # the proxy's cgroup learned: the pod moves to eBPF, iptables stepping aside after
    r.rechoose_backends()
    r.reconcile()
    assert row(r, UID)["state"] == MOVING and seen[-1] == {MOVING: 1}
    assert state_text(row(r, UID)) == "moving (moving to the ebpf backend)" and ipt.rules == {UID: 1}
    gate.set()
    for job in list(r.enrolment.jobs.values()):
        job.result(timeout=5)
    r.reconcile()
    assert row(r, UID)["state"] == "enrolled" and seen[-1] == {"enrolled": 1} and not r.pods[UID].moving_from
    assert ebpf.rules == {UID: 1} and not ipt.rules and events[-1] == "iptables remove beside ebpf"

    # the agent restarted with iptables, whose apply blocks: its redirection comes out of eBPF first (a
    # backend that cannot step aside), so the pod is pending, not moving
    gate.clear()
    env.hub = FakeHub()
    slow_ipt = SlowStepping("iptables", events)
    r2 = make(env, slow_ipt, None, cgroup_fallback=False, factory=lambda name: ebpf if name == "ebpf" else None)
    r2.adopt()
    passing = threading.Thread(target=r2.reconcile)
    passing.start()
    try:
        deadline = time.monotonic() + 5
        while not ebpf.rules == {} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not ebpf.rules and shown_state(r2.pods[UID]) == "pending"
    finally:
        gate.set()
        passing.join(10)
    assert row(r2, UID)["state"] == "enrolled" and slow_ipt.rules == {UID: 1}


def test_a_move_started_before_the_last_one_finished_leaves_neither_old_backend(tmp_path: Path) -> None:
    """iptables -> nftables, whose old rules would not come out (the pod fails with both in place), then the
    agent restarted with a third backend: both earlier backends step aside, each once the next one is in."""
    env = Env(tmp_path)
    env.fake_netns(UID)
    events: list[str] = []
    ipt, nft, third = Stepping("iptables", events), Stepping("nftables", events), Stepping("third", events)
    retired = {"iptables": ipt, "nftables": nft}
    r = make(env, ipt, None, cgroup_fallback=False)
    env.set(AMBIENT, pod(UID))
    r.reconcile()

    env.hub, ipt.fail_apply = FakeHub(), True  # its removal fails
    r2 = make(env, nft, None, cgroup_fallback=False, factory=retired.get)
    r2.adopt()
    r2.reconcile()
    assert row(r2, UID)["state"] == "failed" and ipt.rules == nft.rules == {UID: 1}

    env.hub, ipt.fail_apply = FakeHub(), False
    r3 = make(env, third, None, cgroup_fallback=False, factory=retired.get)
    r3.adopt()
    r3.reconcile()
    assert row(r3, UID)["state"] == "enrolled" and third.rules == {UID: 1} and not ipt.rules and not nft.rules
    assert events[1:] == ["nftables apply", "iptables remove beside nftables", "third apply",
                          "nftables remove beside third"]


def test_a_pod_adopted_from_an_agent_that_needed_no_cgroup_gets_it_before_moving_to_ebpf(tmp_path: Path) -> None:
    """An iptables agent records no cgroup where its scan found none; the eBPF agent that adopts the pod looks
    for it then, so the move's apply has it (without it eBPF fails the pod until a retry)."""
    env = Env(tmp_path)
    env.fake_netns(UID)
    ipt = FakeIptables()
    r = make(env, ipt, None, cgroup_fallback=False)
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert env.records.load_all()[UID].cgroup_path is None

    cg = "/sys/fs/cgroup/unified/k/pod" + UID
    with_cgroup(env, cg)
    env.hub, ebpf = FakeHub(), FakeEbpf()
    r2 = make(env, ebpf, ipt, cgroup_fallback=False)
    r2.adopt()
    r2.reconcile()
    assert row(r2, UID)["state"] == "enrolled" and ebpf.cgroups == [cg]
    assert env.records.load_all()[UID].cgroup_path == cg


def test_a_pod_recorded_on_the_other_iptables_flavour_moves_to_the_nodes(tmp_path: Path) -> None:
    """The node's iptables flavour changed between two agent runs: the pod's record names the old flavour,
    a backend of that flavour (built only for it) steps aside once the node's flavour is in; an eBPF pod's
    inbound rules on the old flavour leave the same way, after its re-apply."""
    env = Env(tmp_path)
    env.fake_netns(UID)
    events: list[str] = []
    env.records.iptables_flavour = "legacy"
    legacy = Stepping("iptables", events)
    r = make(env, legacy, None, cgroup_fallback=False)
    env.set(AMBIENT, pod(UID))
    r.reconcile()
    assert env.records.load_all()[UID].backend == "iptables"  # (on disk: iptables-legacy)

    env.hub, env.records.iptables_flavour = FakeHub(), "nft"
    legacy.name = "iptables-legacy"  # what the factory builds for the old flavour
    nft = Stepping("iptables", events)
    r2 = make(env, nft, None, cgroup_fallback=False, factory={"iptables-legacy": legacy}.get)
    r2.adopt()
    r2.reconcile()
    assert row(r2, UID)["state"] == "enrolled" and row(r2, UID)["backend"] == "iptables"
    assert events == ["iptables apply", "iptables apply", "iptables-legacy remove beside iptables"]
    assert nft.rules == {UID: 1} and not legacy.rules and env.records.load_all()[UID].leaving == ""

    # eBPF now, its ambient inbound on iptables-nft; then the flavour changes again
    env.hub, env.records.ebpf_inbound = FakeHub(), "iptables"
    with_cgroup(env, "/sys/fs/cgroup/unified/k/pod" + UID)
    nft.name = "iptables-nft"
    ebpf = FakeEbpf()
    r3 = make(env, ebpf, None, cgroup_fallback=False, factory={"iptables-nft": nft}.get)
    r3.adopt()
    r3.reconcile()
    assert row(r3, UID)["backend"] == "ebpf" and env.records.load_all()[UID].inbound == "iptables"
    nft.rules[UID] = 1  # (a fake eBPF writes no inbound rules: these stand for them)
    env.hub, env.records.iptables_flavour = FakeHub(), "legacy"
    r4 = make(env, ebpf, None, cgroup_fallback=False, factory={"iptables-nft": nft}.get)
    r4.adopt()
    r4.reconcile()
    assert row(r4, UID)["state"] == "enrolled" and ebpf.rules == {UID: 1} and not nft.rules
    assert events[-1] == "iptables-nft remove beside ebpf"
    assert env.records.load_all()[UID].inbound == "iptables" and env.records.load_all()[UID].leaving == ""


def test_an_annotated_pod_met_without_a_record_moves_off_what_an_earlier_agent_left(tmp_path: Path) -> None:
    """An uninstall that kept the pods' redirection took the agent's records with it: an agent installed
    again with another backend meets the pod annotated as redirected, finds the earlier backend's
    redirection in it and moves the pod as after a backend switch (the new redirection in beside, the old
    one out after), instead of leaving the old rules there (they would redirect the pod, to a proxy no
    longer listening, after it leaves the mesh). An eBPF node's redirection is found by its own part (its
    inbound rules alone are the rules backend's); a pod that is not annotated is not looked at."""
    from node_agent.sources.redirection_mark import ANNOTATION, ENABLED

    from cni.contract.spec import AmbientSpec

    env = Env(tmp_path)
    for u in (UID, UID2):
        env.fake_netns(u)
    events: list[str] = []
    ipt, nft = Stepping("iptables", events), Stepping("nftables", events)
    ipt.rules = {UID: 1, UID2: 1}  # the earlier agent's

    class EbpfInbound(FakeEbpf):
        """An eBPF backend that holds nothing of its own here; its installed() counts its inbound rules."""

        def rules_inbound(self, spec: object) -> FakeBackend | None:
            return ipt if isinstance(spec, AmbientSpec) else None

        def installed(self, target: Any) -> bool:
            return self.own_installed(target) or ipt.installed(target)

        def own_installed(self, target: Any) -> bool:
            return target.uid in self.rules

    ebpf = EbpfInbound()
    built: list[str] = []

    def factory(name: str) -> FakeBackend | None:
        built.append(name)
        return {"iptables": ipt, "ebpf": ebpf}.get(name)

    r = make(env, nft, None, cgroup_fallback=False, factory=factory)
    env.set(AMBIENT, pod(UID2))
    r.reconcile()
    assert built == [] and ipt.rules == {UID: 1, UID2: 1}, "a pod met without the annotation is not looked at"
    env.set(AMBIENT, pod(UID2), pod(UID, annotations={ANNOTATION: ENABLED}))
    r.reconcile()
    assert row(r, UID)["state"] == "enrolled" and row(r, UID)["backend"] == "nftables"
    assert events[-2:] == ["nftables apply", "iptables remove beside nftables"] and UID not in ipt.rules
    assert env.records.load_all()[UID].backend == "nftables" and env.records.load_all()[UID].leaving == ""
    assert built == ["ebpf", "iptables"]  # looked for in LEFT_BY's order; eBPF's inbound rules not taken for it
