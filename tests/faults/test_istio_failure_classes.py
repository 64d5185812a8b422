"""The failure classes Istio's CNI met in production, kept fixed here as named regression tests.

Two run here on a simulated node with the agent and the reference proxy:
- proxy connecting late: an ambient ADD made while no node proxy is connected waits (the pod never runs
  unredirected, no listener-less redirect), and completes once the proxy connects;
- proxy connected before the restarted agent's adoption: the proxy's next snapshot holds every adopted
  workload, so it drops none and keeps their listeners (no `workload_deleted`, nothing `dropped`).

The others live with the code they exercise; `test_named_regressions_exist` keeps the map below honest.
"""

from __future__ import annotations

import importlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.simnode import Pod, SimNode
from node_agent.lab.traffic import tcp_request

from tests.faults.fault_report import record
from tests.kernel.agent_kit import node_agent, wait_for
from tests.kernel.test_backend_parity import PORT, ParityRun, start_app

pytestmark = [pytest.mark.faults, pytest.mark.kernel]

AMBIENT = {"istio.io/dataplane-mode": "ambient"}

REGRESSIONS = {
    "node boot race (sidecar pod started before the plugin was chained)":
        "tests.kernel.test_agent_node_duties:test_boot_race_sidecar_pod_found_and_repaired",
    "wrong iptables flavour (legacy vs nft detected once, used in every pod)":
        "tests.kernel.test_agent_lifecycle:test_flavour_detected_once_from_node_rules_and_used_in_every_pod",
    "wrong iptables flavour (detection counts rules, not chain headers)":
        "tests.kernel.test_iptables_lifecycle:test_flavour_counts_rules_not_chain_headers",
    "netns gone after a reboot (pod failed and retried, never enrolled)":
        "tests.kernel.test_agent_lifecycle:test_node_reboot_pod_reported_failed_and_retried_never_enrolled",
    "plugin blocking the agent's own pod": "tests.kernel.test_install_cni_chroot:test_agent_namespace_never_blocked",
    "proxy connecting late": "tests.faults.test_istio_failure_classes:test_proxy_connecting_late",
    "proxy connected before the restarted agent's adoption":
        "tests.faults.test_istio_failure_classes:test_proxy_connected_before_adoption_keeps_every_workload",
}


def test_named_regressions_exist() -> None:
    for fault, ref in REGRESSIONS.items():
        module, _, name = ref.partition(":")
        assert callable(getattr(importlib.import_module(module), name, None)), f"{fault}: {ref} is gone"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[SimNode, ParityRun, list[Any]]]:
    node = SimNode.create(tmp_path / "node", headrace={"backend": "iptables"})
    try:
        with node_agent(node, ParityRun) as (agent, apps):
            agent.proxy_cgroup = node.proxy_cgroup()
            agent.use_backend("iptables")
            yield node, agent, apps
    finally:
        node.close()


def proxied_outbound(agent: ParityRun, workload: str) -> int:
    return sum(1 for x in agent.proxy_lines() if x.get("direction") == "outbound" and x.get("workload") == workload)


def test_proxy_connecting_late(env: Any) -> None:
    node, agent, apps = env
    node.add_namespace("mesh", AMBIENT)
    node.add_namespace("plain")
    server = node.add_pod("plain", "server")
    start_app(server.netns.path, "server", apps)
    agent.start_agent()  # no proxy yet
    box: dict[str, Any] = {}

    def add() -> None:
        started = time.monotonic()
        try:
            box["pod"] = node.add_pod("mesh", "late")
        except Exception as exc:  # reported below
            box["error"] = exc
        box["took"] = time.monotonic() - started

    adder = threading.Thread(target=add)
    adder.start()
    time.sleep(2.0)
    assert adder.is_alive(), "the ADD returned before any proxy was connected"
    agent.start_proxy()
    adder.join(60)
    violations = int("error" in box)
    record("Istio class: proxy connecting late", 1, violations, f"ADD took {box.get('took', 0):.1f} s")
    assert "error" not in box, f"ADD failed: {box.get('error')}"
    pod: Pod = box["pod"]
    assert agent.pod_state(pod.uid) == "enrolled"
    assert tcp_request(pod.netns.path, server.ipv4, PORT, b"hi", timeout=5) == b"server|hi"
    wait_for(lambda: proxied_outbound(agent, "mesh/late") >= 1, 10, "the connection went through the proxy")


def test_proxy_connected_before_adoption_keeps_every_workload(env: Any) -> None:
    node, agent, _apps = env
    node.add_namespace("mesh", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    pods = [node.add_pod("mesh", f"p{i}") for i in range(10)]
    wait_for(lambda: all(agent.pod_state(p.uid) == "enrolled" for p in pods), 30, "enrolled")
    violations = 0
    for run_no in range(3):
        before = agent.proxy_log()
        seen = before.count("snapshot_applied")
        agent.kill_agent(signal.SIGKILL)
        agent.start_agent()  # the proxy, still running, reconnects at once: adoption is racing it
        wait_for(lambda: agent.proxy_log().count("snapshot_applied") > seen, 20,  # noqa: B023 - read at once
                 "the new agent's snapshot")
        wait_for(lambda: all(agent.pod_state(p.uid) == "enrolled" for p in pods), 30, "re-enrolled")
        new = agent.proxy_log()[len(before):]
        events = [json.loads(line) for line in new.splitlines() if line.startswith("{")]
        snapshots = [e for e in events if e.get("event") == "snapshot_applied" or "snapshot_applied" in str(e)]
        deleted = [e for e in events if "workload_deleted" in str(e)]
        dropped = [e for e in snapshots if e.get("dropped")]
        counts = [e.get("count") for e in snapshots]
        assert snapshots, f"no snapshot event parsed from the proxy log: {new[-500:]}"
        bad = bool(deleted or dropped or any(c != len(pods) for c in counts))
        violations += bad
        assert not bad, f"restart {run_no}: snapshots {counts}, deleted {len(deleted)}, dropped {dropped[:1]}"
    record("Istio class: proxy connected before the restarted agent's adoption", 3, violations)
