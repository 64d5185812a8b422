"""`headrace agent --capture-dns`: an enrolled ambient pod's DNS (UDP and TCP 53) reaches the node proxy's 15053.

The reference proxy serves no DNS, so the test stands in for it with its own listeners on 15053 inside the
client pod (where ztunnel listens); the query is addressed to another pod's IP:53.
"""

from __future__ import annotations

from typing import Any

from node_agent.lab.traffic import Listener, tcp_request, udp_request, udp_responder

from tests.kernel.agent_kit import AgentRun, node_agent, wait_for

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def test_capture_dns_sends_udp_and_tcp_53_to_15053(make_node: Any) -> None:
    node = make_node(headrace={})
    node.add_namespace("shop", AMBIENT)
    with node_agent(node, AgentRun) as (agent, _apps):
        agent.extra = ["--backend", "iptables", "--capture-dns"]
        agent.start_proxy()
        agent.start_agent()
        client = node.add_pod("shop", "client")  # enrolled before ADD returns
        peer = node.add_pod("default", "peer")
        wait_for(lambda: agent.pod_state(client.uid) == "enrolled", 20, "client enrolled")
        # the DNS proxy stand-in answers from 127.0.0.1:15053, where REDIRECT sent the query
        with udp_responder(client.netns.path, 15053, label=b"dns-proxy", addr="127.0.0.1"):
            data, source = udp_request(client.netns.path, peer.ipv4, 53, b"query")
            assert data == b"dns-proxy|query"
            assert source == (peer.ipv4, 53)  # the reply looks like it came from the server asked
            with Listener(client.netns.path, 15053, label="dns-proxy-tcp") as tcp:
                assert tcp_request(client.netns.path, peer.ipv4, 53, b"q") == b"dns-proxy-tcp|q"
                assert tcp.wait_one().original_dst == (peer.ipv4, 53)
