"""Both backends, the same flows, the same observations: what the proxy and the app see, address by address.

Each test runs one scenario twice in the same pod netns + cgroup (tests/kernel/ebpf_fixtures.py): once with
the iptables backend, once with the eBPF backend, and compares what was observed: on the proxy's accepted
socket the peer address, the local address (the arrival port) and SO_ORIGINAL_DST; on the app's socket its
own address (getsockname) and the peer it believes it talks to (getpeername / recvfrom's source). Ephemeral
ports are left out (they differ from run to run); everything else must be equal, and is also checked against
what iptables REDIRECT is known to produce (so a shared mistake would not pass either).

The differences that remain are listed in docs/ebpf.md and asserted as such where a scenario meets one
(a socket bound to the wildcard with a port; SO_ORIGINAL_DST on connections that were not redirected).
The nftables backend runs the same scenarios against iptables and must observe exactly the same.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.backends.base import PodTarget, RedirectBackend, RedirectSpec
from node_agent.lab.traffic import Listener, tcp_request, udp_request, udp_responder

from cni.contract.spec import AmbientSpec, SidecarSpec
from tests.kernel.agent_kit import HEADRACE, AgentRun, node_agent, wait_for
from tests.kernel.ebpf_fixtures import PodEnv, make_cgroup, pod_env, remove_cgroup, run
from tests.kernel.parity_kit import ANY, HELPER, LOOPBACK, Scenario, host_of, tcp_view

pytestmark = [pytest.mark.kernel, pytest.mark.ebpf]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)
pytest.importorskip("bcc")

from node_agent.backends.ebpf import pinning  # noqa: E402
from node_agent.backends.ebpf.backend import EbpfBackend  # noqa: E402
from node_agent.backends.iptables.backend import IptablesBackend  # noqa: E402

Observe = Callable[[Scenario], dict[str, Any]]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PodEnv]:
    yield from pod_env(tmp_path)


@pytest.fixture
def proxy_cgroup(env: PodEnv) -> Iterator[Path]:
    cg = make_cgroup(Path(f"{env.cgroup}-proxy"))
    yield cg
    remove_cgroup(cg)


@pytest.fixture
def target(env: PodEnv) -> PodTarget:
    return env.target()


def run_on(
    backend: RedirectBackend, target: PodTarget, spec: RedirectSpec, env: PodEnv, tmp: Path, observe: Observe
) -> dict[str, Any]:
    helper = tmp / "parity_helper.py"
    helper.write_text(HELPER)
    sc = Scenario(env, helper)
    backend.apply(target, spec)
    try:
        return observe(sc)
    finally:
        sc.stop()
        backend.remove(target)


def both(
    env: PodEnv, target: PodTarget, spec: RedirectSpec, tmp: Path, observe: Observe, proxy_cgroup: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The observations of one scenario with iptables, then with eBPF (the same pod, netns, cgroup)."""
    ipt = run_on(IptablesBackend("auto"), target, spec, env, tmp, observe)
    state = tmp / "ebpf-state"
    ebpf = EbpfBackend(state, proxy_cgroup=proxy_cgroup)
    try:
        got = run_on(ebpf, target, spec, env, tmp, observe)
    finally:
        ebpf.close()
        pinning.unmount_bpffs(state)
    return ipt, got


def assert_same(ipt: dict[str, Any], ebpf: dict[str, Any]) -> None:
    diff = {
        k: {"iptables": ipt.get(k), "ebpf": ebpf.get(k)} for k in sorted({*ipt, *ebpf}) if ipt.get(k) != ebpf.get(k)
    }
    assert not diff, json.dumps(diff, indent=1)


