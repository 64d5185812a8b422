"""The relayed DEL on the real chain (bridge + host-local + headrace-cni as the installed launcher, `+front`
through the compiled front, the others through the interpreter's relay) with a real agent and proxy in the
node netns: the launcher hands the DEL to the agent, which runs the plugin's DEL with its own part and
answers; no plugin code runs for it. Each case checks what a DEL must leave: nothing of ours.

- an ambient pod: unenrolled by the agent (rules out, workload gone from the proxy, pin and record gone);
- a non-mesh pod: answered from the agent's pod cache;
- a sidecar pod whose rules the plugin wrote itself (the agent was down at its ADD) and that the agent
  does not know (its object gone): left to the plugin's own DEL, which removes the rules;
- the agent wedged (SIGSTOP): the plugin's own DEL after the relay's first-answer bound, without waiting on
  the agent a second time; the rules come out.
"""

from __future__ import annotations

import signal
import time

import pytest
from node_agent.lab.simnode import SimNode

from tests.kernel.agent_kit import AgentRun
from tests.kernel.test_cni_warm_add import SIDECAR, our_rules, plugin_lines
from tests.kernel.test_cni_warm_add import warm as warm  # (node, agent, conflist backend), param "<backend>[+front]"

pytestmark = pytest.mark.kernel

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
LAUNCHERS = ["iptables-nft+front", "iptables-nft", "nftables+front"]


def deleted(node: SimNode, container_id: str) -> list[str]:
    """The plugin log's messages of the pod's DEL."""
    return [r["msg"] for r in plugin_lines(node, container_id) if r.get("cmd") == "DEL"]


def plugin_dels(agent: AgentRun, outcome: str) -> float:
    _, metrics = agent.http("/metrics")
    prefix = f'headrace_agent_plugin_dels_total{{outcome="{outcome}"}} '
    return next((float(line.split()[1]) for line in metrics.splitlines() if line.startswith(prefix)), 0.0)


@pytest.mark.parametrize("warm", LAUNCHERS, indirect=True)
def test_an_ambient_pods_del_is_the_agents(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, backend = warm
    agent.start_proxy()
    agent.start_agent()
    node.add_namespace("mesh", labels=AMBIENT)
    pod = node.add_pod("mesh", "amb")  # enrolled before the ADD returns
    assert agent.pod_state(pod.uid) == "enrolled" and our_rules(pod.netns.path, backend)
    pin = node.state_dir / "netns" / pod.uid
    assert pin.exists()
    node.runner().delete(pod.container_id, pod.netns.path, args=pod.cni_args)  # its netns still there
    messages = deleted(node, pod.container_id)
    assert "DEL ok (relayed to the agent)" in messages and "DEL ok" not in messages, messages
    assert "mode ambient: held by the agent" in messages
    assert not our_rules(pod.netns.path, backend)
    assert pod.uid not in agent.status() or agent.pod_state(pod.uid) == "none"
    assert not pin.exists() and not (node.state_dir / "pods" / f"{pod.uid}.json").exists()
    assert plugin_dels(agent, "ambient") == 1
    time.sleep(1.5)  # passes of the loop: the pod (still in the source, still labelled) is not enrolled again
    assert not our_rules(pod.netns.path, backend)


@pytest.mark.parametrize("warm", LAUNCHERS[:2], indirect=True)
def test_a_non_mesh_pods_del_is_answered_from_the_cache(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, _backend = warm
    agent.start_agent()
    pod = node.add_pod("plain", "web")
    node.remove_pod(pod)
    messages = deleted(node, pod.container_id)
    assert "mode none: the agent's pod cache" in messages and "DEL ok (relayed to the agent)" in messages
    assert plugin_dels(agent, "none") == 1


@pytest.mark.parametrize("warm", LAUNCHERS, indirect=True)
def test_rules_the_plugin_wrote_itself_are_removed_by_its_own_del(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, backend = warm
    pod = node.add_pod("shop", "web", annotations=SIDECAR)  # no agent: the plugin's standalone path
    assert any(r["msg"] == "sidecar redirect applied" for r in plugin_lines(node, pod.container_id))
    (node.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").unlink()  # deleted in the API first
    agent.start_agent()
    node.runner().delete(pod.container_id, pod.netns.path, args=pod.cni_args)
    messages = deleted(node, pod.container_id)
    assert "DEL ok" in messages and "DEL ok (relayed to the agent)" not in messages, messages
    assert "relayed DEL left to the plugin: pod not in the agent's pod source" in agent.agent_log()
    assert not our_rules(pod.netns.path, backend)
    assert plugin_dels(agent, "standalone") == 1


@pytest.mark.parametrize("warm", LAUNCHERS[:2], indirect=True)
def test_a_wedged_agent_costs_a_del_one_wait(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, backend = warm
    pod = node.add_pod("shop", "web", annotations=SIDECAR)  # standalone: the agent is not there yet
    agent.start_agent()
    assert agent.agent is not None
    agent.agent.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        node.runner().delete(pod.container_id, pod.netns.path, args=pod.cni_args)
        took = time.monotonic() - start
    finally:
        agent.kill_agent(signal.SIGKILL)
    assert 1.5 < took < 4, took  # the relay's first-answer bound (2 s), and no second wait (agent_timeout)
    messages = deleted(node, pod.container_id)
    assert any(m.startswith("DEL not delivered to the agent") for m in messages), messages
    assert not our_rules(pod.netns.path, backend)
