"""`headrace agent --capture-dns`: an enrolled ambient pod's DNS (UDP and TCP 53) reaches the node proxy's 15053.

The reference proxy serves no DNS, so the test stands in for it with its own listeners on 15053 inside the
client pod (where ztunnel listens); the query is addressed to another pod's IP:53.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from node_agent.lab.netns import entered
from node_agent.lab.traffic import Listener, tcp_request, udp_request

from tests.kernel.agent_kit import AgentRun, node_agent, wait_for

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def udp_dns_stand_in(netns_path: str, stop: threading.Event) -> socket.socket:
    with entered(netns_path):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # REDIRECT of a locally generated packet goes to 127.0.0.1: answering from there lets conntrack turn the
    # reply's source back into the server the app asked (a DNS proxy binds 127.0.0.1:15053 for this).
    s.bind(("127.0.0.1", 15053))
    s.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = s.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            s.sendto(b"dns-proxy|" + data, peer)

    threading.Thread(target=serve, daemon=True).start()
    return s


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
        stop = threading.Event()
        udp = udp_dns_stand_in(client.netns.path, stop)
        try:
            data, source = udp_request(client.netns.path, peer.ipv4, 53, b"query")
            assert data == b"dns-proxy|query"
            assert source == (peer.ipv4, 53)  # the reply looks like it came from the server asked
            with Listener(client.netns.path, 15053, label="dns-proxy-tcp") as tcp:
                assert tcp_request(client.netns.path, peer.ipv4, 53, b"q") == b"dns-proxy-tcp|q"
                assert tcp.wait_one().original_dst == (peer.ipv4, 53)
        finally:
            stop.set()
            udp.close()
