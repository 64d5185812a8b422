"""The boot-race monitor with fakes (no kernel): sidecar pods without rules are confirmed after the grace
period, then repaired (apply) or only reported (flag); pods with rules are left alone; status rows and
Prometheus show the verdicts; the duty flags are validated."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from node_agent.agent.duties import DutyConfigError, StatusView, build_duty_options
from node_agent.backends.base import BackendError, PodTarget
from node_agent.netns.finder import NetnsLocation, NetnsNotFound
from node_agent.reconcile.loop import Reconciler
from node_agent.reconcile.records import RecordStore
from node_agent.reconcile.state import Outcome
from node_agent.repair.boot_race import (
    FAILED,
    FLAGGED,
    INTACT,
    REPAIRED,
    SUSPECT,
    BootRaceMonitor,
    PrometheusBootRaceMetrics,
    RepairMode,
)
from node_agent.sources.store import PodStore
from prometheus_client import CollectorRegistry

from cni.contract.kube_objects import Namespace, Pod
from tests.unit.agent_fakes import FakeHub, FakePins

SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RulesBackend:
    needs_cgroup = False
    change_events = False

    def __init__(self, name: str = "iptables") -> None:
        self.name = name
        self.rules: set[str] = set()
        self.applied: list[tuple[str, Any]] = []
        self.fail = False

    def apply(self, target: PodTarget, spec: Any) -> None:
        if self.fail:
            raise BackendError("injected")
        assert target.netns_path.startswith(f"/proc/{os.getpid()}/fd/")  # the held fd, not a raw path
        self.applied.append((target.uid, spec))
        self.rules.add(target.uid)

    def remove(self, target: PodTarget) -> None:
        self.rules.discard(target.uid)

    def check(self, target: PodTarget, spec: Any) -> list[str]:
        return [] if target.uid in self.rules else ["missing"]

    def installed(self, target: PodTarget) -> bool:
        return target.uid in self.rules

    def fallback_reason(self, spec: Any) -> str | None:
        return None

    def set_proxy_cgroup(self, path: str | Path | None) -> None:
        pass

    def pinned_pods(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class Conntrack:
    def __init__(self) -> None:
        self.set_to: list[int] = []

    def read_loose(self, netns_path: str) -> int | None:
        return 1

    def set_loose(self, netns_path: str, value: int) -> None:
        self.set_to.append(value)

    def read_loose_here(self) -> int | None:
        return 1

    def set_loose_here(self, value: int) -> None:
        self.set_to.append(value)


def pod(uid: str, name: str, annotations: dict[str, str] | None = None, ns: str = "shop") -> Pod:
    return Pod(uid=uid, namespace=ns, name=name, annotations=annotations or {}, ips=("10.1.0.2",))


class World:
    def __init__(self, tmp_path: Path, mode: RepairMode = "apply") -> None:
        self.netns_file = tmp_path / "netns"
        self.netns_file.write_text("")
        self.ino = os.stat(self.netns_file).st_ino
        self.store = PodStore()
        self.backend = RulesBackend()
        self.ebpf = RulesBackend("ebpf")
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.conntrack = Conntrack()
        self.unfindable: set[str] = set()
        self.located: list[str] = []
        # the reconciler writes the repairs (with its node backend); the monitor only detects and reports
        self.reconciler = Reconciler(self.store, self.backend, FakeHub(), FakePins(tmp_path / "pins"),
                                     RecordStore(tmp_path / "pods"), conntrack=self.conntrack)
        self.monitor = BootRaceMonitor(
            self.store, mode=mode, check_backends=[self.ebpf, self.backend], repairer=self.reconciler,
            locate=self.locate, metrics=PrometheusBootRaceMetrics(self.registry), grace=2.0, clock=self.clock,
        )

    def locate(self, p: Pod, cache: dict[str, Any]) -> NetnsLocation:
        self.located.append(p.uid)
        if p.uid in self.unfindable:
            raise NetnsNotFound("no process")
        return NetnsLocation(p.uid, 0, str(self.netns_file), self.ino, None)

    def set_pods(self, *pods: Pod) -> None:
        self.store.replace_pods(pods)
        self.store.replace_namespaces([Namespace("shop")])

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels or None)
        return float(value or 0.0)

    def state(self, uid: str) -> str:
        return self.monitor.verdicts[uid].state


def test_missing_rules_confirmed_after_grace_then_repaired(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.backend.rules.add("u-made")  # made by the plugin
    w.set_pods(pod("u-early", "early", SIDECAR), pod("u-made", "made", SIDECAR), pod("u-plain", "plain"))
    w.monitor.check_once()
    assert w.state("u-made") == INTACT and w.state("u-early") == SUSPECT
    assert "u-plain" not in w.monitor.verdicts  # not a sidecar pod: not judged
    w.clock.now += 1.0
    w.monitor.check_once()
    assert w.state("u-early") == SUSPECT and w.backend.applied == []  # still within the grace period
    w.clock.now += 1.5
    w.monitor.check_once()
    assert w.state("u-early") == REPAIRED
    assert [uid for uid, _ in w.backend.applied] == ["u-early"]  # the intact pod was never touched
    assert w.conntrack.set_to == [0]  # pre-existing connections protected before the rules went in
    assert w.metric("headrace_agent_boot_race_detected_total") == 1
    assert w.metric("headrace_agent_boot_race_repairs_total") == 1
    assert w.metric("headrace_agent_boot_race_pods", state="repaired") == 1
    # repaired and intact pods are left alone afterwards
    w.located.clear()
    w.clock.now += 60
    w.monitor.check_once()
    assert w.located == [] and len(w.backend.applied) == 1

    rows = w.monitor.overlay([
        {"uid": "u-early", "mode": "sidecar", "state": "none", "reason": "sidecar injected", "netns": ""},
        {"uid": "u-made", "mode": "sidecar", "state": "none", "reason": "sidecar injected", "netns": ""},
    ])
    assert rows[0]["state"] == "enrolled" and rows[0]["boot_race"] == "repaired"
    assert "in place" in rows[0]["reason"] and rows[0]["backend"] == "iptables"
    assert rows[1]["state"] == "none" and "boot_race" not in rows[1]


def test_flag_mode_only_reports_and_notices_later_rules(tmp_path: Path) -> None:
    w = World(tmp_path, mode="flag")
    w.set_pods(pod("u-early", "early", SIDECAR))
    w.monitor.check_once()
    w.clock.now += 3
    w.monitor.check_once()
    assert w.state("u-early") == FLAGGED and w.backend.applied == []
    assert w.metric("headrace_agent_boot_race_detected_total") == 1
    assert w.metric("headrace_agent_boot_race_repairs_total") == 0
    assert w.metric("headrace_agent_boot_race_pods", state="flagged") == 1
    row = w.monitor.overlay([{"uid": "u-early", "mode": "sidecar", "state": "none", "reason": ""}])[0]
    assert row["state"] == "failed" and row["boot_race"] == "flagged" and "restart the pod" in row["reason"]
    # someone repairs it (a restart through the plugin would be a new uid): re-checked after `recheck`
    w.backend.rules.add("u-early")
    w.clock.now += 11
    w.monitor.check_once()
    assert w.state("u-early") == INTACT
    assert w.metric("headrace_agent_boot_race_pods", state="flagged") == 0
    assert w.metric("headrace_agent_boot_race_detected_total") == 1  # counted once


def test_rules_appearing_within_grace_are_not_a_boot_race(tmp_path: Path) -> None:
    """A pod whose plugin ADD was still running when first seen."""
    w = World(tmp_path)
    w.set_pods(pod("u-new", "new", SIDECAR))
    w.monitor.check_once()
    w.ebpf.rules.add("u-new")  # any backend showing our rules counts (the plugin's handover to eBPF)
    w.clock.now += 3
    w.monitor.check_once()
    assert w.state("u-new") == INTACT
    assert w.metric("headrace_agent_boot_race_detected_total") == 0


def test_a_pod_without_an_ip_is_not_judged_however_long_its_add_takes(tmp_path: Path) -> None:
    """The chain before ours can take seconds (a busy node, a slow primary CNI): the pod's sandbox is there
    and locatable, our rules are not yet, and the kubelet has reported no IP. Not a boot race."""
    w = World(tmp_path)
    slow = Pod(uid="u-slow", namespace="shop", name="slow", annotations=SIDECAR, ips=())
    w.set_pods(slow)
    for _ in range(5):
        w.monitor.check_once()
        w.clock.now += 1.0
    assert "u-slow" not in w.monitor.verdicts and w.located == [] and w.backend.applied == []
    w.backend.rules.add("u-slow")  # the ADD done: rules in, then the IP reported
    w.set_pods(pod("u-slow", "slow", SIDECAR))
    w.monitor.check_once()
    assert w.state("u-slow") == INTACT
    assert w.metric("headrace_agent_boot_race_detected_total") == 0


def test_failures_are_reported_and_retried(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.backend.fail = True
    w.set_pods(pod("u-early", "early", SIDECAR),
               pod("u-bad", "bad", {**SIDECAR, "traffic.sidecar.istio.io/excludeOutboundPorts": "nope"}))
    w.monitor.check_once()
    w.clock.now += 3
    w.monitor.check_once()
    assert w.state("u-early") == FAILED and "repair failed" in w.monitor.verdicts["u-early"].reason
    assert w.state("u-bad") == FAILED and "annotations invalid" in w.monitor.verdicts["u-bad"].reason
    w.backend.fail = False
    w.clock.now += 1.5  # backoff of the first attempt is 1 s
    w.monitor.check_once()
    assert w.state("u-early") == REPAIRED and w.state("u-bad") == FAILED


def test_unfindable_netns_and_departed_pods(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.unfindable.add("u-ghost")
    w.set_pods(pod("u-ghost", "ghost", SIDECAR), pod("u-early", "early", SIDECAR))
    w.monitor.check_once()
    assert "u-ghost" not in w.monitor.verdicts  # not judged without its netns
    w.set_pods()
    w.monitor.check_once()
    assert w.monitor.verdicts == {}


def test_recycled_netns_is_not_entered(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.ino += 1  # the location's inode no longer matches what the path holds
    w.set_pods(pod("u-early", "early", SIDECAR))
    w.monitor.check_once()
    assert w.state("u-early") == FAILED and "inode mismatch" in w.monitor.verdicts["u-early"].reason
    assert w.backend.applied == []


def test_next_look_is_due_only_while_a_pod_is_pending(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.unfindable.add("u-ghost")
    w.backend.rules.add("u-made")
    w.set_pods(pod("u-ghost", "ghost", SIDECAR), pod("u-made", "made", SIDECAR), pod("u-plain", "plain"))
    w.monitor.check_once()
    assert w.monitor.next_due == w.clock.now + 1.0  # the ghost's netns is looked for again
    w.set_pods(pod("u-made", "made", SIDECAR), pod("u-plain", "plain"))
    w.monitor.check_once()
    assert w.monitor.next_due is None  # everything judged and intact: only a change wakes the monitor
    (tmp_path / "flag").mkdir()
    w2 = World(tmp_path / "flag", mode="flag")
    w2.set_pods(pod("u-early", "early", SIDECAR))
    w2.monitor.check_once()
    w2.clock.now += 3
    w2.monitor.check_once()
    assert w2.state("u-early") == FLAGGED and w2.monitor.next_due == w2.clock.now + 10.0  # the recheck


def test_the_monitor_thread_passes_at_start_and_on_a_source_change(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.monitor.interval = 0.01
    w.backend.rules.add("u-made")
    w.set_pods(pod("u-made", "made", SIDECAR))  # listed before the monitor starts: a first pass anyway
    w.monitor.start()
    try:
        deadline = time.monotonic() + 5
        # the pass counts itself after its verdicts are in: wait for both
        while (w.monitor.verdicts.get("u-made") is None or not w.monitor.passes) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.state("u-made") == INTACT
        passes = w.monitor.passes
        time.sleep(0.3)
        assert w.monitor.passes == passes  # nothing due, nothing changed: no pass
        w.set_pods(pod("u-made", "made", SIDECAR), pod("u-other", "other", SIDECAR))
        while "u-other" not in w.monitor.verdicts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "u-other" in w.monitor.verdicts
    finally:
        w.monitor.stop(2)


def test_nothing_before_the_source_synced(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.monitor.check_once()
    assert w.monitor.passes == 0 and w.located == []


def test_duty_flags_validation() -> None:
    ok = build_duty_options(install_cni=True, cni_conf_dir="/x/net.d/", cni_cleanup_on_exit=True,
                            repair_sidecars="flag", agent_namespace="mesh-system")
    assert ok.cni_conf_dir == "/x/net.d" and ok.repair_sidecars == "flag"
    with pytest.raises(DutyConfigError, match="--cni-conf-dir"):
        build_duty_options(install_cni=True, cni_conf_dir="net.d")
    with pytest.raises(DutyConfigError, match="--cni-cleanup-on-exit needs --install-cni"):
        build_duty_options(cni_cleanup_on_exit=True)
    with pytest.raises(DutyConfigError, match="--repair-sidecars"):
        build_duty_options(repair_sidecars="maybe")
    with pytest.raises(DutyConfigError, match="different"):
        build_duty_options(cni_conf_dir="/a", cni_bin_dir="/a")
    with pytest.raises(DutyConfigError, match="namespace"):
        build_duty_options(agent_namespace="Bad_NS")


def test_status_view_delegates_and_overlays(tmp_path: Path) -> None:
    class Handler:
        def cni_add(self, *a: Any) -> Outcome:
            return Outcome(True, "enrolled")

        cni_sidecar_add = cni_add

        def cni_del(self, uid: str, plugin_removes: tuple[str, str] | None = None) -> Outcome:
            return Outcome(True, "removed")

        def cni_check(self, uid: str) -> Outcome:
            return Outcome(True, "intact")

        def status(self) -> list[dict[str, Any]]:
            return [{"uid": "u-early", "mode": "sidecar", "state": "none", "reason": "sidecar injected"}]

    w = World(tmp_path)
    w.set_pods(pod("u-early", "early", SIDECAR))
    w.monitor.check_once()
    w.clock.now += 3
    w.monitor.check_once()
    view = StatusView(Handler(), w.monitor.overlay)
    assert view.cni_del("x").state == "removed" and view.cni_check("x").state == "intact"
    assert view.cni_add("u", "ns", "n", "/p", (), 1.0).ok
    assert view.status()[0]["boot_race"] == "repaired"


def test_status_table_shows_boot_race_reason() -> None:
    from node_agent.serve.status_client import render_table

    rows = [
        {"namespace": "shop", "name": "early", "uid": "u1", "mode": "sidecar", "backend": "iptables",
         "state": "enrolled", "reason": "boot race: sidecar rules installed in place by the agent",
         "netns": "/run/netns/x", "boot_race": "repaired"},
        {"namespace": "shop", "name": "made", "uid": "u2", "mode": "sidecar", "backend": "", "state": "none",
         "reason": "sidecar injected", "netns": ""},
    ]
    table = render_table({"pods": rows})
    assert "enrolled (boot race: sidecar rules installed in place by the agent)" in table
    assert "sidecar injected" not in table


def test_agent_command_rejects_bad_duty_flags(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from node_agent.commands.agent import agent

    base = ["--objects-dir", str(tmp_path), "--state-dir", str(tmp_path / "state")]
    res = CliRunner().invoke(agent, [*base, "--cni-cleanup-on-exit"])
    assert res.exit_code == 2 and "--cni-cleanup-on-exit needs --install-cni" in res.output
    res = CliRunner().invoke(agent, [*base, "--install-cni", "--cni-bin-dir", "bin"])
    assert res.exit_code == 2 and "--cni-bin-dir 'bin'" in res.output
    res = CliRunner().invoke(agent, [*base, "--repair-sidecars", "sometimes"])
    assert res.exit_code == 2
    in_cluster = ["--in-cluster", "--node-name", "n1", "--state-dir", str(tmp_path / "state"), "--install-cni"]
    res = CliRunner().invoke(agent, in_cluster)
    assert res.exit_code == 2 and "--install-cni needs a pod source for the plugin" in res.output
    assert not (tmp_path / "state").exists()  # nothing started


def test_repaired_pod_is_held_by_the_reconciler_and_stays_reported(tmp_path: Path) -> None:
    """After the repair the reconciler holds the pod (its drift is checked like every pod's); the monitor
    keeps reporting it as repaired, with the reconciler's own state."""
    w = World(tmp_path)
    w.set_pods(pod("u-early", "early", SIDECAR))
    w.reconciler.reconcile()  # the reconciler knows the pod (not held: a sidecar pod without rules)
    assert "u-early" not in w.reconciler.managed_pods()
    w.monitor.check_once()
    w.clock.now += 3
    w.monitor.check_once()
    assert w.state("u-early") == REPAIRED
    assert "u-early" in w.reconciler.managed_pods()
    held = w.reconciler.table.pods["u-early"]
    assert held.mode == "sidecar" and held.state == "enrolled" and held.backend == "iptables"
    assert "boot race" in held.reason
    w.clock.now += 60
    w.monitor.check_once()
    assert w.state("u-early") == REPAIRED  # held, yet still reported
    assert w.metric("headrace_agent_boot_race_pods", state="repaired") == 1
    row = w.monitor.overlay([{"uid": "u-early", "mode": "sidecar", "state": "failed",
                              "reason": "drift repair: boom", "netns": "/pins/u-early"}])[0]
    assert row["state"] == "failed" and row["boot_race"] == "repaired"  # the reconciler's state is kept
    assert "in place" in row["reason"] and row["reason"].endswith("drift repair: boom")
    w.set_pods()  # the pod is gone from the source: no longer reported
    w.monitor.check_once()
    assert "u-early" not in w.monitor.verdicts
