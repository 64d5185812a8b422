"""istio-iptables parity, proven with real TCP between pods made by the real bridge + host-local plugins, on
every redirection backend (iptables-legacy, iptables-nft, nftables, ebpf: tests/kernel/redirect_backends.py) where the
backend implements the feature, and through the real plugin chain for interceptionMode NONE.

Proven:
- 15008 (HBONE) is never captured in a sidecar pod: a client outside the pod reaches the proxy's 15008
  listener directly (not 15006), also when includeInboundPorts lists it; the proxy's own connection to its
  pod's IP on 15008 goes straight to it, while on another port it still goes to 15006
  (test_sidecar_hbone_not_captured; the ambient side: test_ambient_traffic's test_ambient_capture_and_bypass
  and test_ambient_hbone_from_outside here);
- includeOutboundPorts captures only those ports when includeOutboundIPRanges is empty, and those ports
  beside the include ranges otherwise (test_include_outbound_ports_only / _beside_ranges);
- excludeInterfaces: with a second veth into the pod netns, a connection arriving on it reaches the app
  uncaptured and a connection leaving via it reaches its peer uncaptured, while eth0 stays captured; the
  eBPF backend declines the spec (the agent then serves the pod with iptables) (test_exclude_interfaces);
- kubevirtInterfaces: a "VM" netns routed through the pod over such an interface has its TCP redirected to
  15001 with the original destination, to every destination or only to the include ranges; the rest of its
  traffic is not captured inbound; eBPF declines (test_kubevirt_interfaces);
- a sidecar pod with `sidecar.istio.io/interceptionMode: NONE`: ADD succeeds, no rule of ours in any table,
  traffic reaches the app directly, on an iptables and on an eBPF-configured chain (test_interception_none).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from node_agent.backends.base import BackendError

from cni.contract.spec import AmbientSpec, SidecarSpec
from tests.harness.netns import NetNS
from tests.harness.node import Pod, SimNode
from tests.harness.traffic import Listener, tcp_request
from tests.kernel.redirect_backends import Redirect, ip, over_backends_and_families, redirect_fixture

pytestmark = pytest.mark.kernel

SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
PROXY = {"uid": 1337, "gid": 1337}


@pytest.fixture
def redirect(request: pytest.FixtureRequest, make_node: Any) -> Iterator[Redirect]:
    yield from redirect_fixture(make_node, str(request.param))


def app_request(pod: Pod, host: str, port: int, payload: bytes, **kw: Any) -> bytes:
    return tcp_request(pod.netns.path, host, port, payload, cgroup=pod.cgroup, **kw)


def listener(pod: Pod, port: int, family: int, label: str) -> Listener:
    return Listener(pod.netns.path, port, family=family, label=label, cgroup=pod.cgroup)


def host_net(pod: Pod, family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(ip(pod, family))


# ---------------------------------------------------------------- 15008


@over_backends_and_families()
def test_sidecar_hbone_not_captured(redirect: Redirect, family: int) -> None:
    app, peer = redirect.pods(2)
    for spec in (SidecarSpec(), SidecarSpec(include_inbound_ports=(15008, 8080))):
        redirect.apply(app, spec)
        with (
            listener(app, 15006, family, "in") as inb,
            listener(app, 15008, family, "hbone") as hbone,
            listener(app, 8080, family, "app"),
        ):
            # a client outside the pod reaches 15008 itself, with its own address as the peer
            assert app_request(peer, ip(app, family), 15008, b"h") == b"hbone|h"
            assert hbone.wait_one().peer[0] == ip(peer, family)
            # the proxy calling its own pod IP on 15008 goes straight to it…
            assert app_request(app, ip(app, family), 15008, b"s", **PROXY) == b"hbone|s"
            hbone.wait_one()
            assert inb.count() == 0
            # …on any other port it is still inbound traffic (15006)
            assert app_request(app, ip(app, family), 8080, b"y", **PROXY) == b"in|y"
            assert inb.wait_one().original_dst == (ip(app, family), 8080)
            # and the app port from outside is captured
            assert app_request(peer, ip(app, family), 8080, b"i") == b"in|i"
            inb.wait_one()


@over_backends_and_families()
def test_ambient_hbone_from_outside(redirect: Redirect, family: int) -> None:
    """A client outside an ambient pod reaches the node proxy's 15008 in the pod directly (not 15006)."""
    app, peer = redirect.pods(2)
    redirect.apply(app, AmbientSpec())
    proxy = redirect.proxy_cgroup
    with (
        Listener(app.netns.path, 15006, family=family, label="in", cgroup=proxy) as inb,
        Listener(app.netns.path, 15008, family=family, label="hbone", cgroup=proxy) as hbone,
    ):
        assert app_request(peer, ip(app, family), 15008, b"h") == b"hbone|h"
        assert hbone.wait_one().peer[0] == ip(peer, family)
        assert app_request(peer, ip(app, family), 8080, b"i") == b"in|i"
        assert inb.wait_one().original_dst == (ip(app, family), 8080)


