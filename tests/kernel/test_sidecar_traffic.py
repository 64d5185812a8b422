"""Sidecar redirection proven with real TCP between pods made by the real bridge + host-local plugins, on
every redirection backend: iptables-legacy, iptables-nft and ebpf (tests/kernel/redirect_backends.py), IPv4
and IPv6. The redirection is installed through RedirectBackend.apply (the plugin/agent paths are tested
elsewhere); the node's chain has no headrace-cni, so nothing else interferes. The app's clients and the
sidecar's listeners run in the pod's cgroup, as a pod's containers do.

Proven on each backend:
- outbound TCP lands on 15001 with SO_ORIGINAL_DST, inbound on 15006 with the original destination;
  the health port 15021 is not captured; the proxy (uid/gid 1337) reaches the real destination; the app
  talking to itself over loopback is not captured (test_outbound_and_inbound_capture);
- Istio's lo handling: the proxy reaches the local app from 127.0.0.6 / ::6, while its plain connection to
  the pod's own address is inbound traffic (test_proxy_to_local_app_over_lo);
- excludeOutboundPorts / excludeOutboundIPRanges bypass, includeOutboundIPRanges limits capture,
  includeInboundPorts limits inbound capture, excludeInboundPorts bypasses (test_excluded_inbound_port);
- a pod given only IPv4 keeps its IPv6 untouched (test_excluded_inbound_port_and_v4_only_pod);
- a pod without redirection is untouched (test_non_mesh_pod_untouched).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from node_agent.backends.base import PodTarget

from cni.contract.spec import SidecarSpec
from cni.kernel import iptables_run
from tests.harness.node import Pod
from tests.harness.traffic import Listener, tcp_request
from tests.kernel.redirect_backends import Redirect, ip, over_backends, over_backends_and_families, redirect_fixture

pytestmark = pytest.mark.kernel

@pytest.fixture
def redirect(request: pytest.FixtureRequest, make_node: Any) -> Iterator[Redirect]:
    yield from redirect_fixture(make_node, str(request.param))


def host_net(pod: Pod, family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(ip(pod, family))


def app_request(pod: Pod, host: str, port: int, payload: bytes, **kw: Any) -> bytes:
    """A client of the pod (the app, or with uid=1337 the proxy): a process in the pod's cgroup."""
    return tcp_request(pod.netns.path, host, port, payload, cgroup=pod.cgroup, **kw)


def listener(pod: Pod, port: int, family: int, label: str) -> Listener:
    """A listener of the pod (the sidecar proxy or the app) in the pod's cgroup."""
    return Listener(pod.netns.path, port, family=family, label=label, cgroup=pod.cgroup)


@over_backends_and_families()
def test_outbound_and_inbound_capture(redirect: Redirect, family: int) -> None:
    app, peer = redirect.pods(2)
    redirect.apply(app, SidecarSpec())
    with (
        listener(app, 15001, family, "out") as out,
        listener(app, 15006, family, "in") as inb,
        listener(app, 8080, family, "app") as appl,
        listener(app, 15021, family, "health"),
        listener(peer, 8080, family, "peer") as peerl,
    ):
        # app (root) → peer: lands on 15001 with the original destination preserved
        assert app_request(app, ip(peer, family), 8080, b"o") == b"out|o"
        assert out.wait_one().original_dst == (ip(peer, family), 8080)
        # peer → app port: lands on 15006
        assert app_request(peer, ip(app, family), 8080, b"i") == b"in|i"
        assert inb.wait_one().original_dst == (ip(app, family), 8080)
        # health port is excluded inbound
        assert app_request(peer, ip(app, family), 15021, b"h") == b"health|h"
        # the proxy (uid/gid 1337) reaches the real destination
        assert app_request(app, ip(peer, family), 8080, b"p", uid=1337, gid=1337) == b"peer|p"
        assert peerl.wait_one().peer[0] == ip(app, family)
        # the app talking to itself over loopback is not captured
        loop = "127.0.0.1" if family == 4 else "::1"
        assert app_request(app, loop, 8080, b"l") == b"app|l"
        assert appl.wait_one().peer[0] == loop
        assert appl.count() == 0 and out.count() == 0 and inb.count() == 0


