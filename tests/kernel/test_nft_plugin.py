"""The plugin's standalone nftables path (`"backend": "nftables"` in the conflist entry) through the real
chain (bridge + host-local + headrace-cni by the harness's CNI runner), IPv4 and IPv6, real traffic:

- TPROXY mode: inbound arrives at an IP_TRANSPARENT listener on 15006 with the original destination as
  its local address and the client as its peer; excluded ports reach the app; outbound lands on 15001;
  the proxy bypasses; its plain connection to its own pod IP is captured inbound, the app's is not;
  includeInboundPorts limits capture; ADD twice → one table, one ip rule; CHECK fails on a deleted rule or
  a deleted ip rule and ADD repairs; DEL leaves no table, no rule, no route;
- HBONE: inbound 15008 is never captured; the proxy's connection to its own pod IP on 15008 is not sent to
  15006 (sidecar), nor the node proxy's marked one (ambient, through the agent's backend);
- a bad annotation is error 101 and leaves no table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from node_agent.backends.base import PodTarget
from node_agent.backends.nftables.backend import NftablesBackend

from cni.contract.spec import AmbientSpec
from tests.harness.cni_runner import CniInvocationError
from tests.harness.node import Pod, SimNode
from tests.harness.traffic import Listener, tcp_request

pytestmark = pytest.mark.kernel

MODE = "sidecar.istio.io/interceptionMode"
SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
TPROXY = {**SIDECAR, MODE: "TPROXY"}


@pytest.fixture
def node(make_node: Callable[..., SimNode]) -> SimNode:
    return make_node(headrace={"backend": "nftables"})


def ip(pod: Pod, family: int) -> str:
    return pod.ipv4 if family == 4 else pod.ipv6


def run_headrace(node: SimNode, pod: Pod, command: str, **kw: Any) -> Any:
    runner = node.runner()
    plugin = runner.plugin_conf("headrace-cni")
    kw.setdefault("netns", pod.netns.path)
    kw.setdefault("prev", pod.result)
    return runner.exec_plugin(plugin, command, container_id=pod.container_id, args=pod.cni_args, **kw)


def nft_tables(pod: Pod) -> list[str]:
    return [x for x in pod.netns.run(["nft", "list", "tables"]).stdout.splitlines() if x.strip()]


def iptables_lines(pod: Pod) -> list[str]:
    out: list[str] = []
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        out.extend(line for line in pod.netns.run([tool]).stdout.splitlines() if "HEADRACE" in line)
    return out


def our_ip_rules(pod: Pod, family: int) -> list[str]:
    return [r for r in pod.netns.run(["ip", f"-{family}", "rule", "list"]).stdout.splitlines() if "lookup 133" in r]


@pytest.mark.parametrize("family", [4, 6])
def test_tproxy_traffic_check_del(node: SimNode, family: int) -> None:
    client = node.add_pod("shop", "client")
    web = node.add_pod("shop", "web", annotations={**TPROXY, "traffic.sidecar.istio.io/excludeInboundPorts": "9000"})
    assert nft_tables(web) == ["table inet headrace"] and iptables_lines(web) == []
    assert len(our_ip_rules(web, family)) == 1
    pod_ip, client_ip = ip(web, family), ip(client, family)
    passthrough = "127.0.0.6" if family == 4 else "::6"
    with (
        Listener(web.netns.path, 15006, family=family, label="tproxy", transparent=True) as inbound,
        Listener(web.netns.path, 15001, family=family, label="out") as outbound,
        Listener(web.netns.path, 8080, family=family, label="app") as app,
        Listener(web.netns.path, 9000, family=family, label="excluded") as excluded,
        Listener(client.netns.path, 8080, family=family, label="client") as client_app,
    ):
        assert tcp_request(client.netns.path, pod_ip, 8080, b"in") == b"tproxy|in"
        got = inbound.wait_one()
        assert got.local == (pod_ip, 8080) and got.peer[0] == client_ip
        assert tcp_request(client.netns.path, pod_ip, 9000, b"x") == b"excluded|x"
        assert excluded.wait_one().peer[0] == client_ip
        assert tcp_request(web.netns.path, client_ip, 8080, b"o") == b"out|o"
        assert outbound.wait_one().original_dst == (client_ip, 8080)
        assert tcp_request(web.netns.path, client_ip, 8080, b"p", uid=1337, gid=1337) == b"client|p"
        assert client_app.wait_one().peer[0] == pod_ip
        # Istio's lo handling: passthrough source reaches the app; the proxy's plain connection to its own
        # pod IP is inbound; the app calling its own pod IP is not captured
        got_app = tcp_request(web.netns.path, pod_ip, 8080, b"s", uid=1337, gid=1337, source=passthrough)
        assert got_app == b"app|s" and app.wait_one().peer[0] == passthrough
        assert tcp_request(web.netns.path, pod_ip, 8080, b"y", uid=1337, gid=1337) == b"tproxy|y"
        inbound.wait_one()
        assert tcp_request(web.netns.path, pod_ip, 8080, b"z") == b"app|z"
        assert app.wait_one().data == b"z" and inbound.count() == 0

    assert run_headrace(node, web, "ADD") == web.result  # ADD twice: one table, one ip rule
    assert nft_tables(web) == ["table inet headrace"] and len(our_ip_rules(web, family)) == 1
    assert run_headrace(node, web, "CHECK") is None
    web.netns.run(["ip", f"-{family}", "rule", "del", "pref", "32765", "fwmark", "0x539", "lookup", "133"])
    with pytest.raises(CniInvocationError) as info:
        run_headrace(node, web, "CHECK")
    assert info.value.code == 105 and f"IPv{family} policy routing" in json.dumps(info.value.error)
    run_headrace(node, web, "ADD")
    web.netns.run(["nft", "flush", "chain", "inet", "headrace", "sc_tproxy"])
    with pytest.raises(CniInvocationError) as info:
        run_headrace(node, web, "CHECK")
    assert info.value.code == 105 and "sc_tproxy: missing rule" in json.dumps(info.value.error)
    run_headrace(node, web, "ADD")
    node.runner().check(web.container_id, web.netns.path, args=web.cni_args)
    node.runner().delete(web.container_id, web.netns.path, args=web.cni_args)
    assert nft_tables(web) == [] and our_ip_rules(web, 4) == [] and our_ip_rules(web, 6) == []
    assert run_headrace(node, web, "DEL") is None


def test_tproxy_include_inbound_ports(node: SimNode) -> None:
    client = node.add_pod("shop", "client")
    web = node.add_pod("shop", "web", annotations={**TPROXY, "traffic.sidecar.istio.io/includeInboundPorts": "8080"})
    with (
        Listener(web.netns.path, 15006, label="tproxy", transparent=True) as inbound,
        Listener(web.netns.path, 8081, label="other") as other,
    ):
        assert tcp_request(client.netns.path, web.ipv4, 8080, b"a") == b"tproxy|a"
        assert inbound.wait_one().local == (web.ipv4, 8080)
        assert tcp_request(client.netns.path, web.ipv4, 8081, b"b") == b"other|b"
        assert other.wait_one().peer[0] == client.ipv4


@pytest.mark.parametrize("family", [4, 6])
def test_hbone_port_never_captured_sidecar(node: SimNode, family: int) -> None:
    client = node.add_pod("shop", "client")
    web = node.add_pod("shop", "web", annotations=SIDECAR)
    pod_ip = ip(web, family)
    with (
        Listener(web.netns.path, 15006, family=family, label="in") as inbound,
        Listener(web.netns.path, 15008, family=family, label="hbone") as hbone,
    ):
        assert tcp_request(client.netns.path, pod_ip, 15008, b"a") == b"hbone|a"
        assert tcp_request(web.netns.path, pod_ip, 15008, b"b", uid=1337, gid=1337) == b"hbone|b"
        assert hbone.wait_one().data == b"a" and hbone.wait_one().data == b"b"
        # any other port of its own pod IP is still inbound for the proxy
        assert tcp_request(web.netns.path, pod_ip, 8080, b"c", uid=1337, gid=1337) == b"in|c"
        assert inbound.wait_one().original_dst == (pod_ip, 8080)


@pytest.mark.parametrize("family", [4, 6])
def test_hbone_port_never_captured_ambient(node: SimNode, family: int) -> None:
    client = node.add_pod("shop", "client")
    web = node.add_pod("shop", "web")
    backend = NftablesBackend()
    target = PodTarget(web.uid, "shop", "web", web.netns.path, ips=(web.ipv4, web.ipv6))
    backend.apply(target, AmbientSpec())
    pod_ip = ip(web, family)
    try:
        with (
            Listener(web.netns.path, 15006, family=family, label="in") as inbound,
            Listener(web.netns.path, 15008, family=family, label="hbone") as hbone,
        ):
            assert tcp_request(client.netns.path, pod_ip, 15008, b"a") == b"hbone|a"
            assert tcp_request(web.netns.path, pod_ip, 15008, b"b", mark=0x539) == b"hbone|b"
            assert hbone.wait_one().data == b"a" and hbone.wait_one().data == b"b"
            assert tcp_request(client.netns.path, pod_ip, 8080, b"c") == b"in|c"
            assert inbound.wait_one().original_dst == (pod_ip, 8080)
    finally:
        backend.remove(target)
    assert nft_tables(web) == []


def test_bad_annotation_leaves_no_table(node: SimNode) -> None:
    pod = node.add_pod("shop", "plain")
    for bad in ({MODE: "tproxy"}, {"traffic.sidecar.istio.io/excludeInboundPorts": "80; flush ruleset"}):
        pod.annotations = {**SIDECAR, **bad}
        node.write_pod(pod)
        with pytest.raises(CniInvocationError) as info:
            run_headrace(node, pod, "ADD")
        assert info.value.code == 101
    assert nft_tables(pod) == []