@over_backends_and_families(families=(4,))
def test_istio_validation_probe(redirect: Redirect, family: int) -> None:
    """The injector's istio-validation init container (uid 1337, with istio-cni "enabled") dials
    127.0.0.6:15002 and expects to be answered on 15001 or 15006 with SO_ORIGINAL_DST port 15002."""
    app = redirect.pod("p0")
    redirect.apply(app, SidecarSpec())
    with listener(app, 15006, family, "in") as inb, listener(app, 15001, family, "out") as out:
        assert app_request(app, "127.0.0.6", 15002, b"v", **PROXY) in (b"in|v", b"out|v")
        got = inb.wait_one() if inb.count() else out.wait_one()
        assert got.original_dst == ("127.0.0.6", 15002)


@pytest.mark.parametrize("flavour", ["legacy", "nft", "nftables"])
def test_tproxy_hbone_not_captured(make_node: Callable[..., SimNode], flavour: str) -> None:
    """TPROXY mode through the plugin chain: 15008 is not captured either (istio-iptables' TPROXY rules
    would take it), while the app port is (an IP_TRANSPARENT listener sees the original destination)."""
    node = make_node(headrace={"backend": "nftables"} if flavour == "nftables" else {"iptables": flavour})
    peer = node.add_pod("shop", "peer")
    web = node.add_pod("shop", "web", annotations={**SIDECAR, "sidecar.istio.io/interceptionMode": "TPROXY"})
    with (
        Listener(web.netns.path, 15006, label="tproxy", transparent=True) as inb,
        Listener(web.netns.path, 15008, label="hbone") as hbone,
        Listener(web.netns.path, 8080, label="app"),
    ):
        assert tcp_request(peer.netns.path, web.ipv4, 15008, b"h") == b"hbone|h"
        assert hbone.wait_one().peer[0] == peer.ipv4
        assert tcp_request(web.netns.path, web.ipv4, 15008, b"s", uid=1337, gid=1337) == b"hbone|s"
        hbone.wait_one()
        assert inb.count() == 0
        assert tcp_request(peer.netns.path, web.ipv4, 8080, b"i") == b"tproxy|i"
        assert inb.wait_one().peer[0] == peer.ipv4


# ---------------------------------------------------------------- includeOutboundPorts


@over_backends_and_families()
def test_include_outbound_ports_only(redirect: Redirect, family: int) -> None:
    app, peer = redirect.pods(2)
    redirect.apply(app, SidecarSpec(include_outbound_ports=(9090,), include_outbound_ranges=()))
    with (
        listener(app, 15001, family, "out") as out,
        listener(peer, 9090, family, "peer9090"),
        listener(peer, 8080, family, "peer8080") as p8080,
    ):
        assert app_request(app, ip(peer, family), 9090, b"a") == b"out|a"
        assert out.wait_one().original_dst == (ip(peer, family), 9090)
        assert app_request(app, ip(peer, family), 8080, b"b") == b"peer8080|b"
        assert p8080.wait_one().peer[0] == ip(app, family)
        assert out.count() == 0


