"""Live ambient pods moved from iptables to eBPF under traffic, by an agent restarted with `--backend ebpf`
(the same move as when the node proxy's cgroup becomes known).

A simulated node, the agent first with `--backend iptables`, the reference proxy as a real process in its
own cgroup; a client pod connects to a server pod in a tight loop while the agent is restarted with
`--backend ebpf`, which moves both pods in place (the iptables rules stay until eBPF's take over): not one
connection leaves the client or reaches the server without passing the proxy. Connections may fail while
the iptables connections' conntrack entries linger (a reply-tuple clash, refused by the proxy: see
docs/ebpf.md, "Moving a live pod"); each failure is such a refusal, and after the move every pod's
traffic passes the proxy.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.agent_kit import wait_for
from tests.kernel.test_agent_first_compile import AMBIENT, assert_proxied, backends, looping, on_ebpf, relayed, shop
from tests.kernel.test_backend_parity import ebpf_env as ebpf_env  # node + agent (ParityRun)
from tests.kernel.test_backend_parity import ebpf_state, inbound_only_rules

pytestmark = pytest.mark.kernel


def test_a_move_to_ebpf_under_traffic_leaves_no_connection_unproxied(ebpf_env: Any, tmp_path: Path) -> None:
    node, agent, apps = ebpf_env
    agent.extra = ["--backend", "iptables"]
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    client, server = shop(node, agent, apps)

    seen = len(agent.proxy_lines())
    with looping(client, server, tmp_path) as got:
        wait_for(lambda: len(agent.proxy_lines()) > seen + 100, 20, "connections on iptables")
        agent.kill_agent(signal.SIGTERM)
        agent.use_backend("ebpf")
        agent.start_agent()
        wait_for(lambda: on_ebpf(agent, client, server), 60, "both pods moved to eBPF")
        moved = len(agent.proxy_lines())
        wait_for(lambda: len(agent.proxy_lines()) > moved + 200, 20, "connections after the move")
    assert got["ok"] > 200
    # the proxy refusing a connection (a conntrack clash, or a pod whose move failed: fail closed until its
    # retry) reads as an empty reply, or a reset when the request was still unread
    assert all(f.endswith("b''") or "reset" in f for f in got["failed"]), got["failed"]

    wait_for(lambda: min(relayed(agent, seen, client, server)) >= got["ok"], 10, "every connection in the log")
    outbound, inbound = relayed(agent, seen, client, server)
    assert outbound == got["ok"], f"{got['ok'] - outbound} connections left the client unproxied"
    assert inbound == got["ok"], f"{got['ok'] - inbound} connections reached the server unproxied"
    assert backends(agent, client, server) == ["ebpf", "ebpf"]
    assert ebpf_state(client) and inbound_only_rules(client) and inbound_only_rules(server)
    assert "moves from the iptables to the ebpf backend in place" in agent.agent_log()
    assert_proxied(agent, client, server)
