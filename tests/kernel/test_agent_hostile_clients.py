"""The agent process under hostile plugin-socket clients, on a simulated node (bridge + host-local +
headrace-cni, the agent and the reference proxy in the node netns):

- 70 slow clients (70 processes, one byte a second each, reconnecting at once when dropped) hold every
  reading slot, and real ambient ADDs through the whole chain still enrol their pods within their
  deadline; the evictions show in `headrace_agent_plugin_requests_refused_total{reason="evicted"}`;
- ADDs whose netns is the agent's own (the node's), the host's (/proc/1/ns/net), a regular file, a
  directory or a symlink to either namespace are refused with a clear error, repeatedly, and leave
  nothing behind: no mount, no pin, no rule in the node netns, the root netns' rules unchanged (only
  read, never written).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.simnode import SimNode

from cni.kernel.netns import NetnsFileError, open_pod_netns
from cni.plugin.agent_client import PluginEvent, send_event
from tests.kernel.agent_kit import AgentRun, headrace_rules, iptables_save, node_agent

pytestmark = pytest.mark.kernel

AMBIENT = {"istio.io/dataplane-mode": "ambient"}

SLOW_CLIENTS = r"""
import os, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
for _ in range(count):
    if os.fork() == 0:
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                    while True:
                        s.send(b" ")
                        time.sleep(1.0)
            except OSError:
                time.sleep(0.01)
print("started", flush=True)
os.wait()
"""


@pytest.fixture
def env(make_node: Any) -> Iterator[tuple[SimNode, AgentRun]]:
    node = make_node(headrace={})
    with node_agent(node, AgentRun) as (agent, _apps):
        node.add_namespace("shop", AMBIENT)
        agent.start_proxy()
        agent.start_agent()
        yield node, agent


@pytest.fixture
def slow_clients() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)  # the forked children share the process group we started
        proc.wait(10)


def test_seventy_slow_clients_do_not_starve_real_adds(env: Any, slow_clients: list[Any]) -> None:
    node, agent = env
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLIENTS, str(node.agent_socket), "70"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    slow_clients.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    time.sleep(2.0)  # every reading slot is held by now (the limit is 64)
    durations = []
    for i in range(4):
        started = time.monotonic()
        pod = node.add_pod("shop", f"p{i}")  # the real chain ADD: returns once the agent enrolled the pod
        durations.append(time.monotonic() - started)
        assert agent.pod_state(pod.uid) == "enrolled"
        assert headrace_rules(pod.netns.path), "the pod's redirect is in place"
    assert max(durations) < 10.0, durations  # the plugin's own deadline is 25 s
    assert "plugin-socket client evicted" in agent.agent_log()
    # the admission counters are exported: the slow readers were evicted (or ran out of time), the
    # reading phase never held more than its 64 slots
    metrics = samples(agent.http("/metrics")[1])
    refused = {k: v for k, v in metrics.items() if k.startswith("headrace_agent_plugin_requests_refused_total")}
    assert set(refused) == {f'headrace_agent_plugin_requests_refused_total{{reason="{r}"}}'
                            for r in ("peer_limit", "busy", "evicted", "deadline")}, refused
    assert refused['headrace_agent_plugin_requests_refused_total{reason="evicted"}'] >= 1, refused
    assert 1 <= metrics['headrace_agent_plugin_connections{phase="reading"}'] <= 64


def samples(text: str) -> dict[str, float]:
    """Prometheus text exposition: {name{labels}: value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def saved_rules(netns_path: str) -> list[str]:
    """A netns' rules in both flavours, as iptables-save prints them but its `# Generated/Completed on
    <time>` comments (a dump taken a second later differs there)."""
    dumps = iptables_save(netns_path, 4, "nft") + iptables_save(netns_path, 4, "legacy")
    return [line for line in dumps.splitlines() if not line.startswith("#")]


def root_rules() -> list[str]:
    """The machine's root netns rules, read (never written) in both flavours."""
    return saved_rules("/proc/self/ns/net")


def mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(directory))]


def test_adds_with_the_node_or_host_netns_or_no_netns_are_refused(env: Any, tmp_path: Path) -> None:
    node, agent = env
    # Guard first, in this process: the host netns (if readable here) is refused by the check the agent
    # uses, so the agent below can never be handed a namespace it would accept and modify.
    with pytest.raises(NetnsFileError):
        os.close(open_pod_netns("/proc/1/ns/net", "agent"))
    (tmp_path / "regular").write_text("")
    (tmp_path / "dir").mkdir()
    os.symlink("/proc/self/ns/net", tmp_path / "link-self")
    os.symlink("/proc/1/ns/net", tmp_path / "link-host")
    targets = {
        "/proc/self/ns/net": "own (node) network namespace",  # resolved by the agent: its own netns
        "/proc/1/ns/net": "",  # the host's: refused as such, or unopenable where pid 1 is out of reach
        str(tmp_path / "regular"): "not a namespace file",
        str(tmp_path / "dir"): "is a directory",
        str(tmp_path / "link-self"): "own (node) network namespace",
        str(tmp_path / "link-host"): "",
    }
    root_before = root_rules()
    node_before = saved_rules(node.netns.path)
    for _ in range(5):
        for netns, why in targets.items():
            uid = str(uuid.uuid4())
            event = PluginEvent("ADD", "c1", netns, "eth0", "shop", "evil", uid, ("10.9.9.9",), "ambient")
            reply = send_event(str(node.agent_socket), event, timeout=10)
            assert not reply.ok and not reply.retry, reply
            assert reply.error.startswith("netns refused: ") and why in reply.error, reply.error
            assert agent.pod_state(uid) == "absent"
    assert mounts_under(node.state_dir) == []
    assert not (node.state_dir / "netns").exists() or list((node.state_dir / "netns").iterdir()) == []
    node_after = saved_rules(node.netns.path)
    assert not any("HEADRACE_AM" in line for line in node_after)
    assert node_after == node_before
    assert root_rules() == root_before
