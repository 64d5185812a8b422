"""Helpers for the agent's kernel tests. The node netns, bare pods, object writers and the agent/proxy
processes are the lab's (node_agent.lab: also used by the benchmarks); what only tests need is here: a
command runner, our iptables rules in a netns, and an agent for a simulated node."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

from node_agent.lab.agent_run import AgentRun, wait_for
from node_agent.lab.objects import ns_object, pod_object, write_object
from node_agent.lab.pod_cgroups import PodProcs
from node_agent.lab.processes import HEADRACE

if TYPE_CHECKING:
    from node_agent.lab.simnode import SimNode

__all__ = [
    "HEADRACE",
    "AgentRun",
    "PodProcs",
    "headrace_rules",
    "iptables_save",
    "node_agent",
    "ns_object",
    "pod_object",
    "run",
    "wait_for",
    "write_object",
]


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def iptables_save(netns_path: str, family: int, flavour: str) -> str:
    from cni.kernel import flavour as flavour_mod

    tool = flavour_mod.binary(flavour, family, "save")  # type: ignore[arg-type]
    return run(["nsenter", f"--net={netns_path}", tool], check=False).stdout


def headrace_rules(netns_path: str, family: int = 4) -> list[str]:
    """Our rule lines in a netns, from both iptables flavours (a rule in the wrong flavour counts too)."""
    out: list[str] = []
    for flavour in ("nft", "legacy"):
        out += [
            f"{flavour}: {line}"
            for line in iptables_save(netns_path, family, flavour).splitlines()
            if line.startswith("-A") and "HEADRACE" in line
        ]
    return out


AgentT = TypeVar("AgentT", bound=AgentRun)


@contextlib.contextmanager
def node_agent(node: SimNode, agent_cls: type[AgentT]) -> Iterator[tuple[AgentT, list[subprocess.Popen[bytes]]]]:
    """An agent (not started) for a simulated node, sharing the node's state dir and sockets, plus a list
    for the test's app processes; apps are killed and the agent closed afterwards, even on failure."""
    agent = agent_cls(
        node.netns.path,
        node.objects_dir,
        node.root / "run",
        state_dir=node.state_dir,
        cni_socket=node.agent_socket,
        proxy_socket=node.state_dir / "proxy.sock",
    )
    apps: list[subprocess.Popen[bytes]] = []
    try:
        yield agent, apps
    finally:
        for app in apps:
            app.kill()
            app.wait(5)
        agent.close()
