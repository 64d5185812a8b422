"""The harness itself: pods made by the real bridge + host-local plugins talk over real TCP."""

from __future__ import annotations

from tests.harness.node import SimNode
from tests.harness.traffic import Listener, tcp_request


def test_pods_reach_each_other_directly_v4_and_v6(plain_node: SimNode) -> None:
    a = plain_node.add_pod("default", "a")
    b = plain_node.add_pod("default", "b")
    with Listener(b.netns.path, 8080, label="b") as l4, Listener(b.netns.path, 8080, family=6, label="b6") as l6:
        assert tcp_request(a.netns.path, b.ipv4, 8080, b"hello") == b"b|hello"
        got = l4.wait_one()
        assert got.peer[0] == a.ipv4
        assert got.original_dst in (None, (b.ipv4, 8080))
        assert tcp_request(a.netns.path, b.ipv6, 8080, b"hello6") == b"b6|hello6"
        assert l6.wait_one().peer[0] == a.ipv6


def test_client_as_proxy_uid(plain_node: SimNode) -> None:
    a = plain_node.add_pod("default", "a")
    b = plain_node.add_pod("default", "b")
    with Listener(b.netns.path, 9090, label="b"):
        assert tcp_request(a.netns.path, b.ipv4, 9090, b"x", uid=1337, gid=1337) == b"b|x"


def test_remove_pod_deletes_netns(plain_node: SimNode) -> None:
    a = plain_node.add_pod("default", "a")
    path = a.netns.path
    plain_node.remove_pod(a)
    assert not a.netns.exists()
    assert a.uid not in plain_node.pods
    assert path
