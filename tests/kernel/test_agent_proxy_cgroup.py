"""Ambient over eBPF without --proxy-cgroup: the agent learns the node proxy's cgroup from its connection.

A simulated node (pods in kubelet-like cgroups), the agent with `--backend ebpf` and no --proxy-cgroup, the
reference proxy as a real process in the node netns:
- a proxy left in the agent's own cgroup (the root cgroup here) is refused: status says why, the ambient
  pod enrolled meanwhile goes to the iptables fallback and its traffic still passes the proxy;
- the proxy restarted in its own cgroup (`headrace proxy --cgroup A`) is detected (status: A, source peer;
  metric), the original-destination program sits on A, and new ambient pods are enrolled on eBPF: real
  traffic from the client pod reaches the proxy, which reports the original destination;
- the proxy restarted into cgroup B: the agent follows (program on B, none left on A), traffic still
  reaches the proxy with the original destination;
- agent SIGKILL + restart: it starts from the saved cgroup (one program on B), and re-enrols the pod that was
  on the iptables fallback on eBPF; the proxy moved to C while the agent was down: the program moves B → C;
- with --proxy-cgroup the flag wins over the detected cgroup, and the agent logs both.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.simnode import SimNode

from tests.kernel.agent_kit import HEADRACE, AgentRun, run, wait_for
from tests.kernel.test_backend_parity import (
    PORT,
    ParityRun,
    bpftool_cgroup,
    ebpf_state,
    inbound_only_rules,
    iptables_state,
    proxied,
    request,
    start_app,
)
from tests.kernel.test_backend_parity import ebpf_env as ebpf_env  # node + agent (ParityRun) on ebpf

pytestmark = pytest.mark.kernel

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def proxy_cgroup(agent: AgentRun) -> dict[str, Any]:
    try:
        from node_agent.serve.status_client import query

        got = query(agent.cni_socket, 10).get("proxy_cgroup")
    except Exception:
        return {}
    return got if isinstance(got, dict) else {}


def source_metric(agent: AgentRun) -> dict[str, float]:
    _, text = agent.http("/metrics")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("headrace_agent_proxy_cgroup_source{"):
            label = line.split('source="', 1)[1].split('"', 1)[0]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def getsockopt_on(cgroup: Path) -> list[str]:
    return [p["name"] for p in bpftool_cgroup(str(cgroup)) if p.get("attach_type") == "cgroup_getsockopt"]


def restart_proxy(agent: ParityRun, cgroup: Path) -> None:
    if agent.proxy is not None:
        agent.proxy.kill()
        agent.proxy.wait(10)
    agent.proxy_cgroup = cgroup
    agent.start_proxy()


def test_agent_follows_the_proxy_cgroup(ebpf_env: Any) -> None:
    node: SimNode
    node, agent, apps = ebpf_env
    agent.extra = ["--backend", "ebpf"]  # no --proxy-cgroup
    node.add_namespace("early", AMBIENT)
    node.add_namespace("shop", AMBIENT)
    agent.start_agent()
    # before any pod: the node maps and both pod modes' programs are made at start (EbpfBackend.prepare)
    node_dir = node.state_dir / "bpf" / "node"
    wanted = {"hr_connect4_amb", "hr_connect4_sc", "hr_sendmsg4", "hr_tc_ingress_node"}
    wait_for(lambda: wanted <= {p.name for p in node_dir.glob("progs-*/*")}, 15, "node programs made at start")

    # 1. a proxy in the agent's own cgroup (here: the root cgroup) is refused; ambient pods use iptables
    AgentRun.start_proxy(agent)
    assert agent.proxy is not None
    wait_for(lambda: "refused" in proxy_cgroup(agent).get("problem", ""), 15, "the proxy's cgroup refused")
    st = proxy_cgroup(agent)
    assert st["source"] == "none" and st["path"] == "" and st["detected_pid"] == agent.proxy.pid
    assert "proxy cgroup not used: refused" in agent.agent_log()
    early = node.add_pod("early", "early")  # ADD returns once enrolled
    srv0 = node.add_pod("early", "srv0")
    start_app(srv0.netns.path, "srv0", apps)
    assert agent.status()[early.uid]["backend"] == "iptables" and iptables_state(early) and not ebpf_state(early)
    assert request(early, srv0.ipv4, b"fallback") == b"srv0|fallback"
    wait_for(lambda: proxied(agent, "early/early", "early/srv0", f"{srv0.ipv4}:{PORT}"), 10, "proxied (iptables)")

    # 2. the proxy restarted in its own cgroup: detected, and new ambient pods go on eBPF
    cg_a = node.proxy_cgroup()
    restart_proxy(agent, cg_a)
    wait_for(lambda: proxy_cgroup(agent).get("path") == str(cg_a), 15, "proxy cgroup A detected")
    st = proxy_cgroup(agent)
    assert st["source"] == "peer" and st["problem"] == "" and st["detected_pid"] == agent.proxy.pid
    assert source_metric(agent) == {"flag": 0.0, "peer": 1.0, "none": 0.0}
    table = run([HEADRACE, "status", "--cni-socket", agent.cni_socket]).stdout
    assert f"proxy cgroup: {cg_a} (peer)" in table
    client = node.add_pod("shop", "client")
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)
    rows = agent.status()
    assert rows[client.uid]["backend"] == "ebpf" and rows[server.uid]["backend"] == "ebpf"
    assert ebpf_state(client) and inbound_only_rules(client)  # ambient inbound: the rules backend's
    assert getsockopt_on(cg_a)
    dst = f"{server.ipv4}:{PORT}"
    assert request(client, server.ipv4, b"via-a") == b"server|via-a"
    lines = wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst), 10, "proxied with cgroup A")
    out = next(x for x in lines if x["direction"] == "outbound")
    assert out["src"].startswith(client.ipv4) and out["bytes_sent"] == len(b"via-a")

    # 3. the proxy restarts into another cgroup: the agent follows
    cg_b = node.cgroup_base / "headrace-proxy-b"
    cg_b.mkdir()
    restart_proxy(agent, cg_b)
    wait_for(lambda: proxy_cgroup(agent).get("path") == str(cg_b), 15, "proxy cgroup B detected")
    assert getsockopt_on(cg_b) and not getsockopt_on(cg_a)
    wait_for(lambda: "snapshot_applied" in agent.proxy_log(), 15, "snapshot to the new proxy")
    assert request(client, server.ipv4, b"via-b") == b"server|via-b"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst), 10, "proxied with cgroup B")

    # 4. agent SIGKILL + restart: it starts from the saved cgroup, no second program on B
    agent.kill_agent(signal.SIGKILL)
    agent.start_agent()
    wait_for(lambda: proxy_cgroup(agent).get("via") == "grpc", 15, "the reconnected proxy seen")
    assert proxy_cgroup(agent)["path"] == str(cg_b) and getsockopt_on(cg_b) == ["hr_getsockopt"]
    seen = len(agent.proxy_lines())
    assert request(client, server.ipv4, b"after-restart") == b"server|after-restart"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst, seen), 10, "proxied after the restart")
    # the pods put on the iptables fallback while the cgroup was unknown are re-enrolled on eBPF now
    wait_for(lambda: agent.status()[early.uid]["backend"] == "ebpf" and agent.pod_state(early.uid) == "enrolled",
             15, "the fallback pod on eBPF")
    assert ebpf_state(early) and inbound_only_rules(early)
    seen = len(agent.proxy_lines())
    assert request(early, srv0.ipv4, b"now-ebpf") == b"srv0|now-ebpf"
    wait_for(lambda: proxied(agent, "early/early", "early/srv0", f"{srv0.ipv4}:{PORT}", seen), 10, "proxied (eBPF)")

    # 5. the proxy moves while the agent is down: the restarted agent moves the program from B to C
    agent.kill_agent(signal.SIGKILL)
    cg_c = node.cgroup_base / "headrace-proxy-c"
    cg_c.mkdir()
    restart_proxy(agent, cg_c)
    agent.start_agent()
    wait_for(lambda: proxy_cgroup(agent).get("path") == str(cg_c), 15, "proxy cgroup C detected")
    assert getsockopt_on(cg_c) == ["hr_getsockopt"] and not getsockopt_on(cg_b)
    wait_for(lambda: "snapshot_applied" in agent.proxy_log(), 15, "snapshot to the moved proxy")
    assert request(client, server.ipv4, b"via-c") == b"server|via-c"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst), 10, "proxied with cgroup C")

    # the pod on the iptables fallback kept working through all of it
    assert request(early, srv0.ipv4, b"still") == b"srv0|still"


def test_flag_wins_over_the_detected_cgroup(ebpf_env: Any) -> None:
    node, agent, _apps = ebpf_env
    flagged = node.proxy_cgroup()
    other = node.cgroup_base / "headrace-proxy-other"
    other.mkdir()
    agent.extra = ["--backend", "ebpf", "--proxy-cgroup", str(flagged)]
    agent.start_agent()
    assert proxy_cgroup(agent)["source"] == "flag"
    restart_proxy(agent, other)
    wait_for(lambda: proxy_cgroup(agent).get("detected") == str(other), 15, "the proxy's cgroup detected")
    st = proxy_cgroup(agent)
    assert st["source"] == "flag" and st["path"] == str(flagged)
    log = wait_for(lambda: [x for x in agent.agent_log().splitlines() if "wins over" in x], 5, "the log line")
    assert str(flagged) in log[0] and str(other) in log[0]
    assert source_metric(agent) == {"flag": 1.0, "peer": 0.0, "none": 0.0}
