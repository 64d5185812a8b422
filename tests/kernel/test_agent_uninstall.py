"""The agent leaves the node only when its DaemonSet goes away, on every backend.

The agent watches a local API server (real list/watch JSON, inside the node netns) that mirrors the lab's
objects dir and answers the DaemonSet GET as the test says. Ambient client and server pods are enrolled,
then the agent gets SIGTERM three times:

- the DaemonSet still there (a rolling update): everything stays, the next agent adopts it;
- the DaemonSet's access gone (403, `kubectl delete -k` took the RBAC first), `--on-uninstall keep`: the
  node's probe SNAT is gone from the host, the pods keep their redirection (fail closed) but no pin or
  record holds them; an agent installed again with another backend takes them over, moving them off what
  the first one left (as after a backend switch);
- the DaemonSet being deleted, `--on-uninstall release`: nothing of ours in the ambient pods, no pins or
  records left, the redirection annotation removed, and the client reaches the server directly; the
  sidecar pod (held by the agent too) keeps its rules.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.install_cni.owner import daemonset_path
from node_agent.lab.simnode import Pod
from node_agent.sources.redirection_mark import ANNOTATION

from cni.kernel.netns import run_in_thread
from tests.kernel.agent_kit import wait_for
from tests.kernel.test_agent_backend_move import ARGS, left_by_others, node_snat
from tests.kernel.test_agent_first_compile import AMBIENT, assert_proxied, shop
from tests.kernel.test_agent_settings_change import any_backend  # noqa: F401 - the fixture
from tests.kernel.test_backend_parity import SIDECAR, anything_of_ours, request
from tests.unit.agent_fake_apiserver import FakeApiServer

pytestmark = pytest.mark.kernel

NAMESPACE, DAEMONSET = "headrace-system", "headrace-agent"
# the backend the agent is installed again with, after an uninstall that kept the pods' redirection
REINSTALL = {"iptables": "nftables", "nftables": "iptables", "ebpf": "nftables"}


class Mirror:
    """Copies the lab's objects dir into the API server as it changes (pods and namespaces)."""

    def __init__(self, objects_dir: Path, api: FakeApiServer) -> None:
        self.dir, self.api = objects_dir, api
        self.seen: dict[str, tuple[str, str, str, str]] = {}  # file: (text, kind, namespace, name)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(0.05):
            self.sync()

    def sync(self) -> None:
        now = {f.name: f.read_text() for f in self.dir.glob("*.json")}
        for name, text in now.items():
            if self.seen.get(name, ("",))[0] == text:
                continue
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            kind = "pods" if obj.get("kind") == "Pod" else "namespaces"
            meta = obj["metadata"]
            self.api.put(kind, obj)
            self.seen[name] = (text, kind, meta.get("namespace", ""), meta["name"])
        for name in set(self.seen) - set(now):
            _text, kind, namespace, obj_name = self.seen.pop(name)
            self.api.delete(kind, namespace, obj_name)


@pytest.fixture
def on_api(any_backend: tuple[str, Any], tmp_path: Path) -> Iterator[tuple[str, Any, FakeApiServer]]:  # noqa: F811
    """(backend, (node, agent, apps), api): the agent (not started) watching the API server, its
    DaemonSet present."""
    backend, (node, agent, apps) = any_backend
    api = run_in_thread(node.netns.path, FakeApiServer)  # its socket listens in the node netns
    api.start()
    mirror = Mirror(node.objects_dir, api)
    mirror.thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(kubeconfig)
    api.set_daemonset(NAMESPACE, DAEMONSET, "present")
    agent.source = ["--kubeconfig", str(kubeconfig), "--node-name", node.netns.name]
    agent.extra = [*agent.extra, "--owner-daemonset", DAEMONSET, "--agent-namespace", NAMESPACE]
    try:
        yield backend, (node, agent, apps), api
    finally:
        mirror.stopped.set()
        mirror.thread.join(5)
        api.stop()


def start(agent: Any, api: FakeApiServer) -> None:
    """Start the agent and let it see its DaemonSet (its look at start: a 404 or 403 counts only after it)."""
    path = daemonset_path(NAMESPACE, DAEMONSET)
    before = sum(1 for p, _q in api.requests if p == path)
    agent.start_agent()
    wait_for(lambda: sum(1 for p, _q in api.requests if p == path) > before, 20, "the agent's look at its DaemonSet")
    time.sleep(0.3)  # its answer taken in