# ---- sidecar ------------------------------------------------------------------------------------------
def sidecar_flows(env: PodEnv) -> Observe:
    def observe(sc: Scenario) -> dict[str, Any]:
        sc.serve(env.pod_ns, 15001, "outbound", cgroup=env.cgroup)
        sc.serve(env.pod_ns, 15006, "inbound", cgroup=env.cgroup)
        sc.serve(env.pod_ns, 8080, "app", cgroup=env.cgroup)
        sc.serve(env.peer_ns, 8080, "peer")
        sc.serve(env.peer_ns, 9090, "peer9090")
        return {
            "out4": tcp_view(sc.app(env.peer_v4, 8080)),
            "out6": tcp_view(sc.app(env.peer_v6, 8080)),
            "out_mapped": tcp_view(sc.app(f"::ffff:{env.peer_v4}", 8080, v6sock=True)),
            "proxy_to_own_ip4": tcp_view(sc.app(env.pod_v4, 8080, uid=1337)),
            "proxy_to_own_ip6": tcp_view(sc.app(env.pod_v6, 8080, uid=1337)),
            "proxy_to_own_ip_mapped": tcp_view(sc.app(f"::ffff:{env.pod_v4}", 8080, uid=1337, v6sock=True)),
            "proxy_to_lo": tcp_view(sc.app("127.0.0.1", 8080, uid=1337)),
            "proxy_to_lo2": tcp_view(sc.app("127.0.0.2", 8080, uid=1337)),
            "passthrough_6": tcp_view(sc.app(env.pod_v4, 8080, uid=1337, src="127.0.0.6")),
            "app_to_own_ip": tcp_view(sc.app(env.pod_v4, 8080)),
            "app_bound_to_pod_ip": tcp_view(sc.app(env.peer_v4, 8080, src=env.pod_v4)),
            "app_bound_to_any": tcp_view(sc.app(env.peer_v4, 8080, src="0.0.0.0")),
            "proxy_out": tcp_view(sc.app(env.peer_v4, 8080, uid=1337)),
            "proxy_out6": tcp_view(sc.app(env.peer_v6, 8080, uid=1337)),
            # the owner is the socket's creator (iptables' owner match): made by root, connected as 1337
            "root_socket_connected_as_1337": tcp_view(sc.app(env.peer_v4, 8080, uid=1337, uid_after_socket=True)),
            "excluded_port": tcp_view(sc.app(env.peer_v4, 9090)),
            "in_excluded_15020": sc.from_peer(env.pod_v4, 15020)["ok"],
        }

    return observe


def test_sidecar_flows_observed_alike(env: PodEnv, target: PodTarget, tmp_path: Path) -> None:
    spec = SidecarSpec(exclude_outbound_ports=(9090,))
    ipt, ebpf = both(env, target, spec, tmp_path, sidecar_flows(env))
    # documented difference: a socket bound to the wildcard with a port before connect cannot be bound to the
    # pod IP any more; eBPF then sends it to pod-ip:15001 (the peer is still the pod IP, the local differs)
    assert ipt["app_bound_to_any"].pop("server_local") == "127.0.0.1:15001"
    assert ebpf["app_bound_to_any"].pop("server_local") == f"{env.pod_v4}:15001"
    assert_same(ipt, ebpf)
    # and what that is (iptables REDIRECT in OUTPUT: destination loopback, source kept)
    assert ebpf["out4"] == {
        "server": "outbound", "server_peer": env.pod_v4, "server_local": "127.0.0.1:15001",
        "orig": f"{env.peer_v4}:8080", "app_sock": env.pod_v4, "app_peername": f"{env.peer_v4}:8080",
    }  # fmt: skip
    assert ebpf["out6"]["server_peer"] == env.pod_v6 and ebpf["out6"]["server_local"] == "[::1]:15001"
    assert ebpf["out6"]["orig"] == f"[{env.peer_v6}]:8080"
    assert ebpf["out_mapped"]["server_peer"] == env.pod_v4 and ebpf["out_mapped"]["orig"] == f"{env.peer_v4}:8080"
    # the proxy dialling its own pod IP reaches 15006 from the pod IP, not from loopback
    assert ebpf["proxy_to_own_ip4"] == {
        "server": "inbound", "server_peer": env.pod_v4, "server_local": "127.0.0.1:15006",
        "orig": f"{env.pod_v4}:8080", "app_sock": env.pod_v4, "app_peername": f"{env.pod_v4}:8080",
    }  # fmt: skip
    assert ebpf["proxy_to_own_ip6"]["server_peer"] == env.pod_v6
    assert ebpf["proxy_to_own_ip6"]["server_local"] == "[::1]:15006"
    assert ebpf["proxy_to_lo"]["server"] == "app" and ebpf["passthrough_6"]["server"] == "app"
    assert ebpf["proxy_to_lo2"]["server"] == "inbound" and ebpf["proxy_to_lo2"]["server_peer"] == "127.0.0.1"
    assert ebpf["app_to_own_ip"]["server"] == "app" and ebpf["proxy_out"]["server"] == "peer"
    assert ebpf["root_socket_connected_as_1337"]["server"] == "outbound"
    assert ebpf["excluded_port"]["server"] == "peer9090" and ebpf["in_excluded_15020"] is False


