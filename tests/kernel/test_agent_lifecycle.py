"""The agent as a real process in a node netns, with real pod netns (processes in kubelet-like cgroups),
the real iptables backend and the reference proxy: enrolment of running pods, restart adoption without
duplicates, drift repair, node-reboot handling, clean shutdown keeping rules."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.netns import NetNS
from tests.kernel.agent_kit import (
    AgentRun,
    PodProcs,
    headrace_rules,
    ns_object,
    pod_object,
    run,
    wait_for,
    write_object,
)

pytestmark = pytest.mark.kernel


class World:
    def __init__(self, tmp: Path) -> None:
        self.node = NetNS.create("hra-node-")
        self.pods = PodProcs()
        self.objects = tmp / "objects"
        self.objects.mkdir()
        self.agent = AgentRun(self.node.path, self.objects)
        self.uids = [str(uuid.uuid4()) for _ in range(2)]
        self.procs = {}
        write_object(self.objects, "ns.json", ns_object("app", ambient=False))
        for i, uid in enumerate(self.uids):
            self.procs[uid] = self.pods.pod(uid)
            write_object(self.objects, f"pod{i}.json", pod_object("app", f"web-{i}", uid, [f"10.77.0.{i + 2}"]))

    def netns(self, uid: str) -> str:
        return f"/proc/{self.procs[uid].pid}/ns/net"

    def label(self, ambient: bool) -> None:
        write_object(self.objects, "ns.json", ns_object("app", ambient=ambient))

    def close(self) -> None:
        self.agent.close()
        self.pods.close()
        self.node.delete()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def enrolled(w: World) -> bool:
    st = w.agent.status()
    return all(st.get(u, {}).get("state") == "enrolled" for u in w.uids)


def test_running_pods_enrol_restart_adopt_drift_and_unlabel(world: World) -> None:
    w = world
    w.agent.start_proxy()
    w.agent.start_agent()
    st = w.agent.status()
    assert {st[u]["mode"] for u in w.uids} == {"none"}
    assert all(headrace_rules(w.netns(u)) == [] for u in w.uids)

    # label the namespace: running pods enrolled, no restart
    w.label(True)
    wait_for(lambda: enrolled(w), 20, "pods enrolled")
    rules = {u: headrace_rules(w.netns(u)) for u in w.uids}
    assert all(rules[u] for u in w.uids)
    assert all(line.startswith("nft: ") for u in w.uids for line in rules[u]), "one flavour per node"
    row = w.agent.status()[w.uids[0]]
    assert row["mode"] == "ambient" and row["backend"] == "iptables"
    assert row["netns"] == str(w.agent.state / "netns" / w.uids[0])
    assert w.agent.metric("headrace_agent_enrolments_total") == 2
    assert w.agent.metric("headrace_agent_proxy_connected") == 1
    # node-side probe SNAT lives in the node netns (where the agent runs)
    node_rules = headrace_rules(w.node.path)
    assert any("10.77.0.2" in r for r in node_rules) and any("10.77.0.3" in r for r in node_rules)

    # SIGKILL and restart: rules kept meanwhile, adopted without duplicates, proxy gets a fresh snapshot
    w.agent.kill_agent(signal.SIGKILL)
    assert {u: headrace_rules(w.netns(u)) for u in w.uids} == rules
    w.agent.start_agent()
    wait_for(lambda: enrolled(w), 20, "pods re-enrolled after restart")
    assert {u: headrace_rules(w.netns(u)) for u in w.uids} == rules, "no duplicate or changed rules"
    wait_for(lambda: w.agent.proxy_log().count("snapshot_applied") >= 2, 15, "second snapshot")

    # drift: flush our chain in one pod -> repaired within seconds and counted
    victim = w.uids[0]
    run(["nsenter", f"--net={w.netns(victim)}", "iptables-nft", "-t", "nat", "-F"], check=True)
    t0 = time.monotonic()  # (the repair can come before a read here could see the flush: the count tells)
    wait_for(lambda: w.agent.metric("headrace_agent_drift_repairs_total") >= 1, 10, "drift repaired and counted")
    wait_for(lambda: headrace_rules(w.netns(victim)) == rules[victim], 10, "drift repaired")
    assert time.monotonic() - t0 < 10

    # remove the label: rules gone, pins released, pods reported not in the mesh
    w.label(False)
    wait_for(lambda: all(headrace_rules(w.netns(u)) == [] for u in w.uids), 20, "rules removed")
    wait_for(lambda: all(w.agent.status()[u]["mode"] == "none" for u in w.uids), 10, "status none")
    assert not any((w.agent.state / "netns").iterdir())
    wait_for(lambda: not [r for r in headrace_rules(w.node.path) if "10.77" in r], 10, "node probe SNAT removed")


def test_sigterm_keeps_rules(world: World) -> None:
    w = world
    w.label(True)
    w.agent.start_proxy()
    w.agent.start_agent()
    wait_for(lambda: enrolled(w), 20, "pods enrolled")
    before = {u: headrace_rules(w.netns(u)) for u in w.uids}
    w.agent.kill_agent(signal.SIGTERM)
    assert w.agent.agent is not None and w.agent.agent.returncode == 0
    assert {u: headrace_rules(w.netns(u)) for u in w.uids} == before
    assert "pod rules left in place" in w.agent.agent_log()


def test_node_reboot_pod_reported_failed_and_retried_never_enrolled(world: World) -> None:
    """After a reboot without drain the pinned netns is gone and the pod's old netns
    cannot be found; the pod must show `failed` (and be retried), never `enrolled`."""
    w = world
    w.label(True)
    w.agent.start_proxy()
    w.agent.start_agent()
    wait_for(lambda: enrolled(w), 20, "pods enrolled")
    w.agent.kill_agent(signal.SIGKILL)
    # "reboot": the pod's processes and every pinned netns are gone; the pod objects remain
    lost = w.uids[0]
    w.procs[lost].kill()
    w.procs[lost].wait(5)
    run(["umount", "-l", str(w.agent.state / "netns" / lost)])
    w.agent.start_agent()
    row = wait_for(
        lambda: (w.agent.status().get(lost) or {}).get("state") == "failed" and w.agent.status()[lost],
        15,
        "failed state",
    )
    assert "netns" in row["reason"]
    fails_before = w.agent.metric("headrace_agent_enrolment_failures_total")
    for _ in range(20):
        assert w.agent.pod_state(lost) != "enrolled"
        time.sleep(0.2)
    wait_for(lambda: w.agent.metric("headrace_agent_enrolment_failures_total") > fails_before, 10, "retried")
    assert w.agent.pod_state(lost) == "failed"
    assert w.agent.pod_state(w.uids[1]) == "enrolled"


def test_flavour_detected_once_from_node_rules_and_used_in_every_pod(world: World) -> None:
    """The node (here: the node netns) runs legacy iptables with real rules, nft has
    only empty chains; `--iptables auto` must pick legacy by counting `-A` rules and use it in every pod."""
    w = world
    for i in range(3):
        run(["ip", "netns", "exec", w.node.name, "iptables-legacy", "-A", "INPUT", "-p", "tcp",
             "--dport", str(30000 + i), "-j", "ACCEPT"])
    run(["ip", "netns", "exec", w.node.name, "iptables-nft", "-N", "EMPTY-CHAIN-ONE"])
    run(["ip", "netns", "exec", w.node.name, "iptables-nft", "-N", "EMPTY-CHAIN-TWO"])
    w.label(True)
    w.agent.start_proxy()
    w.agent.start_agent()
    wait_for(lambda: enrolled(w), 20, "pods enrolled")
    for u in w.uids:
        rules = headrace_rules(w.netns(u))
        assert rules and all(line.startswith("legacy: ") for line in rules), rules
    assert "legacy" in w.agent.agent_log()
