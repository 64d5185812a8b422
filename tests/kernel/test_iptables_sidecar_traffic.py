"""Sidecar redirection proven with real TCP between pods made by the real bridge + host-local plugins.

Both iptables flavours, IPv4 and IPv6. The rules are applied directly with cni.iptables.netns_tables
(the plugin path is tested elsewhere); the node's chain has no headrace-cni, so nothing else interferes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from cni.iptables import netns_tables
from cni.redirect_spec import SidecarSpec
from tests.harness.node import Pod, SimNode
from tests.harness.traffic import Listener, tcp_request

pytestmark = pytest.mark.kernel

FLAVOURS = ["legacy", "nft"]
FAMILIES = [4, 6]


def ip(pod: Pod, family: int) -> str:
    return pod.ipv4 if family == 4 else pod.ipv6


def host_net(pod: Pod, family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(ip(pod, family))


@pytest.fixture
def pods(plain_node: SimNode) -> Callable[[int], list[Pod]]:
    def make(n: int) -> list[Pod]:
        return [plain_node.add_pod("default", f"p{i}") for i in range(n)]

    return make


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_outbound_and_inbound_capture(pods, flavour, family) -> None:
    app, peer = pods(2)
    netns_tables.apply_sidecar(app.netns.path, SidecarSpec(), (4, 6), flavour)
    with (
        Listener(app.netns.path, 15001, family=family, label="out") as out,
        Listener(app.netns.path, 15006, family=family, label="in") as inb,
        Listener(app.netns.path, 8080, family=family, label="app") as appl,
        Listener(app.netns.path, 15021, family=family, label="health"),
        Listener(peer.netns.path, 8080, family=family, label="peer") as peerl,
    ):
        # app (root) → peer: lands on 15001 with the original destination preserved
        assert tcp_request(app.netns.path, ip(peer, family), 8080, b"o") == b"out|o"
        assert out.wait_one().original_dst == (ip(peer, family), 8080)
        # peer → app port: lands on 15006
        assert tcp_request(peer.netns.path, ip(app, family), 8080, b"i") == b"in|i"
        assert inb.wait_one().original_dst == (ip(app, family), 8080)
        # health port is excluded inbound
        assert tcp_request(peer.netns.path, ip(app, family), 15021, b"h") == b"health|h"
        # the proxy (uid/gid 1337) reaches the real destination
        assert tcp_request(app.netns.path, ip(peer, family), 8080, b"p", uid=1337, gid=1337) == b"peer|p"
        assert peerl.wait_one().peer[0] == ip(app, family)
        # the app talking to itself over loopback is not captured
        loop = "127.0.0.1" if family == 4 else "::1"
        assert tcp_request(app.netns.path, loop, 8080, b"l") == b"app|l"
        assert appl.count() == 1 and out.count() == 0 and inb.count() == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_proxy_to_local_app_over_lo(pods, flavour, family) -> None:
    """Istio's lo handling: from 127.0.0.6 (::6) the proxy reaches the app; a plain proxy connection to
    its own pod address is inbound traffic and goes to 15006."""
    (app,) = pods(1)
    netns_tables.apply_sidecar(app.netns.path, SidecarSpec(), (4, 6), flavour)
    passthrough = "127.0.0.6" if family == 4 else "::6"
    with (
        Listener(app.netns.path, 15006, family=family, label="in") as inb,
        Listener(app.netns.path, 8080, family=family, label="app") as appl,
    ):
        got = tcp_request(app.netns.path, ip(app, family), 8080, b"x", uid=1337, gid=1337, source=passthrough)
        assert got == b"app|x"
        assert appl.wait_one().peer[0] == passthrough
        assert tcp_request(app.netns.path, ip(app, family), 8080, b"y", uid=1337, gid=1337) == b"in|y"
        assert inb.wait_one().original_dst == (ip(app, family), 8080)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_excluded_outbound_ports_and_ranges(pods, flavour, family) -> None:
    app, peer, other = pods(3)
    spec = SidecarSpec(exclude_outbound_ports=(9090,), exclude_outbound_ranges=(host_net(other, family),))
    netns_tables.apply_sidecar(app.netns.path, spec, (4, 6), flavour)
    with (
        Listener(app.netns.path, 15001, family=family, label="out") as out,
        Listener(peer.netns.path, 9090, family=family, label="peer9090"),
        Listener(peer.netns.path, 8080, family=family, label="peer8080"),
        Listener(other.netns.path, 8080, family=family, label="other"),
    ):
        assert tcp_request(app.netns.path, ip(peer, family), 9090, b"a") == b"peer9090|a"
        assert tcp_request(app.netns.path, ip(other, family), 8080, b"b") == b"other|b"
        assert tcp_request(app.netns.path, ip(peer, family), 8080, b"c") == b"out|c"
        assert out.wait_one().original_dst == (ip(peer, family), 8080)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_include_outbound_ranges(pods, flavour, family) -> None:
    app, peer, other = pods(3)
    spec = SidecarSpec(include_outbound_ranges=(host_net(peer, family),))
    netns_tables.apply_sidecar(app.netns.path, spec, (4, 6), flavour)
    with (
        Listener(app.netns.path, 15001, family=family, label="out"),
        Listener(other.netns.path, 8080, family=family, label="other"),
    ):
        assert tcp_request(app.netns.path, ip(peer, family), 8080, b"a") == b"out|a"
        assert tcp_request(app.netns.path, ip(other, family), 8080, b"b") == b"other|b"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_include_inbound_ports_only(pods, flavour, family) -> None:
    app, peer = pods(2)
    netns_tables.apply_sidecar(app.netns.path, SidecarSpec(include_inbound_ports=(8080,)), (4, 6), flavour)
    with (
        Listener(app.netns.path, 15006, family=family, label="in"),
        Listener(app.netns.path, 9090, family=family, label="app9090"),
    ):
        assert tcp_request(peer.netns.path, ip(app, family), 8080, b"a") == b"in|a"
        assert tcp_request(peer.netns.path, ip(app, family), 9090, b"b") == b"app9090|b"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_excluded_inbound_port_and_v4_only_pod(pods, flavour) -> None:
    """excludeInboundPorts passes through; a pod given only family 4 gets no ip6tables rules."""
    app, peer = pods(2)
    netns_tables.apply_sidecar(app.netns.path, SidecarSpec(exclude_inbound_ports=(22,)), (4,), flavour)
    assert "HEADRACE" not in netns_tables.save(app.netns.path, flavour, 6)
    with (
        Listener(app.netns.path, 22, label="ssh"),
        Listener(app.netns.path, 15006, family=6, label="in6"),
        Listener(app.netns.path, 8080, family=6, label="app6"),
    ):
        assert tcp_request(peer.netns.path, app.ipv4, 22, b"s") == b"ssh|s"
        assert tcp_request(peer.netns.path, app.ipv6, 8080, b"x") == b"app6|x"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_non_mesh_pod_untouched(pods, flavour) -> None:
    app, peer = pods(2)
    with Listener(peer.netns.path, 8080, label="peer"):
        assert tcp_request(app.netns.path, peer.ipv4, 8080, b"n") == b"peer|n"
    assert not netns_tables.installed(app.netns.path, flavour)