def inbound_flows(env: PodEnv) -> Observe:
    def observe(sc: Scenario) -> dict[str, Any]:
        sc.serve(env.pod_ns, 15006, "inbound", cgroup=env.cgroup)
        sc.serve(env.pod_ns, 8080, "app", cgroup=env.cgroup)
        out: dict[str, Any] = {}
        for key, host in (("in4", env.pod_v4), ("in6", env.pod_v6)):
            got = sc.from_peer(host, 8080)
            assert got["ok"], got
            r = got["reply"]
            out[key] = {"server": r["name"], "server_peer": host_of(r["peer"]), "orig": r["orig"],
                        "client_peername": got["peername"]}  # fmt: skip
            out[key + "_local"] = r["local"]
        return out

    return observe


def test_sidecar_inbound_observed_alike(env: PodEnv, target: PodTarget, tmp_path: Path) -> None:
    ipt, ebpf = both(env, target, SidecarSpec(), tmp_path, inbound_flows(env))
    assert_same(ipt, ebpf)
    # iptables REDIRECT in PREROUTING: the arrival address is the pod IP with the inbound port
    assert ebpf["in4_local"] == f"{env.pod_v4}:15006" and ebpf["in6_local"] == f"[{env.pod_v6}]:15006"
    assert ebpf["in4"] == {
        "server": "inbound", "server_peer": env.peer_v4, "orig": f"{env.pod_v4}:8080",
        "client_peername": f"{env.pod_v4}:8080",
    }  # fmt: skip


# ---- ambient: outbound and DNS -------------------------------------------------------------------------
PROBE_V4 = str(AmbientSpec().probe_snat_v4)


def ambient_flows(env: PodEnv, proxy_cgroup: Path) -> Observe:
    def observe(sc: Scenario) -> dict[str, Any]:
        sc.serve(env.peer_ns, 8080, "peer")  # also on the kubelet probe SNAT address (see the test)
        # the node proxy (own cgroup) in the pod netns: outbound 15001 and the DNS proxy on loopback:15053
        # (it answers from the address the query reached, so iptables' conntrack can restore the source)
        sc.serve(env.pod_ns, 15001, "outbound", cgroup=proxy_cgroup)
        sc.serve(env.pod_ns, 15053, "dns-tcp", addrs=LOOPBACK, cgroup=proxy_cgroup)
        sc.udpserve(env.pod_ns, 15053, "dns-udp", addrs=LOOPBACK, cgroup=proxy_cgroup)
        sc.udpserve(env.pod_ns, 53, "local-dns", addrs=ANY)
        sc.serve(env.pod_ns, 15006, "inbound", cgroup=proxy_cgroup)
        inbound = sc.from_peer(env.pod_v4, 8080)
        assert inbound["ok"], inbound
        out: dict[str, Any] = {
            "in4": {k: inbound["reply"][k] for k in ("name", "local", "orig")} | {"peername": inbound["peername"]},
            "out4": tcp_view(sc.app(env.peer_v4, 8080)),
            "out6": tcp_view(sc.app(env.peer_v6, 8080)),
            "dns_tcp4": tcp_view(sc.app(env.peer_v4, 53)),
            "dns_tcp6": tcp_view(sc.app(env.peer_v6, 53)),
            "to_probe_address": tcp_view(sc.app(PROBE_V4, 8080)),
        }
        queries = (
            ("dns_udp4", env.peer_v4),
            ("dns_udp6", env.peer_v6),
            ("dns_udp_mapped", f"::ffff:{env.peer_v4}"),  # IPv4 from a dual-stack socket
            ("dns_local", env.pod_v4),
        )
        for key, host in queries:
            got = sc.udpapp(host, 53)
            for r in got.values():
                reply = r.pop("reply")
                r.update(server=reply["name"], server_peer=host_of(reply["peer"]), server_local=reply["local"],
                         data=reply["data"], sock=host_of(r["sock"]))  # fmt: skip
            out[key] = got
        return out

    return observe