def pinned(node: Any, pod: Pod) -> bool:
    """The pod's netns pin and its record on the node."""
    return (node.state_dir / "netns" / pod.uid).exists() and any((node.state_dir / "pods").glob(f"{pod.uid}*"))


def redirected(node: Any, pods: tuple[Pod, ...]) -> None:
    for pod in pods:
        assert anything_of_ours(node, pod), f"{pod.name} lost its redirection"


def test_the_agent_leaves_the_node_only_when_its_daemonset_goes_away(
        on_api: tuple[str, Any, FakeApiServer]) -> None:
    backend, (node, agent, apps), api = on_api
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    start(agent, api)
    client, server = pods = shop(node, agent, apps)
    sidecar = node.add_pod("shop", "sidecar", annotations=SIDECAR)  # held by the agent
    wait_for(lambda: pinned(node, sidecar), 20, "the sidecar pod held")
    kind = node_snat(node.netns.path)
    assert len(kind) == 1

    agent.kill_agent(signal.SIGTERM)  # a rolling update
    assert "DaemonSet still present" in agent.agent_log()
    assert node_snat(node.netns.path) == kind
    redirected(node, (*pods, sidecar))
    assert all(pinned(node, p) for p in (*pods, sidecar))

    start(agent, api)
    assert_proxied(agent, client, server)
    api.set_daemonset(NAMESPACE, DAEMONSET, "forbidden")
    agent.kill_agent(signal.SIGTERM)  # uninstalled, pods kept: their rules stay, our hold on them goes
    assert "DaemonSet going away" in agent.agent_log()
    assert node_snat(node.netns.path) == set()
    redirected(node, (*pods, sidecar))
    assert not any(pinned(node, p) for p in (*pods, sidecar))

    # installed again, with another backend (and release this time): the pods are taken over, what the
    # first backend left in them moved off (the annotation says they were redirected), and proxied
    api.set_daemonset(NAMESPACE, DAEMONSET, "present")
    again = REINSTALL[backend]
    agent.extra = [*ARGS[again], *agent.extra[len(ARGS[backend]):], "--on-uninstall", "release"]
    start(agent, api)
    wait_for(lambda: len(node_snat(node.netns.path)) == 1, 20, "the node's probe SNAT back")
    wait_for(lambda: all(agent.pod_state(p.uid) == "enrolled" for p in pods), 20, "the ambient pods enrolled")
    assert {agent.status()[p.uid]["backend"] for p in pods} == {again}
    wait_for(lambda: not any(left_by_others(p, again) for p in pods), 20, f"nothing of {backend} left")
    assert f"pod still redirected by the {backend} backend" in agent.agent_log()
    assert_proxied(agent, client, server)
    wait_for(lambda: all(api.objects["pods"][f"shop/{p.name}"]["metadata"].get("annotations", {}).get(ANNOTATION)
                         for p in pods), 20, "the pods annotated")
    api.set_daemonset(NAMESPACE, DAEMONSET, "deleting")
    agent.kill_agent(signal.SIGTERM)  # uninstalled, ambient pods released
    assert [p for p in pods if anything_of_ours(node, p)] == []
    redirected(node, (sidecar,))  # its proxy is in the pod
    assert node_snat(node.netns.path) == set()
    assert list((node.state_dir / "netns").iterdir()) == [] and list((node.state_dir / "pods").iterdir()) == []
    if backend != "ebpf":  # (an eBPF sidecar pod keeps its programs, and their pins)
        bpffs = str(node.state_dir / "bpf")
        assert not any(line.split()[1] == bpffs for line in Path("/proc/self/mounts").read_text().splitlines())
    for p in pods:
        assert ANNOTATION not in api.objects["pods"][f"shop/{p.name}"]["metadata"].get("annotations", {})
    assert not (node.state_dir / "bpf" / client.uid).exists() and not (node.state_dir / "bpf" / server.uid).exists()
    seen = len(agent.proxy_lines())
    assert request(client, server.ipv4, b"direct") == b"server|direct"
    assert not [x for x in agent.proxy_lines()[seen:] if x.get("workload", "").startswith("shop/")], backend