@over_backends_and_families()
def test_include_outbound_ports_beside_ranges(redirect: Redirect, family: int) -> None:
    app, peer, other = redirect.pods(3)
    spec = SidecarSpec(include_outbound_ports=(9090,), include_outbound_ranges=(host_net(other, family),))
    redirect.apply(app, spec)
    with (
        listener(app, 15001, family, "out") as out,
        listener(peer, 8080, family, "peer8080"),
        listener(other, 8080, family, "other"),
    ):
        assert app_request(app, ip(peer, family), 9090, b"a") == b"out|a"  # the port, any address
        assert out.wait_one().original_dst == (ip(peer, family), 9090)
        assert app_request(app, ip(other, family), 8080, b"b") == b"out|b"  # the range, any port
        assert out.wait_one().original_dst == (ip(other, family), 8080)
        assert app_request(app, ip(peer, family), 8080, b"c") == b"peer8080|c"  # neither


# ---------------------------------------------------------------- interfaces


LINKS = {  # (pod side, other side) per family of the second link
    "ext": {4: ("10.250.7.2", "10.250.7.1"), 6: ("fd00:250:7::2", "fd00:250:7::1")},
    "vm": {4: ("10.251.7.1", "10.251.7.2"), 6: ("fd00:251:7::1", "fd00:251:7::2")},
}


@contextmanager
def second_link(pod: Pod, pod_if: str, which: str, prefix: str) -> Iterator[NetNS]:
    """A veth from the pod netns (pod_if) to a new netns (its end: x0), both families addressed from
    LINKS[which]; the netns is deleted (with its end of the veth, and so the pod's) afterwards."""
    other = NetNS.create(prefix)
    try:
        pod.netns.run(["ip", "link", "add", pod_if, "type", "veth", "peer", "name", "x0", "netns", other.name])
        for fam, (mine, theirs) in LINKS[which].items():
            plen, flags = ("24", ()) if fam == 4 else ("64", ("nodad",))
            pod.netns.run(["ip", f"-{fam}", "addr", "add", f"{mine}/{plen}", "dev", pod_if, *flags])
            other.run(["ip", f"-{fam}", "addr", "add", f"{theirs}/{plen}", "dev", "x0", *flags])
        pod.netns.run(["ip", "link", "set", pod_if, "up"])
        other.run(["ip", "link", "set", "x0", "up"])
        yield other
    finally:
        other.delete()


def assert_declined(redirect: Redirect, pod: Pod, spec: SidecarSpec, annotation: str) -> None:
    """eBPF cannot express the interface annotations: it declines the spec (the agent's backend choice
    then puts the pod on its iptables fallback) and refuses to apply it."""
    reason = redirect.backend.fallback_reason(spec)
    assert reason is not None and annotation in reason and "iptables" in reason
    with pytest.raises(BackendError, match=annotation):
        redirect.backend.apply(redirect.target(pod), spec)
    assert not redirect.backend.installed(redirect.target(pod))


@over_backends_and_families()
def test_exclude_interfaces(redirect: Redirect, family: int) -> None:
    app, peer = redirect.pods(2)
    spec = SidecarSpec(exclude_interfaces=("net1",))
    if redirect.name == "ebpf":
        assert_declined(redirect, app, spec, "excludeInterfaces")
        return
    mine, theirs = LINKS["ext"][family]
    with second_link(app, "net1", "ext", "hrext-") as ext:
        redirect.apply(app, spec)
        with (
            listener(app, 15001, family, "out") as out,
            listener(app, 15006, family, "in") as inb,
            listener(app, 8080, family, "app") as appl,
            Listener(ext.path, 8080, family=family, label="ext") as extl,
            listener(peer, 8080, family, "peer"),
        ):
            # arriving on the excluded interface: the app itself, from the real client
            assert tcp_request(ext.path, mine, 8080, b"a") == b"app|a"
            assert appl.wait_one().peer[0] == theirs
            # leaving via the excluded interface: the real destination, from the pod's address there
            assert app_request(app, theirs, 8080, b"b") == b"ext|b"
            assert extl.wait_one().peer[0] == mine
            assert out.count() == 0 and inb.count() == 0
            # eth0 stays captured both ways
            assert app_request(peer, ip(app, family), 8080, b"c") == b"in|c"
            assert app_request(app, ip(peer, family), 8080, b"d") == b"out|d"
            assert out.wait_one().original_dst == (ip(peer, family), 8080)


