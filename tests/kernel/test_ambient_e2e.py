"""Ambient mode end to end on the real kernel: a simulated node (bridge + host-local + headrace-cni),
the agent and the reference proxy running in the node netns, real TCP between two pods.

Proves the ambient flows: running pods enrolled by a namespace label without a restart (traffic then
passes the proxy, which names both workloads, the original destination and the byte counts), a
long-lived connection surviving enrolment, SIGKILL + restart without duplicate rules and with a fresh
snapshot, drift repair, a new ambient pod enrolled before ADD returns, unlabel back to direct, and with
the agent down: ambient ADD fails, a non-mesh ADD succeeds. test_ambient_end_to_end runs on both backends
(iptables, ebpf: pods in kubelet-like cgroups, clients inside them, the proxy in its own cgroup) and over
both proxy protocols (gRPC, and ztunnel's ZDS with the netns handed over as an fd).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from node_agent.lab.simnode import SimNode
from node_agent.lab.traffic import tcp_request

from cni.kernel.netns import entered
from tests.kernel.agent_kit import AgentRun, node_agent, run, wait_for
from tests.kernel.test_backend_parity import PORT as PORT
from tests.kernel.test_backend_parity import anything_of_ours, bpftool_cgroup, node_env, ours, request, start_app
from tests.kernel.test_backend_parity import backend as backend  # the ("iptables", "ebpf") fixture

pytestmark = pytest.mark.kernel

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
Env = tuple[SimNode, AgentRun, list[subprocess.Popen[bytes]]]


@pytest.fixture(params=["grpc", "zds"])
def protocol(request: pytest.FixtureRequest) -> str:
    """What the reference proxy speaks: headrace's gRPC protocol, or ztunnel's ZDS (netns fds)."""
    return str(request.param)


@pytest.fixture
def env(make_node: Any, backend: str, protocol: str) -> Iterator[Env]:
    """A node with pod cgroups and the agent on `backend` (param of the parity module's fixture), the
    proxy speaking `protocol`."""
    for node, agent, apps in node_env(make_node, backend):
        agent.protocol = protocol
        yield node, agent, apps


def redirection(node: SimNode, pod: Any) -> str | None:
    """The pod's ambient.istio.io/redirection annotation in its object file (the agent writes it back)."""
    obj = json.loads((node.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").read_text())
    return (obj["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection")


def tcp_loose(pod: Any) -> str:
    argv = ["nsenter", f"--net={pod.netns.path}", "sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose"]
    return run(argv).stdout.strip()


def _env(sim_node: SimNode) -> Generator[tuple[SimNode, AgentRun, list[subprocess.Popen[bytes]]], None, None]:
    with node_agent(sim_node, AgentRun) as (agent, apps):
        yield sim_node, agent, apps


def test_ambient_end_to_end(env: Any, backend: str, protocol: str) -> None:
    node, agent, apps = env
    node.add_namespace("shop")
    node.add_namespace("plain")
    client = node.add_pod("shop", "client")
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)
    agent.start_proxy()
    agent.start_agent()
    uids = (client.uid, server.uid)

    # 1. before enrolment: direct, the proxy sees nothing
    assert request(client, server.ipv4, b"hello") == b"server|hello"
    assert agent.proxy_lines() == []
    with entered(client.netns.path):
        held = socket.socket()
    held.settimeout(5)
    held.connect((server.ipv4, PORT))
    held.sendall(b"one")
    assert held.recv(100) == b"server|one"

    try:
        # 2. label the namespace: both running pods enrolled, nothing restarted
        node.set_namespace_labels("shop", AMBIENT)
        wait_for(lambda: all(agent.pod_state(u) == "enrolled" for u in uids), 30, "pods enrolled")
        assert {agent.status()[u]["backend"] for u in uids} == {backend}
        # as istio-cni does: the enrolled pods carry the redirection annotation (objects-dir: in the file)
        wait_for(lambda: all(redirection(node, p) == "enabled" for p in (client, server)), 15, "annotation set")
        rules = {u: ours(p, backend) for u, p in ((client.uid, client), (server.uid, server))}
        assert all(rules.values())

        # 3. the next connection passes the proxy (outbound at the client, inbound at the server)
        assert request(client, server.ipv4, b"through") == b"server|through"
        dst = f"{server.ipv4}:{PORT}"

        def proxied() -> list[dict[str, Any]]:
            lines = agent.proxy_lines()
            out = [
                x
                for x in lines
                if x.get("direction") == "outbound" and x.get("workload") == "shop/client" and x.get("dst") == dst
            ]
            inn = [x for x in lines if x.get("direction") == "inbound" and x.get("workload") == "shop/server"]
            return out + inn if out and inn else []

        lines = wait_for(proxied, 10, "proxy connection lines")
        outbound = next(x for x in lines if x["direction"] == "outbound")
        assert outbound["bytes_sent"] == len(b"through") and outbound["bytes_received"] == len(b"server|through")
        assert outbound["src"].startswith(client.ipv4)

        # CHECK through the real chain: the plugin asks the agent, which verifies the rules
        node.runner().check(client.container_id, client.netns.path, args=client.cni_args)

        # 4. the connection opened before enrolment still works (not redirected mid-flight): the guard set
        # nf_conntrack_tcp_loose to 0 in the pod before its rules went in
        held.sendall(b"still-here")
        assert held.recv(100) == b"server|still-here"
        assert tcp_loose(client) == "0"

        # 5. SIGKILL + restart: rules unchanged (no duplicates), the proxy gets a fresh snapshot
        agent.kill_agent(signal.SIGKILL)
        assert request(client, server.ipv4, b"agent-down") == b"server|agent-down"
        agent.start_agent()
        wait_for(lambda: all(agent.pod_state(u) == "enrolled" for u in uids), 30, "re-enrolled")
        assert {client.uid: ours(client, backend), server.uid: ours(server, backend)} == rules
        wait_for(lambda: agent.proxy_log().count("snapshot_applied") >= 2, 15, "a fresh snapshot")
        seen = len(agent.proxy_lines())
        assert request(client, server.ipv4, b"after-restart") == b"server|after-restart"
        wait_for(lambda: len(agent.proxy_lines()) > seen, 10, "proxied after restart")

        # 5b. proxy restart: pods keep their rules meanwhile; the new proxy gets the snapshot, traffic resumes
        assert agent.proxy is not None
        agent.proxy.kill()
        agent.proxy.wait(10)
        assert {client.uid: ours(client, backend), server.uid: ours(server, backend)} == rules
        with pytest.raises(OSError):
            # fails closed
            tcp_request(client.netns.path, server.ipv4, PORT, b"no-proxy", timeout=2, cgroup=client.cgroup)
        agent.start_proxy()
        wait_for(lambda: "snapshot_applied" in agent.proxy_log(), 15, "snapshot to the new proxy")
        assert request(client, server.ipv4, b"new-proxy") == b"server|new-proxy"
        wait_for(
            lambda: any(x.get("workload") == "shop/client" for x in agent.proxy_lines()),
            10,
            "the new proxy carries the traffic",
        )

        # 6. drift: flush the pod's nat table -> repaired within seconds
        if backend == "iptables":
            run(["nsenter", f"--net={client.netns.path}", "iptables-nft", "-t", "nat", "-F"])
        elif backend == "nftables":
            run(["nsenter", f"--net={client.netns.path}", "nft", "flush", "table", "inet", "headrace"])
        else:
            prog = next(p for p in bpftool_cgroup(client.pod_cgroup) if p["name"] == "hr_connect4")
            assert client.pod_cgroup is not None
            run(["bpftool", "cgroup", "detach", client.pod_cgroup, prog["attach_type"], "id", str(prog["id"])])
        t0 = time.monotonic()
        wait_for(lambda: ours(client, backend) == rules[client.uid], 10, "drift repaired")
        assert time.monotonic() - t0 < 10
        wait_for(lambda: agent.metric("headrace_agent_drift_repairs_total") >= 1, 5, "drift metric")

        # 7. a new pod in the ambient namespace: enrolled before its ADD returns
        late = node.add_pod("shop", "late")
        assert agent.pod_state(late.uid) == "enrolled"
        assert ours(late, backend)
        # the transport the proxy speaks counts its sessions and acks
        metrics = agent.http("/metrics")[1]
        key = f'headrace_agent_proxy_acks_total{{protocol="{protocol}"}}'
        acks = [ln for ln in metrics.splitlines() if ln.startswith(key)]
        assert acks and float(acks[0].rsplit(" ", 1)[1]) >= 3, acks
        assert f'headrace_agent_proxy_connections{{protocol="{protocol}"}} 1.0' in metrics

        # 8. remove the label: rules gone, traffic direct again
        node.set_namespace_labels("shop", {})
        wait_for(lambda: not any(ours(p, backend) for p in (client, server, late)), 30, "rules removed")
        wait_for(lambda: not any(redirection(node, p) for p in (client, server, late)), 15, "annotation removed")
        seen = len(agent.proxy_lines())
        assert request(client, server.ipv4, b"direct-again") == b"server|direct-again"
        time.sleep(0.5)
        assert len(agent.proxy_lines()) == seen
        held.sendall(b"last")
        assert held.recv(100) == b"server|last"
        assert tcp_loose(client) == "1"  # restored as it was found
    finally:
        held.close()

    # 9. agent stopped: an ambient pod's ADD fails clearly, a non-mesh pod's ADD succeeds
    node.set_namespace_labels("shop", AMBIENT)
    agent.kill_agent(signal.SIGTERM)
    with pytest.raises(Exception, match=r"(?i)agent"):
        node.add_pod("shop", "orphan")
    plain = node.add_pod("plain", "ok")
    assert plain.ipv4 and not anything_of_ours(node, plain)


# iptables-only: `--backend auto` falling back to iptables for pods without a cgroup is the point.
def test_backend_auto_falls_back_to_iptables_for_pods_without_cgroup(make_node: Any, protocol: str) -> None:
    """With `--backend auto` on a node where eBPF runs, pods whose cgroup is unknown (the harness's bare
    netns) are enrolled with iptables; status says so and traffic passes the proxy."""
    node = make_node(headrace={})
    gen = _env(node)
    node, agent, apps = next(gen)
    try:
        agent.protocol = protocol
        agent.extra = ["--backend", "auto"]
        node.add_namespace("shop", AMBIENT)
        agent.start_proxy()
        agent.start_agent()
        client = node.add_pod("shop", "client")  # ADD returns once enrolled
        server = node.add_pod("shop", "server")
        start_app(server.netns.path, "server", apps)
        rows = agent.status()
        assert rows[client.uid]["state"] == "enrolled" and rows[client.uid]["backend"] == "iptables"
        assert request(client, server.ipv4, b"auto") == b"server|auto"
        wait_for(lambda: any(x.get("workload") == "shop/client" for x in agent.proxy_lines()), 10, "proxied")
    finally:
        gen.close()