def test_ambient_outbound_and_dns_observed_alike(
    env: PodEnv, target: PodTarget, tmp_path: Path, proxy_cgroup: Path
) -> None:
    spec = AmbientSpec(capture_dns=True)
    # the "kubelet" side of the probe SNAT address lives in the peer netns, reachable from the pod
    run("ip", "-n", env.peer_ns, "addr", "add", f"{PROBE_V4}/32", "dev", "eth0")
    run("ip", "-n", env.pod_ns, "route", "add", f"{PROBE_V4}/32", "dev", "eth0")
    ipt, ebpf = both(env, target, spec, tmp_path, ambient_flows(env, proxy_cgroup), proxy_cgroup=proxy_cgroup)
    assert_same(ipt, ebpf)
    # the DNS proxy sees the pod IP (not loopback); the app sees the server it asked
    udp4 = ebpf["dns_udp4"]
    for mode in ("unconnected", "connected"):
        assert udp4[mode]["server"] == "dns-udp" and udp4[mode]["server_peer"] == env.pod_v4
        assert udp4[mode]["server_local"] == "127.0.0.1:15053"
    assert udp4["unconnected"]["src"] == f"{env.peer_v4}:53" and udp4["unconnected"]["sock"] == "0.0.0.0"
    assert udp4["connected"]["sock"] == env.pod_v4  # bound to the pod IP, as routing towards the server picks
    assert udp4["connected"]["peername"] == f"{env.peer_v4}:53"
    udp6 = ebpf["dns_udp6"]
    assert udp6["unconnected"]["server_peer"] == env.pod_v6 and udp6["unconnected"]["src"] == f"[{env.peer_v6}]:53"
    assert udp6["connected"]["peername"] == f"[{env.peer_v6}]:53" and udp6["connected"]["server_peer"] == env.pod_v6
    assert ebpf["dns_tcp4"] == {
        "server": "dns-tcp", "server_peer": env.pod_v4, "server_local": "127.0.0.1:15053",
        "orig": f"{env.peer_v4}:53", "app_sock": env.pod_v4, "app_peername": f"{env.peer_v4}:53",
    }  # fmt: skip
    assert ebpf["dns_tcp6"]["server_peer"] == env.pod_v6 and ebpf["dns_tcp6"]["orig"] == f"[{env.peer_v6}]:53"
    mapped = ebpf["dns_udp_mapped"]
    assert mapped["unconnected"]["src"] == f"[::ffff:{env.peer_v4}]:53" and mapped["unconnected"]["server"] == "dns-udp"
    assert mapped["connected"]["server_peer"] == env.pod_v4
    assert ebpf["dns_local"]["unconnected"]["server"] == "local-dns"  # a pod-local server: untouched
    assert ebpf["out4"]["server_peer"] == env.pod_v4 and ebpf["out4"]["server_local"] == "127.0.0.1:15001"
    assert ebpf["to_probe_address"]["server"] == "peer"  # TCP to the probe SNAT address is never captured
    assert ebpf["in4"] == {
        "name": "inbound", "local": f"{env.pod_v4}:15006", "orig": f"{env.pod_v4}:8080",
        "peername": f"{env.pod_v4}:8080",
    }  # fmt: skip


