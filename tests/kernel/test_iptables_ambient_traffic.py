"""Ambient in-pod redirection and the node-side probe SNAT, proven with real traffic.

Pods come from the real bridge + host-local plugins in a simulated node netns (the "node"), both iptables
flavours, IPv4 and IPv6.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cni.iptables import netns_tables
from cni.redirect_spec import PROBE_SNAT_V4, PROBE_SNAT_V6, AmbientSpec
from tests.harness.netns import entered
from tests.harness.node import Pod, SimNode
from tests.harness.traffic import Listener, tcp_request, udp_request

pytestmark = pytest.mark.kernel

FLAVOURS = ["legacy", "nft"]
FAMILIES = [4, 6]
MARK = 0x539


def ip(pod: Pod, family: int) -> str:
    return pod.ipv4 if family == 4 else pod.ipv6


@contextmanager
def udp_responder(netns_path: str, port: int, family: int, label: bytes) -> Iterator[list[tuple[str, int]]]:
    """A UDP socket in the netns answering label|payload; yields the list of senders seen."""
    with entered(netns_path):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("::" if family == 6 else "0.0.0.0", port))
    s.settimeout(0.2)
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            seen.append((peer[0], peer[1]))
            s.sendto(label + b"|" + data, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        s.close()
        t.join(timeout=2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_ambient_capture_and_bypass(plain_node: SimNode, flavour, family) -> None:
    app = plain_node.add_pod("default", "app")
    peer = plain_node.add_pod("default", "peer")
    netns_tables.apply_ambient(app.netns.path, AmbientSpec(), (4, 6), flavour)
    with (
        Listener(app.netns.path, 15001, family=family, label="out") as out,
        Listener(app.netns.path, 15006, family=family, label="in") as inb,
        Listener(app.netns.path, 15008, family=family, label="hbone") as hbone,
        Listener(app.netns.path, 8080, family=family, label="app") as appl,
        Listener(peer.netns.path, 8080, family=family, label="peer") as peerl,
    ):
        # outbound → 15001, original destination kept
        assert tcp_request(app.netns.path, ip(peer, family), 8080, b"o") == b"out|o"
        assert out.wait_one().original_dst == (ip(peer, family), 8080)
        # inbound → 15006
        assert tcp_request(peer.netns.path, ip(app, family), 8080, b"i") == b"in|i"
        assert inb.wait_one().original_dst == (ip(app, family), 8080)
        # HBONE port is not redirected
        assert tcp_request(peer.netns.path, ip(app, family), 15008, b"h") == b"hbone|h"
        assert hbone.wait_one().peer[0] == ip(peer, family)
        # a socket carrying the proxy mark goes straight out…
        assert tcp_request(app.netns.path, ip(peer, family), 8080, b"m", mark=MARK) == b"peer|m"
        assert peerl.wait_one().peer[0] == ip(app, family)
        # …and reaches the local app over lo (the node proxy's inbound delivery)
        assert tcp_request(app.netns.path, ip(app, family), 8080, b"d", mark=MARK) == b"app|d"
        assert appl.wait_one().peer[0] == ip(app, family)
        assert out.count() == 0 and inb.count() == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dns_capture(plain_node: SimNode, flavour, family) -> None:
    app = plain_node.add_pod("default", "app")
    peer = plain_node.add_pod("default", "peer")
    with (
        udp_responder(app.netns.path, 15053, family, b"dnsproxy") as proxy_seen,
        udp_responder(peer.netns.path, 53, family, b"upstream") as upstream_seen,
    ):
        netns_tables.apply_ambient(app.netns.path, AmbientSpec(), (4, 6), flavour)
        data, _ = udp_request(app.netns.path, ip(peer, family), 53, b"q1")
        assert data == b"upstream|q1"  # DNS capture off by default
        netns_tables.apply_ambient(app.netns.path, AmbientSpec(capture_dns=True), (4, 6), flavour)
        data, _ = udp_request(app.netns.path, ip(peer, family), 53, b"q2")
        assert data == b"dnsproxy|q2"
        assert len(proxy_seen) == 1 and len(upstream_seen) == 1
        # TCP 53 goes to the DNS proxy port as well
        with Listener(app.netns.path, 15053, family=family, label="dnstcp") as dtcp:
            assert tcp_request(app.netns.path, ip(peer, family), 53, b"t") == b"dnstcp|t"
            assert dtcp.wait_one().original_dst == (ip(peer, family), 53)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kubelet_probe_snat(plain_node: SimNode, flavour, family) -> None:
    """Host-originated TCP to an enrolled pod is SNATed on the node to the probe address, which the
    in-pod rules let through to the app; without the node rule the same connection is captured."""
    app = plain_node.add_pod("default", "app")
    node_ns = plain_node.netns.path
    netns_tables.apply_ambient(app.netns.path, AmbientSpec(), (4, 6), flavour)
    probe = str(PROBE_SNAT_V4 if family == 4 else PROBE_SNAT_V6)
    with (
        Listener(app.netns.path, 15006, family=family, label="in"),
        Listener(app.netns.path, 8080, family=family, label="app") as appl,
    ):
        assert tcp_request(node_ns, ip(app, family), 8080, b"a") == b"in|a"
        netns_tables.sync_node_probe_rules(node_ns, [app.ipv4, app.ipv6], flavour)
        assert netns_tables.check_node_probe_rules(node_ns, [app.ipv6, app.ipv4], flavour) == []
        assert tcp_request(node_ns, ip(app, family), 8080, b"b") == b"app|b"
        assert appl.wait_one().peer[0] == probe
        netns_tables.sync_node_probe_rules(node_ns, [], flavour)
        assert not netns_tables.installed(node_ns, flavour)
        assert tcp_request(node_ns, ip(app, family), 8080, b"c") == b"in|c"
