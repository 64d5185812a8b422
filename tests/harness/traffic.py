"""Re-export of node_agent.lab.traffic (the lab and the tests share one implementation), and the sidecar
redirect check several kernel tests make."""

from node_agent.lab.simnode import Pod
from node_agent.lab.traffic import *  # noqa: F403
from node_agent.lab.traffic import Listener, tcp_request


def sidecar_redirected(pod: Pod, peer: Pod) -> None:
    """A sidecar pod's REDIRECT rules at work: its outbound TCP lands on its 15001 with the original
    destination, the proxy uid's (1337) goes out, inbound TCP lands on its 15006 with the original
    destination."""
    with Listener(peer.netns.path, 8080, label="peer"), Listener(pod.netns.path, 15001, label="out") as out:
        assert tcp_request(pod.netns.path, peer.ipv4, 8080, b"o") == b"out|o"
        assert out.wait_one().original_dst == (peer.ipv4, 8080)
        assert tcp_request(pod.netns.path, peer.ipv4, 8080, b"p", uid=1337, gid=1337) == b"peer|p"
    with Listener(pod.netns.path, 8080, label="app"), Listener(pod.netns.path, 15006, label="in") as inbound:
        assert tcp_request(peer.netns.path, pod.ipv4, 8080, b"i") == b"in|i"
        assert inbound.wait_one().original_dst == (pod.ipv4, 8080)
