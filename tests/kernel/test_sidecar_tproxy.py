"""TPROXY inbound interception (`sidecar.istio.io/interceptionMode: TPROXY`) through the real plugin chain:
bridge + host-local + headrace-cni run by the harness's CNI runner on a SimNode, iptables-legacy and
iptables-nft (the conflist's `iptables` field), IPv4 and IPv6 (dual-stack pods).

Proven:
- a connection from another pod to the app port arrives at an IP_TRANSPARENT listener on 15006 whose
  accepted socket has the original destination (pod IP:app port) as its local address and the client
  pod's IP as its peer (source preserved); excluded inbound ports (annotation and 15021) reach the app;
  outbound still lands on 15001 with SO_ORIGINAL_DST; the policy routing (fwmark 0x539 → table 133, local
  default dev lo) is in place once, also after a second ADD; CHECK fails when the ip rule is deleted and a
  new ADD repairs it; DEL leaves no HEADRACE chain in nat or mangle and no rule/route of ours
  (test_tproxy_inbound_outbound_check_del);
- includeInboundPorts limits TPROXY capture to those ports (test_tproxy_include_inbound_ports);
- Istio's lo handling in TPROXY mode: the proxy reaches the app from 127.0.0.6 / ::6, its plain connection
  to its own pod IP is captured inbound, the app talking to its own pod IP is not
  (test_tproxy_proxy_to_local_app_over_lo);
- an unknown mode is a CNI error (101) that leaves the pod netns untouched (test_bad_mode_leaves_netns_untouched);
- netns_tables in a bare netns: an iptables failure deletes the routing this ADD created, a routing failure
  rolls back the rules and the other family's routing, a rollback keeps routing that was already there,
  TPROXY → REDIRECT deletes the routing, a v4-only pod gets IPv4 routing only; the agent's IptablesBackend
  reports and repairs a deleted route.

The inbound listener is the harness Listener with `transparent=True` (IP_TRANSPARENT).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from node_agent.backends.base import PodTarget
from node_agent.backends.iptables.backend import IptablesBackend

from cni.contract.spec import SidecarSpec
from cni.kernel import flavour, iptables_run, side_jobs
from cni.kernel import tables as netns_tables
from tests.harness.cni_runner import CniInvocationError
from tests.harness.netns import NetNS
from tests.harness.node import Pod, SimNode
from tests.harness.traffic import Listener, tcp_request

pytestmark = pytest.mark.kernel

FLAVOURS = ["legacy", "nft"]
MODE = "sidecar.istio.io/interceptionMode"
SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
TPROXY = {**SIDECAR, MODE: "TPROXY"}


@pytest.fixture(params=FLAVOURS)
def flavour_node(request: pytest.FixtureRequest, make_node: Callable[..., SimNode]) -> tuple[str, SimNode]:
    flavour = str(request.param)
    return flavour, make_node(headrace={"iptables": flavour})


def ip(pod: Pod, family: int) -> str:
    return pod.ipv4 if family == 4 else pod.ipv6


def run_headrace(node: SimNode, pod: Pod, command: str, **kw: Any) -> Any:
    runner = node.runner()
    plugin = runner.plugin_conf("headrace-cni")
    kw.setdefault("netns", pod.netns.path)
    kw.setdefault("prev", pod.result)
    return runner.exec_plugin(plugin, command, container_id=pod.container_id, args=pod.cni_args, **kw)


def headrace_lines(pod: Pod) -> list[str]:
    """Every HEADRACE line of every table, both families, both flavours."""
    out: list[str] = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save"):
        out.extend(line for line in pod.netns.run([tool]).stdout.splitlines() if "HEADRACE" in line)
    return out


def policy_routing(pod: Pod, family: int) -> tuple[list[str], list[str]]:
    """(our ip rules, the routes of table 133) of one family in the pod netns."""
    rules = pod.netns.run(["ip", f"-{family}", "rule", "list"]).stdout.splitlines()
    # a table that never existed is an error for IPv4 ("FIB table does not exist"): no routes either
    routes = pod.netns.run(["ip", f"-{family}", "route", "list", "table", "133"], check=False).stdout.splitlines()
    return [r for r in rules if "lookup 133" in r], [r.strip() for r in routes]


def assert_policy_routing(pod: Pod) -> None:
    for family in (4, 6):
        rules, routes = policy_routing(pod, family)
        assert [r.split() for r in rules] == [["32765:", "from", "all", "fwmark", "0x539", "lookup", "133"]], family
        assert len(routes) == 1 and routes[0].startswith("local default dev lo"), (family, routes)


@pytest.mark.parametrize("family", [4, 6])
def test_tproxy_inbound_outbound_check_del(flavour_node: tuple[str, SimNode], family: int) -> None:
    flavour, node = flavour_node
    client = node.add_pod("shop", "client")
    web = node.add_pod("shop", "web", annotations={**TPROXY, "traffic.sidecar.istio.io/excludeInboundPorts": "9000"})
    saved = web.netns.run([f"ip{'6' if family == 6 else ''}tables-{flavour}-save", "-t", "mangle"]).stdout
    assert "-j TPROXY" in saved and "HEADRACE_SC_DIVERT" in saved
    assert_policy_routing(web)
    pod_ip, client_ip = ip(web, family), ip(client, family)

    with (
        Listener(web.netns.path, 15006, family=family, label="tproxy", transparent=True) as inbound,
        Listener(web.netns.path, 15001, family=family, label="out") as outbound,
        Listener(web.netns.path, 8080, family=family, label="app") as app,
        Listener(web.netns.path, 9000, family=family, label="excluded") as excluded,
        Listener(web.netns.path, 15021, family=family, label="health"),
        Listener(client.netns.path, 8080, family=family, label="client") as client_app,
    ):
        # inbound: TPROXY keeps the original destination as the local address and the client as the peer
        assert tcp_request(client.netns.path, pod_ip, 8080, b"in") == b"tproxy|in"
        got = inbound.wait_one()
        peer, local, data = got.peer, got.local, got.data
        assert local == (pod_ip, 8080) and peer[0] == client_ip and data == b"in"
        assert app.count() == 0
        # excluded inbound ports reach the app directly
        assert tcp_request(client.netns.path, pod_ip, 9000, b"x") == b"excluded|x"
        assert excluded.wait_one().peer[0] == client_ip
        assert tcp_request(client.netns.path, pod_ip, 15021, b"h") == b"health|h"
        # outbound: still REDIRECT to 15001, SO_ORIGINAL_DST gives the destination
        assert tcp_request(web.netns.path, client_ip, 8080, b"o") == b"out|o"
        assert outbound.wait_one().original_dst == (client_ip, 8080)
        # the proxy (uid 1337) reaches the real destination, and the replies come back to it
        assert tcp_request(web.netns.path, client_ip, 8080, b"p", uid=1337, gid=1337) == b"client|p"
        assert client_app.wait_one().peer[0] == pod_ip
        assert inbound.count() == 0

    # ADD again: one set of rules, one rule/route per family; CHECK passes
    assert run_headrace(node, web, "ADD") == web.result
    assert_policy_routing(web)
    assert run_headrace(node, web, "CHECK") is None
    # someone deletes the ip rule: CHECK fails and says so; ADD repairs it
    web.netns.run(["ip", f"-{family}", "rule", "del", "pref", "32765", "fwmark", "0x539", "lookup", "133"])
    with pytest.raises(CniInvocationError) as info:
        run_headrace(node, web, "CHECK")
    assert info.value.code == 105
    assert f"IPv{family} policy routing: ip rule" in json.dumps(info.value.error)
    run_headrace(node, web, "ADD")
    assert_policy_routing(web)
    node.runner().check(web.container_id, web.netns.path, args=web.cni_args)

    # DEL: no chain of ours in any table, no rule or route of ours
    node.runner().delete(web.container_id, web.netns.path, args=web.cni_args)
    assert headrace_lines(web) == []
    for fam in (4, 6):
        assert policy_routing(web, fam) == ([], [])
    assert run_headrace(node, web, "DEL") is None  # again: still fine


def test_tproxy_include_inbound_ports(flavour_node: tuple[str, SimNode]) -> None:
    _, node = flavour_node
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
        assert inbound.count() == 0


@pytest.mark.parametrize("family", [4, 6])
def test_tproxy_proxy_to_local_app_over_lo(flavour_node: tuple[str, SimNode], family: int) -> None:
    _, node = flavour_node
    web = node.add_pod("shop", "web", annotations=TPROXY)
    pod_ip = ip(web, family)
    passthrough = "127.0.0.6" if family == 4 else "::6"
    with (
        Listener(web.netns.path, 15006, family=family, label="tproxy", transparent=True) as inbound,
        Listener(web.netns.path, 8080, family=family, label="app") as app,
    ):
        # the proxy's inbound passthrough (source 127.0.0.6 / ::6) reaches the app
        got = tcp_request(web.netns.path, pod_ip, 8080, b"x", uid=1337, gid=1337, source=passthrough)
        assert got == b"app|x" and app.wait_one().peer[0] == passthrough
        # the proxy's plain connection to its own pod IP is inbound traffic (15006)
        assert tcp_request(web.netns.path, pod_ip, 8080, b"y", uid=1337, gid=1337) == b"tproxy|y"
        inbound.wait_one()
        # the app calling its own pod IP is not captured
        assert tcp_request(web.netns.path, pod_ip, 8080, b"z") == b"app|z"
        assert app.wait_one().data == b"z" and inbound.count() == 0


def test_bad_mode_leaves_netns_untouched(flavour_node: tuple[str, SimNode]) -> None:
    _, node = flavour_node
    pod = node.add_pod("shop", "plain")
    before = (headrace_lines(pod), policy_routing(pod, 4), policy_routing(pod, 6))
    for bad in ("tproxy", "none", "TPROXY; ip rule flush"):
        pod.annotations = {**SIDECAR, MODE: bad}
        node.write_pod(pod)
        with pytest.raises(CniInvocationError) as info:
            run_headrace(node, pod, "ADD")
        assert info.value.code == 101 and MODE in info.value.msg
    assert (headrace_lines(pod), policy_routing(pod, 4), policy_routing(pod, 6)) == before


# ---------------------------------------------------------------- netns_tables: rollback and mode switches


def ours(n: NetNS, fl: str) -> tuple[list[str], list[list[str]]]:
    """(HEADRACE lines of both families, our policy-routing entries of both families) in a bare netns."""
    lines = [
        line
        for family in (4, 6)
        for line in iptables_run.save(n.path, fl, family).splitlines()  # type: ignore[arg-type]
        if "HEADRACE" in line
    ]
    routing: list[list[str]] = []
    for family in (4, 6):
        rules = n.run(["ip", f"-{family}", "rule", "list"]).stdout.splitlines()
        routing += [r.split() for r in rules if "lookup 133" in r]
        routes = n.run(["ip", f"-{family}", "route", "list", "table", "133"], check=False).stdout.splitlines()
        routing += [r.split() for r in routes]
    return lines, routing


SPEC_TPROXY = SidecarSpec(interception_mode="TPROXY")


@pytest.mark.parametrize("fl", FLAVOURS)
@pytest.mark.parametrize("optimistic", [True, False])
def test_iptables_failure_rolls_the_new_routing_back(
    ns: NetNS, fl: str, optimistic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = flavour.binary

    def broken_v6_restore(fla: str, family: int, tool: str) -> str:
        return "ip6tables-headrace-missing" if (family, tool) == (6, "restore") else real(fla, family, tool)  # type: ignore[arg-type]

    monkeypatch.setattr(iptables_run, "binary", broken_v6_restore)
    with pytest.raises(iptables_run.IptablesError):
        netns_tables.apply_sidecar(ns.path, SPEC_TPROXY, (4, 6), fl, optimistic=optimistic)  # type: ignore[arg-type]
    assert ours(ns, fl) == ([], [])


@pytest.mark.parametrize("fl", FLAVOURS)
def test_routing_failure_rolls_rules_and_the_other_family_back(
    ns: NetNS, fl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_argv = iptables_run.netns_argv

    def failing_ip6(netns_path: str | None, argv: list[str]) -> list[str]:
        return real_argv(netns_path, ["false", *argv[1:]] if argv[:2] == ["ip", "-6"] else argv)

    monkeypatch.setattr(side_jobs, "netns_argv", failing_ip6)
    with pytest.raises(iptables_run.IptablesError) as err:
        netns_tables.apply_sidecar(ns.path, SPEC_TPROXY, (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
    assert err.value.step == "tproxy-routes-v6"
    assert ours(ns, fl) == ([], [])  # the IPv4 rule/route that went in were deleted again


@pytest.mark.parametrize("fl", FLAVOURS)
def test_rollback_keeps_routing_that_was_there_and_mode_switches(
    ns: NetNS, fl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    netns_tables.apply_sidecar(ns.path, SPEC_TPROXY, (4, 6), fl, optimistic=True)  # type: ignore[arg-type]
    before = ours(ns, fl)
    assert len(before[1]) == 4  # a rule and a route per family
    real = flavour.binary

    def broken_v6_restore(fla: str, family: int, tool: str) -> str:
        return "ip6tables-headrace-missing" if (family, tool) == (6, "restore") else real(fla, family, tool)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(iptables_run, "binary", broken_v6_restore)
        other = SidecarSpec(interception_mode="TPROXY", include_inbound_ports=(80,))
        with pytest.raises(iptables_run.IptablesError):
            netns_tables.apply_sidecar(ns.path, other, (4, 6), fl)  # type: ignore[arg-type]
    assert ours(ns, fl) == before  # rules rolled back, the routing (already there) kept
    assert netns_tables.check_sidecar(ns.path, SPEC_TPROXY, (4, 6), fl) == []  # type: ignore[arg-type]
    # TPROXY → REDIRECT: the mangle chains and the policy routing go
    netns_tables.apply_sidecar(ns.path, SidecarSpec(), (4, 6), fl)  # type: ignore[arg-type]
    lines, routing = ours(ns, fl)
    assert routing == [] and not [line for line in lines if "HEADRACE_SC_DIVERT" in line]
    assert netns_tables.check_sidecar(ns.path, SidecarSpec(), (4, 6), fl) == []  # type: ignore[arg-type]
    # REDIRECT → TPROXY on a v4-only pod: only IPv4 routing
    netns_tables.apply_sidecar(ns.path, SPEC_TPROXY, (4,), fl)  # type: ignore[arg-type]
    assert [r[0] for r in ours(ns, fl)[1]] == ["32765:", "local"]
    assert netns_tables.check_sidecar(ns.path, SPEC_TPROXY, (4,), fl) == []  # type: ignore[arg-type]
    netns_tables.remove_all(ns.path, fl)  # type: ignore[arg-type]
    assert ours(ns, fl) == ([], [])


@pytest.mark.parametrize("fl", FLAVOURS)
def test_agent_iptables_backend_tproxy(ns: NetNS, fl: str) -> None:
    """The agent's path (IptablesBackend wraps the same cni/iptables): apply, check, drift in the policy
    routing is reported, re-apply repairs, remove leaves nothing. in_process_check off: the authoritative
    (iptables-save + ip) check, whatever the legacy fingerprint shortcut does."""
    backend = IptablesBackend(fl, in_process_check=False)
    target = PodTarget(uid="u1", namespace="shop", name="web", netns_path=ns.path, ips=("10.9.0.2/24", "fd09::2/64"))
    backend.apply(target, SPEC_TPROXY)
    assert backend.check(target, SPEC_TPROXY) == []
    ns.run(["ip", "-4", "route", "del", "local", "default", "dev", "lo", "table", "133"])
    assert backend.check(target, SPEC_TPROXY) == [
        "IPv4 policy routing: route 'local default dev lo' in table 133 is missing"
    ]
    backend.apply(target, SPEC_TPROXY)
    assert backend.check(target, SPEC_TPROXY) == []
    backend.remove(target)
    assert ours(ns, fl) == ([], [])