# ---- nftables: observed exactly like iptables ----------------------------------------------------------
@pytest.mark.parametrize("flows", ["sidecar", "inbound", "ambient"])
def test_nftables_observed_like_iptables(
    env: PodEnv, target: PodTarget, tmp_path: Path, proxy_cgroup: Path, flows: str
) -> None:
    """The nftables backend (one `inet headrace` table) against iptables, the same flows in the same pod:
    every address, arrival port and SO_ORIGINAL_DST equal, with no documented difference at all."""
    from node_agent.backends.nftables.backend import NftablesBackend

    spec: RedirectSpec = SidecarSpec(exclude_outbound_ports=(9090,))
    observe = sidecar_flows(env)
    if flows == "inbound":
        spec, observe = SidecarSpec(), inbound_flows(env)
    elif flows == "ambient":
        spec, observe = AmbientSpec(capture_dns=True), ambient_flows(env, proxy_cgroup)
        run("ip", "-n", env.peer_ns, "addr", "add", f"{PROBE_V4}/32", "dev", "eth0")
        run("ip", "-n", env.pod_ns, "route", "add", f"{PROBE_V4}/32", "dev", "eth0")
    ipt = run_on(IptablesBackend("auto"), target, spec, env, tmp_path, observe)
    nft = run_on(NftablesBackend(), target, spec, env, tmp_path, observe)
    keys = sorted({*ipt, *nft})
    diff = {k: {"iptables": ipt.get(k), "nftables": nft.get(k)} for k in keys if ipt.get(k) != nft.get(k)}
    assert not diff, json.dumps(diff, indent=1)


# ---- the product path: `headrace agent --capture-dns` on either backend ---------------------------------
class DnsAgentRun(AgentRun):
    """The agent with DNS capture on the given backend; the reference proxy in the node's proxy cgroup."""

    proxy_cgroup: Path

    def start_proxy(self) -> None:
        self.proxy_runs += 1
        with open(self.base / f"proxy{self.proxy_runs}.log", "wb") as err:
            self.proxy = subprocess.Popen(
                self._nsenter(HEADRACE, "proxy", "--socket", self.proxy_socket, "--id", "dns-parity",
                              "--cgroup", str(self.proxy_cgroup)),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )  # fmt: skip


@pytest.mark.parametrize("backend", ["iptables", "nftables", "ebpf"])
def test_agent_capture_dns_same_on_both_backends(make_node: Any, backend: str) -> None:
    node = make_node(headrace={"backend": backend}, pod_cgroups=True)
    node.add_namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    with node_agent(node, DnsAgentRun) as (agent, _apps):
        agent.proxy_cgroup = node.proxy_cgroup()
        agent.extra = ["--backend", backend, "--proxy-cgroup", str(agent.proxy_cgroup), "--capture-dns"]
        agent.start_proxy()
        agent.start_agent()
        client = node.add_pod("shop", "client")  # enrolled before ADD returns
        peer = node.add_pod("default", "peer")
        wait_for(lambda: agent.pod_state(client.uid) == "enrolled", 20, "client enrolled")
        assert agent.status()[client.uid]["backend"] == backend
        # the node proxy's DNS listener answers from 127.0.0.1:15053, where the query arrived
        with udp_responder(client.netns.path, 15053, label=b"dns-proxy", addr="127.0.0.1") as seen:
            data, source = udp_request(client.netns.path, peer.ipv4, 53, b"query", cgroup=client.cgroup)
            assert data == b"dns-proxy|query"
            assert source == (peer.ipv4, 53)  # the reply looks like it came from the server asked
            assert seen[-1][0] == client.ipv4  # the DNS proxy sees the pod, not loopback
            with Listener(client.netns.path, 15053, addr="127.0.0.1", cgroup=str(agent.proxy_cgroup),
                          label="dns-proxy-tcp") as tcp:  # fmt: skip
                reply = tcp_request(client.netns.path, peer.ipv4, 53, b"q", cgroup=client.cgroup)
                assert reply == b"dns-proxy-tcp|q"
                conn = tcp.wait_one()
                assert conn.original_dst == (peer.ipv4, 53)
                assert conn.peer[0] == client.ipv4 and conn.local == ("127.0.0.1", 15053)

