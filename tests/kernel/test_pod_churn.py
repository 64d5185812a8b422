"""Pods come and go for a while, leaving the node every way a pod leaves one; afterwards the agent holds
no more than it held before the churn: file descriptors, threads, netns pins and their mounts, enrolment
records, the node's eBPF entries and TC slots, watched netns, workloads and operations waiting for acks
on both proxy transports (the one the proxy speaks, gRPC or ZDS, and the other).

Each cycle makes ambient pods and a sidecar pod through the real chain (each ambient ADD answered once the
pod is enrolled) and removes them:
- by CNI DEL, as the kubelet removes a pod;
- the pod object first (deleted in the API), its DEL after the agent has let it go;
- the sandbox gone with no DEL (infra process killed, netns deleted, object removed: a runtime that lost
  it), the DEL only afterwards, on a netns that no longer exists.
A leak per pod shows as at least one descriptor (or entry) per pod left, over the cycles after a first
one that warms the agent up (its thread pools, caches, the proxy connection).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from node_agent.lab.simnode import SimNode
from node_agent.serve.status_client import query

from tests.kernel.agent_kit import AgentRun, wait_for
from tests.kernel.test_ambient_e2e import env as env  # a node with the agent on `backend`, proxy on `protocol`
from tests.kernel.test_ambient_e2e import protocol as protocol  # ("grpc", "zds")
from tests.kernel.test_backend_parity import AMBIENT, SIDECAR, anything_of_ours
from tests.kernel.test_backend_parity import backend as backend  # the (iptables, nftables, ebpf) fixture
from tests.kernel.test_backend_parity import ebpf_env as ebpf_env  # a node with the agent on eBPF

pytestmark = pytest.mark.kernel

CYCLES = 4  # the first warms the agent up; the others must leave nothing
AMBIENT_PER_CYCLE = 5
SLACK = 3  # descriptors or threads that may come and go on their own (a pooled thread, a status socket)


def held(agent: AgentRun) -> tuple[int, int, int]:
    """The agent process's open descriptors and threads, and the proxy's descriptors (with ZDS it is
    given each pod's netns as one)."""
    assert agent.agent is not None and agent.proxy is not None
    pid = agent.agent.pid
    return (len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")),
            len(os.listdir(f"/proc/{agent.proxy.pid}/fd")))


def node_entries(node: SimNode) -> dict[str, int]:
    """How many entries each node eBPF map of pods' parameters holds (none when there are no node maps)."""
    from node_agent.backends.ebpf import bpfsys, pinning, pod_index

    sizes = {pod_index.CONFIG: 8, pod_index.PORTS: pod_index.PORT_KEY.size, pod_index.NETS: pod_index.NET_KEY.size,
             pod_index.TC: 4}
    out: dict[str, int] = {}
    for name, size in sizes.items():
        fd = pinning.open_pinned(node.state_dir / "bpf" / pinning.NODE_DIR / name)
        if fd is None:
            continue
        try:
            out[name] = len(bpfsys.map_keys(fd, size))
        finally:
            os.close(fd)
    return out


def state_files(node: SimNode) -> list[str]:
    """Pins, records and per-pod eBPF pin directories in the agent's state dir, and nsfs mounts under it."""
    state = node.state_dir
    found = [f"pin {p.name}" for p in (state / "netns").glob("*")] if (state / "netns").is_dir() else []
    found += [f"record {p.name}" for p in (state / "pods").glob("*")] if (state / "pods").is_dir() else []
    bpf = state / "bpf"
    found += [f"bpf {p.name}" for p in bpf.iterdir() if p.name != "node" and p.is_dir()] if bpf.is_dir() else []
    with open("/proc/self/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if line.split()[1].startswith(str(state / "netns"))]
    return sorted(found)


def proxy_settled(agent: AgentRun) -> bool:
    """No workload and no operation waiting for an ack on either transport: the one the proxy speaks, and
    the other, which none speaks."""
    grpc = query(agent.cni_socket, 10)["proxy"]
    return all((t["workloads"], t["pending"]) == (0, 0) for t in (grpc, grpc["zds"]))


def one_cycle(node: SimNode, agent: AgentRun, n: int) -> list[str]:
    """Make this cycle's pods, then remove them every way; what of ours was left in the pods whose netns
    outlived the agent's hold on them (the pod object deleted first)."""
    pods = [node.add_pod("shop", f"a{n}-{i}") for i in range(AMBIENT_PER_CYCLE)]
    pods.append(node.add_pod("web", f"s{n}", annotations=SIDECAR))
    states = agent.status()
    assert all(states[p.uid]["state"] == "enrolled" for p in pods[:AMBIENT_PER_CYCLE]), states
    by_del, object_first, vanished = pods[:2] + pods[-1:], pods[2:4], pods[4]
    for pod in by_del:
        node.remove_pod(pod)
    for pod in object_first:
        (node.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").unlink()
    node.vanish_pod(vanished)
    wait_for(lambda: not agent.status(), 20, "every pod let go")
    left = [f"{pod.name}: {x}" for pod in object_first for x in anything_of_ours(node, pod)]
    for pod in [*object_first, vanished]:
        node.remove_pod(pod)  # the kubelet's DEL, late (for the vanished pod: its netns is gone)
    return left


def test_pods_that_come_and_go_leave_the_agent_as_it_was(env: Any, backend: str, protocol: str) -> None:
    node, agent, _apps = env
    node.add_namespace("shop", AMBIENT)
    node.add_namespace("web")
    agent.start_proxy()
    agent.start_agent()
    assert one_cycle(node, agent, 0) == []
    before = held(agent)
    for n in range(1, CYCLES):
        assert one_cycle(node, agent, n) == []
    after = held(agent)
    assert after[0] <= before[0] + SLACK, f"descriptors {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + SLACK, f"threads {before[1]} -> {after[1]}"
    assert after[2] <= before[2] + SLACK, f"proxy descriptors {before[2]} -> {after[2]}"
    assert state_files(node) == []
    assert all(count == 0 for count in node_entries(node).values()), node_entries(node)
    assert proxy_settled(agent), query(agent.cni_socket, 10)["proxy"]
    assert agent.metric("headrace_agent_drift_watched_pods") == 0
    failures = [line for line in agent.agent_log().splitlines() if "enrol-failed" in line]
    assert agent.metric("headrace_agent_enrolment_failures_total") == 0, "\n".join(failures)


@pytest.mark.parametrize("protocol", ["grpc"])
def test_pods_that_leave_while_the_agent_is_down_are_let_go_after_its_restart(env: Any, backend: str) -> None:
    """SIGKILL the agent, then pods leave: by DEL (the plugin alone: the agent does not answer), with the
    sandbox vanishing, or with the object deleted and the DEL still to come. The restarted agent adopts
    them from their records and pins, finds them gone from the source and lets them go: nothing of theirs
    is left in the state dir, the node maps or at the proxy."""
    node, agent, _apps = env
    node.add_namespace("shop", AMBIENT)
    node.add_namespace("web")
    agent.start_proxy()
    agent.start_agent()
    pods = [node.add_pod("shop", f"a{i}") for i in range(4)]
    pods.append(node.add_pod("web", "s", annotations=SIDECAR))
    agent.kill_agent()
    for pod in (pods[0], pods[1], pods[4]):
        node.remove_pod(pod)
    node.vanish_pod(pods[2])
    (node.objects_dir / f"pod-{pods[3].namespace}-{pods[3].name}.json").unlink()
    agent.start_agent()
    wait_for(lambda: not agent.status(), 20, "every pod let go")
    left = anything_of_ours(node, pods[3])
    node.remove_pod(pods[3])
    node.remove_pod(pods[2])
    assert left == []
    assert state_files(node) == []
    assert all(count == 0 for count in node_entries(node).values()), node_entries(node)
    # the removals wait for the proxy, back after its reconnect back-off, to ack a snapshot without them
    wait_for(lambda: proxy_settled(agent), 15, "nothing at the proxy or waiting for it")


def test_an_ebpf_pod_whose_cgroup_goes_before_the_agent_learns_of_it_is_no_enrolment_failure(ebpf_env: Any) -> None:
    """The pod's sandbox torn down, its cgroup removed, the pod object still there (its deletion or the DEL
    not come yet): the eBPF drift check finds the programs' cgroup gone and cannot attach them again. No
    process of the pod is left to send traffic: said in the pod's status, logged at info, not counted as
    an enrolment failure (it was a warning and a failure per retry). The object's removal lets it go."""
    node, agent, _apps = ebpf_env
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    pod = node.add_pod("shop", "a")
    node.vanish_pod(pod, object_too=False)
    wait_for(lambda: "cgroup gone" in agent.status()[pod.uid]["reason"], 10, "the drift check's look")
    time.sleep(1.5)  # a retry or two
    failures = [line for line in agent.agent_log().splitlines() if "enrol-failed" in line]
    assert agent.metric("headrace_agent_enrolment_failures_total") == 0, "\n".join(failures)
    (node.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").unlink()
    wait_for(lambda: not agent.status(), 10, "the pod let go")
    node.remove_pod(pod)
    assert state_files(node) == []
    assert all(count == 0 for count in node_entries(node).values()), node_entries(node)
