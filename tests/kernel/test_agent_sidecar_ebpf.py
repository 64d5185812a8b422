"""A sidecar pod the plugin hands to the agent (`backend: ebpf` in the conflist) survives an agent restart
like an ambient pod, through the product path (node + pod cgroups + agent from test_backend_parity):
recorded and pinned → SIGKILL + new agent adopts it without re-applying (same program ids) and outbound
still lands on 15001 with SO_ORIGINAL_DST → a program detached with bpftool is repaired within seconds
(counted) → CNI DEL leaves nothing (bpftool cgroup show empty, no record, no pin)."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
from node_agent.lab.traffic import Listener, tcp_request

from tests.kernel.agent_kit import run, wait_for
from tests.kernel.test_ambient_e2e import PORT
from tests.kernel.test_backend_parity import SIDECAR, anything_of_ours, bpftool_cgroup, ebpf_env, ebpf_ids

pytestmark = pytest.mark.kernel

__all__ = ["ebpf_env"]  # the fixture, used by name


def test_sidecar_pod_survives_agent_restart_with_drift_repair(ebpf_env: Any) -> None:
    node, agent, _apps = ebpf_env
    agent.start_agent()
    peer = node.add_pod("plain", "peer")
    pod = node.add_pod("app", "web", annotations={**SIDECAR, "traffic.sidecar.istio.io/excludeOutboundPorts": "9090"})
    record = node.state_dir / "pods" / f"{pod.uid}.json"
    pin = node.state_dir / "netns" / pod.uid

    ids = ebpf_ids(pod)
    assert ids, "no eBPF program on the pod's cgroup"
    rec = json.loads(record.read_text())
    assert (rec["mode"], rec["backend"]) == ("sidecar", "ebpf")
    assert dict(rec["annotations"]) == {"traffic.sidecar.istio.io/excludeOutboundPorts": "9090"}
    assert pin.exists()

    # SIGKILL + restart: adopted, nothing re-attached, still redirected
    agent.kill_agent(signal.SIGKILL)
    agent.start_agent()
    wait_for(lambda: agent.status().get(pod.uid, {}).get("state") == "enrolled", 15, "sidecar pod adopted")
    row = agent.status()[pod.uid]
    assert (row["mode"], row["backend"]) == ("sidecar", "ebpf")
    assert ebpf_ids(pod) == ids, "adoption must not attach programs again"
    with (
        Listener(pod.netns.path, 15001, cgroup=pod.cgroup, label="outbound") as out4,
        Listener(peer.netns.path, PORT, label="peer"),
    ):
        assert tcp_request(pod.netns.path, peer.ipv4, PORT, b"after", cgroup=pod.cgroup) == b"outbound|after"
        assert out4.wait_one().original_dst == (peer.ipv4, PORT)

        # drift: one of our programs detached → re-attached by the new agent within seconds, counted (the
        # repair can come before a read of the programs here could see one gone: the repair count tells)
        progs = bpftool_cgroup(pod.pod_cgroup)
        prog = next((p for p in progs if p["name"] == "hr_connect4"), None)
        assert prog is not None and pod.pod_cgroup is not None, progs
        repairs = agent.metric("headrace_agent_drift_repairs_total")
        run(["bpftool", "cgroup", "detach", pod.pod_cgroup, prog["attach_type"], "id", str(prog["id"])])
        wait_for(lambda: agent.metric("headrace_agent_drift_repairs_total") > repairs, 10, "the detach repaired")
        wait_for(lambda: len(ebpf_ids(pod)) == len(ids), 10, "detached program back")
        assert tcp_request(pod.netns.path, peer.ipv4, PORT, b"fixed", cgroup=pod.cgroup) == b"outbound|fixed"
        assert out4.wait_one().original_dst == (peer.ipv4, PORT)

    # CNI DEL: no program, no record, no pin
    node.runner().delete(pod.container_id, pod.netns.path, args=pod.cni_args)
    wait_for(lambda: not anything_of_ours(node, pod), 10, "nothing of ours after DEL")
    assert not bpftool_cgroup(pod.pod_cgroup)
    assert not record.exists() and not pin.exists()
    assert pod.uid not in agent.status() or agent.status()[pod.uid]["state"] == "none"