@over_backends_and_families()
def test_proxy_to_local_app_over_lo(redirect: Redirect, family: int) -> None:
    """Istio's lo handling: from 127.0.0.6 (::6) the proxy reaches the app; a plain proxy connection to
    its own pod address is inbound traffic and goes to 15006."""
    app = redirect.pod("p0")
    redirect.apply(app, SidecarSpec())
    passthrough = "127.0.0.6" if family == 4 else "::6"
    with listener(app, 15006, family, "in") as inb, listener(app, 8080, family, "app") as appl:
        got = app_request(app, ip(app, family), 8080, b"x", uid=1337, gid=1337, source=passthrough)
        assert got == b"app|x"
        assert appl.wait_one().peer[0] == passthrough
        assert app_request(app, ip(app, family), 8080, b"y", uid=1337, gid=1337) == b"in|y"
        assert inb.wait_one().original_dst == (ip(app, family), 8080)


@over_backends_and_families()
def test_excluded_outbound_ports_and_ranges(redirect: Redirect, family: int) -> None:
    app, peer, other = redirect.pods(3)
    spec = SidecarSpec(exclude_outbound_ports=(9090,), exclude_outbound_ranges=(host_net(other, family),))
    redirect.apply(app, spec)
    with (
        listener(app, 15001, family, "out") as out,
        listener(peer, 9090, family, "peer9090"),
        listener(peer, 8080, family, "peer8080"),
        listener(other, 8080, family, "other"),
    ):
        assert app_request(app, ip(peer, family), 9090, b"a") == b"peer9090|a"
        assert app_request(app, ip(other, family), 8080, b"b") == b"other|b"
        assert app_request(app, ip(peer, family), 8080, b"c") == b"out|c"
        assert out.wait_one().original_dst == (ip(peer, family), 8080)


@over_backends_and_families()
def test_include_outbound_ranges(redirect: Redirect, family: int) -> None:
    app, peer, other = redirect.pods(3)
    redirect.apply(app, SidecarSpec(include_outbound_ranges=(host_net(peer, family),)))
    with listener(app, 15001, family, "out"), listener(other, 8080, family, "other"):
        assert app_request(app, ip(peer, family), 8080, b"a") == b"out|a"
        assert app_request(app, ip(other, family), 8080, b"b") == b"other|b"


@over_backends_and_families()
def test_include_inbound_ports_only(redirect: Redirect, family: int) -> None:
    app, peer = redirect.pods(2)
    redirect.apply(app, SidecarSpec(include_inbound_ports=(8080,)))
    with listener(app, 15006, family, "in"), listener(app, 9090, family, "app9090"):
        assert app_request(peer, ip(app, family), 8080, b"a") == b"in|a"
        assert app_request(peer, ip(app, family), 9090, b"b") == b"app9090|b"


@over_backends_and_families()
def test_excluded_inbound_port(redirect: Redirect, family: int) -> None:
    """excludeInboundPorts passes through (the first half of the old iptables-only
    test_excluded_inbound_port_and_v4_only_pod)."""
    app, peer = redirect.pods(2)
    redirect.apply(app, SidecarSpec(exclude_inbound_ports=(22,)))
    with listener(app, 22, family, "ssh"), listener(app, 15006, family, "in"):
        assert app_request(peer, ip(app, family), 22, b"s") == b"ssh|s"
        assert app_request(peer, ip(app, family), 8080, b"i") == b"in|i"


@over_backends()
def test_excluded_inbound_port_and_v4_only_pod(redirect: Redirect) -> None:
    """excludeInboundPorts passes through; a pod given only family 4 gets no IPv6 redirection."""
    app, peer = redirect.pods(2)
    redirect.apply(app, SidecarSpec(exclude_inbound_ports=(22,)), families=(4,))
    if redirect.flavour is not None:
        assert "HEADRACE" not in iptables_run.save(app.netns.path, redirect.flavour, 6)
    if redirect.name == "nftables":
        listed = app.netns.run(["nft", "list", "table", "inet", "headrace"]).stdout
        assert "ip6 " not in listed and "meta nfproto ipv4" in listed
    with (
        listener(app, 22, 4, "ssh"),
        listener(app, 15006, 6, "in6"),
        listener(app, 8080, 6, "app6"),
    ):
        assert app_request(peer, app.ipv4, 22, b"s") == b"ssh|s"
        assert app_request(peer, app.ipv6, 8080, b"x") == b"app6|x"


@over_backends()
def test_non_mesh_pod_untouched(redirect: Redirect) -> None:
    app, peer = redirect.pods(2)
    with listener(peer, 8080, 4, "peer"):
        assert app_request(app, peer.ipv4, 8080, b"n") == b"peer|n"
    target: PodTarget = redirect.target(app)
    assert not redirect.backend.installed(target)
