"""Ambient in-pod redirection and the node-side probe SNAT, proven with real traffic on every redirection
backend: iptables-legacy, iptables-nft and ebpf (tests/kernel/redirect_backends.py), IPv4 and IPv6.

Pods come from the real bridge + host-local plugins in a simulated node netns (the "node"); the redirection
is installed through RedirectBackend.apply. The app's clients and listeners run in the pod's cgroup; the
node proxy's listeners (15001, 15006, 15008, 15053) in the node's proxy cgroup, as on a real node (ambient
eBPF answers the proxy's SO_ORIGINAL_DST there).

Proven on each backend:
- outbound TCP lands on 15001 with the original destination, inbound on 15006 with the original
  destination, HBONE 15008 is not redirected; a socket with the proxy mark 0x539 goes straight out and
  reaches the local app (test_ambient_capture_and_bypass);
- DNS capture is off by default; with capture_dns UDP and TCP 53 go to 15053, TCP with the original
  destination (test_dns_capture);
- host-originated TCP to an enrolled pod is captured, unless the node's probe SNAT rule (node-netns
  iptables, the flavour of the backend; nft beside eBPF) rewrites its source to the probe address, which the
  in-pod redirection lets through to the app (test_kubelet_probe_snat).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from node_agent.backends.nftables.node_probe import sync_node_probe

from cni.contract.spec import PROBE_SNAT_V4, PROBE_SNAT_V6, AmbientSpec
from cni.kernel import tables as netns_tables
from tests.harness.node import Pod
from tests.harness.traffic import Listener, tcp_request, udp_request, udp_responder
from tests.kernel.redirect_backends import (
    Redirect,
    ip,
    over_backends_and_families,
    redirect_fixture,
)

pytestmark = pytest.mark.kernel

MARK = 0x539


@pytest.fixture
def redirect(request: pytest.FixtureRequest, make_node: Any) -> Iterator[Redirect]:
    yield from redirect_fixture(make_node, str(request.param))


def app_request(pod: Pod, host: str, port: int, payload: bytes, **kw: Any) -> bytes:
    """A client in the pod (the app; with mark=0x539 a proxy socket): a process in the pod's cgroup."""
    return tcp_request(pod.netns.path, host, port, payload, cgroup=pod.cgroup, **kw)


def app_listener(pod: Pod, port: int, family: int, label: str) -> Listener:
    return Listener(pod.netns.path, port, family=family, label=label, cgroup=pod.cgroup)


def proxy_listener(redirect: Redirect, pod: Pod, port: int, family: int, label: str) -> Listener:
    """The node proxy's listener inside the pod's netns (in-pod mode), in the node proxy's cgroup."""
    return Listener(pod.netns.path, port, family=family, label=label, cgroup=redirect.proxy_cgroup)


@over_backends_and_families()
def test_ambient_capture_and_bypass(redirect: Redirect, family: int) -> None:
    app = redirect.pod("app")
    peer = redirect.pod("peer")
    redirect.apply(app, AmbientSpec())
    with (
        proxy_listener(redirect, app, 15001, family, "out") as out,
        proxy_listener(redirect, app, 15006, family, "in") as inb,
        proxy_listener(redirect, app, 15008, family, "hbone") as hbone,
        app_listener(app, 8080, family, "app") as appl,
        app_listener(peer, 8080, family, "peer") as peerl,
    ):
        # outbound → 15001, original destination kept
        assert app_request(app, ip(peer, family), 8080, b"o") == b"out|o"
        assert out.wait_one().original_dst == (ip(peer, family), 8080)
        # inbound → 15006
        assert app_request(peer, ip(app, family), 8080, b"i") == b"in|i"
        assert inb.wait_one().original_dst == (ip(app, family), 8080)
        # HBONE port is not redirected
        assert app_request(peer, ip(app, family), 15008, b"h") == b"hbone|h"
        assert hbone.wait_one().peer[0] == ip(peer, family)
        # a socket carrying the proxy mark goes straight out…
        assert app_request(app, ip(peer, family), 8080, b"m", mark=MARK) == b"peer|m"
        assert peerl.wait_one().peer[0] == ip(app, family)
        # …and reaches the local app over lo (the node proxy's inbound delivery)
        assert app_request(app, ip(app, family), 8080, b"d", mark=MARK) == b"app|d"
        assert appl.wait_one().peer[0] == ip(app, family)
        assert out.count() == 0 and inb.count() == 0


@over_backends_and_families()
def test_dns_capture(redirect: Redirect, family: int) -> None:
    app = redirect.pod("app")
    peer = redirect.pod("peer")
    assert app.cgroup is not None
    with (
        udp_responder(app.netns.path, 15053, family, b"dnsproxy") as proxy_seen,
        udp_responder(peer.netns.path, 53, family, b"upstream") as upstream_seen,
    ):
        redirect.apply(app, AmbientSpec())
        data, _ = udp_request(app.netns.path, ip(peer, family), 53, b"q1", cgroup=app.cgroup)
        assert data == b"upstream|q1"  # DNS capture off by default
        redirect.apply(app, AmbientSpec(capture_dns=True))
        data, _ = udp_request(app.netns.path, ip(peer, family), 53, b"q2", cgroup=app.cgroup)
        assert data == b"dnsproxy|q2"
        assert len(proxy_seen) == 1 and len(upstream_seen) == 1
        # TCP 53 goes to the DNS proxy port as well
        with proxy_listener(redirect, app, 15053, family, "dnstcp") as dtcp:
            assert app_request(app, ip(peer, family), 53, b"t") == b"dnstcp|t"
            assert dtcp.wait_one().original_dst == (ip(peer, family), 53)


@over_backends_and_families()
def test_kubelet_probe_snat(redirect: Redirect, family: int) -> None:
    """Host-originated TCP to an enrolled pod is SNATed on the node to the probe address, which the
    in-pod redirection lets through to the app; without the node rule the same connection is captured.
    The node rule is node-netns iptables (the backend's flavour; nft beside eBPF), or nftables with nftables."""
    app = redirect.pod("app")
    node_ns = redirect.node.netns.path
    node_flavour = redirect.flavour or "nft"
    redirect.apply(app, AmbientSpec())
    probe = str(PROBE_SNAT_V4 if family == 4 else PROBE_SNAT_V6)
    with (
        proxy_listener(redirect, app, 15006, family, "in"),
        app_listener(app, 8080, family, "app") as appl,
    ):
        assert tcp_request(node_ns, ip(app, family), 8080, b"a") == b"in|a"
        if redirect.name == "nftables":  # the node side as nftables too (table inet headrace_node)
            assert sync_node_probe([app.ipv4, app.ipv6], node_ns)
            assert not sync_node_probe([app.ipv6, app.ipv4], node_ns)  # intact: nothing to change
        else:
            netns_tables.sync_node_probe_rules(node_ns, [app.ipv4, app.ipv6], node_flavour)
            assert netns_tables.check_node_probe_rules(node_ns, [app.ipv6, app.ipv4], node_flavour) == []
        assert tcp_request(node_ns, ip(app, family), 8080, b"b") == b"app|b"
        assert appl.wait_one().peer[0] == probe
        if redirect.name == "nftables":
            assert sync_node_probe([], node_ns)
            assert "headrace" not in redirect.node.netns.run(["nft", "list", "tables"]).stdout
        else:
            netns_tables.sync_node_probe_rules(node_ns, [], node_flavour)
            assert not netns_tables.installed(node_ns, node_flavour)
        assert tcp_request(node_ns, ip(app, family), 8080, b"c") == b"in|c"