@over_backends_and_families()
def test_kubevirt_interfaces(redirect: Redirect, family: int) -> None:
    app, peer = redirect.pods(2)
    wildcard = SidecarSpec(kubevirt_interfaces=("eth1",))
    if redirect.name == "ebpf":
        assert_declined(redirect, app, wildcard, "kubevirtInterfaces")
        return
    gateway, vm_ip = LINKS["vm"][family]
    with second_link(app, "eth1", "vm", "hrvm-") as vm:
        # the pod routes the VM's traffic (sysctls of its own netns only)
        app.netns.sysctl("net.ipv4.ip_forward" if family == 4 else "net.ipv6.conf.all.forwarding", "1")
        vm.run(["ip", f"-{family}", "route", "add", "default", "via", gateway])
        only_peer = SidecarSpec(kubevirt_interfaces=("eth1",), include_outbound_ranges=(host_net(peer, family),))
        redirect.apply(app, only_peer)
        with (
            listener(app, 15001, family, "out") as out,
            listener(app, 15006, family, "in") as inb,
            listener(app, 9090, family, "app9090") as app9090,
        ):
            # the VM's connection to an included destination is outbound traffic of the pod's proxy
            assert tcp_request(vm.path, ip(peer, family), 8080, b"v") == b"out|v"
            got = out.wait_one()
            assert got.original_dst == (ip(peer, family), 8080) and got.peer[0] == vm_ip
            # the rest of the VM's traffic is not captured at all (not even as inbound)
            assert tcp_request(vm.path, ip(app, family), 9090, b"w") == b"app9090|w"
            assert app9090.wait_one().peer[0] == vm_ip
            assert inb.count() == 0
            # the same port from eth0 is inbound traffic
            assert app_request(peer, ip(app, family), 9090, b"x") == b"in|x"
            inb.wait_one()
            # every destination with the wildcard include
            redirect.apply(app, wildcard)
            assert tcp_request(vm.path, ip(app, family), 9090, b"z") == b"out|z"
            assert out.wait_one().original_dst == (ip(app, family), 9090)
            assert inb.count() == 0 and app9090.count() == 0


# ---------------------------------------------------------------- interceptionMode NONE


def headrace_lines(pod: Pod) -> list[str]:
    out: list[str] = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save"):
        out.extend(line for line in pod.netns.run([tool]).stdout.splitlines() if "HEADRACE" in line)
    return out


@pytest.mark.parametrize(
    "conf", [{"iptables": "legacy"}, {"iptables": "nft"}, {"backend": "nftables"}, {"backend": "ebpf"}], ids=str
)
def test_interception_none(make_node: Callable[..., SimNode], conf: dict[str, str]) -> None:
    """ADD succeeds without an agent (an eBPF chain would otherwise need one), nothing is installed, the
    pod's traffic is direct; the log says why."""
    node = make_node(headrace=conf)
    peer = node.add_pod("shop", "peer")
    web = node.add_pod("shop", "web", annotations={**SIDECAR, "sidecar.istio.io/interceptionMode": "NONE"})
    assert headrace_lines(web) == []
    assert "headrace" not in web.netns.run(["nft", "list", "tables"]).stdout
    with (
        Listener(web.netns.path, 15006, label="in") as inb,
        Listener(web.netns.path, 8080, label="app") as appl,
        Listener(peer.netns.path, 8080, label="peer"),
    ):
        assert tcp_request(peer.netns.path, web.ipv4, 8080, b"i") == b"app|i"
        assert appl.wait_one().peer[0] == peer.ipv4
        assert tcp_request(web.netns.path, peer.ipv4, 8080, b"o") == b"peer|o"
        assert inb.count() == 0
    assert "interceptionMode NONE: no redirection" in node.log_file.read_text()
