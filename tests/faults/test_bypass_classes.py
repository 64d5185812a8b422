"""Every way of making a redirected pod's traffic skip the redirect, applied to a live ambient pod (agent +
reference proxy) and a live sidecar pod (redirected by the plugin, watched by the agent) on a simulated
node with the iptables backend: real TCP shows the bypass and then, within 2 s, the traffic back through
the proxy (the agent's drift check at its default 1 s interval), with our rules exactly as before (no
duplicates) and the repair counted in headrace_agent_drift_repairs_total.

Classes: a rule ahead of our jump, a foreign chain jumped to ahead of ours, our chain altered (a RETURN on
top), our chain emptied, the nat table flushed, a changed policy (mangle OUTPUT DROP: ambient pods hook
mangle), a foreign nftables table with a base chain at an earlier hook priority (notrack at raw priority:
the connection never meets a nat chain). eBPF pods do not go through these hooks (their redirect happens
at connect()): the eBPF backend's own drift classes (detached programs, deleted filters) are that
backend's tests.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.simnode import Pod, SimNode
from node_agent.lab.traffic import Listener, tcp_request

from tests.faults.fault_report import record
from tests.kernel.agent_kit import headrace_rules, node_agent, run, wait_for
from tests.kernel.test_backend_parity import PORT, ParityRun, start_app

pytestmark = [pytest.mark.faults, pytest.mark.kernel]

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
SIDECAR = {"sidecar.istio.io/status": "{}"}
OUT_CHAIN = {"ambient": "HEADRACE_AM_OUTPUT", "sidecar": "HEADRACE_SC_OUTPUT"}
REPAIR_LIMIT = 2.0


class World:
    def __init__(self, node: SimNode, agent: ParityRun, apps: list[subprocess.Popen[bytes]]) -> None:
        self.node, self.agent, self.apps = node, agent, apps
        node.add_namespace("mesh", AMBIENT)
        node.add_namespace("plain")
        self.server = node.add_pod("plain", "server")
        start_app(self.server.netns.path, "server", apps)
        agent.start_proxy()
        agent.start_agent()
        self.pods: dict[str, Pod] = {
            "ambient": node.add_pod("mesh", "amb"),
            "sidecar": node.add_pod("plain", "sc", annotations=SIDECAR),
        }
        self.flavour = "nft" if headrace_rules(self.pods["ambient"].netns.path)[0].startswith("nft") else "legacy"

    def tool(self) -> str:
        return f"iptables-{self.flavour}"

    def proxied(self, mode: str, payload: bytes) -> bool:
        """One real connection from the pod to the server: did it go through the proxy?"""
        pod = self.pods[mode]
        if mode == "sidecar":
            try:
                reply = tcp_request(pod.netns.path, self.server.ipv4, PORT, payload, timeout=0.7)
                return reply == b"outbound|" + payload
            except OSError:
                return False
        seen = self._outbound_lines()
        try:
            if tcp_request(pod.netns.path, self.server.ipv4, PORT, payload, timeout=0.7) != b"server|" + payload:
                return False
        except OSError:
            return False
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            if self._outbound_lines() > seen:
                return True
            time.sleep(0.03)
        return False

    def _outbound_lines(self) -> int:
        return sum(1 for x in self.agent.proxy_lines() if x.get("direction") == "outbound"
                   and x.get("workload") == "mesh/amb")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    node = SimNode.create(Path(tmp_path_factory.mktemp("bypass")) / "node", headrace={"backend": "iptables"})
    try:
        with node_agent(node, ParityRun) as (agent, apps):
            agent.proxy_cgroup = node.proxy_cgroup()
            agent.extra = ["--backend", "iptables", "--drift-interval", "1"]  # the agent's default interval
            w = World(node, agent, apps)
            with Listener(w.pods["sidecar"].netns.path, 15001, label="outbound"):  # the sidecar's Envoy
                wait_for(lambda: w.agent.pod_state(w.pods["ambient"].uid) == "enrolled", 30, "ambient enrolled")
                wait_for(lambda: (w.agent.status().get(w.pods["sidecar"].uid) or {}).get("state") == "enrolled",
                         30, "plugin sidecar pod taken over by the agent")
                yield w
    finally:
        node.close()


def ipt(w: World, mode: str, *args: str) -> list[list[str]]:
    return [[w.tool(), *args]]


def nft_notrack(w: World, mode: str) -> list[list[str]]:
    return [["nft", "add table inet hrfault"],
            ["nft", "add chain inet hrfault out { type filter hook output priority -300; }"],
            ["nft", f"add rule inet hrfault out tcp dport {PORT} notrack"]]


Tamper = Callable[[World, str], list[list[str]]]
CLASSES: dict[str, tuple[tuple[str, ...], Tamper, Tamper]] = {
    # class: (modes, tamper, cleanup of what is not ours)
    "rule ahead of our jump": (
        ("ambient", "sidecar"),
        lambda w, m: ipt(w, m, "-t", "nat", "-I", "OUTPUT", "-p", "tcp", "-j", "ACCEPT"),
        lambda w, m: ipt(w, m, "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "ACCEPT"),
    ),
    "foreign chain ahead of our jump": (
        ("ambient", "sidecar"),
        lambda w, m: [*ipt(w, m, "-t", "nat", "-N", "HRFAULT"),
                      *ipt(w, m, "-t", "nat", "-A", "HRFAULT", "-j", "ACCEPT"),
                      *ipt(w, m, "-t", "nat", "-I", "OUTPUT", "-j", "HRFAULT")],
        lambda w, m: [*ipt(w, m, "-t", "nat", "-D", "OUTPUT", "-j", "HRFAULT"),
                      *ipt(w, m, "-t", "nat", "-F", "HRFAULT"), *ipt(w, m, "-t", "nat", "-X", "HRFAULT")],
    ),
    "our chain altered": (
        ("ambient", "sidecar"),
        lambda w, m: ipt(w, m, "-t", "nat", "-I", OUT_CHAIN[m], "1", "-p", "tcp", "-j", "RETURN"),
        lambda w, m: [],
    ),
    "our chain emptied": (
        ("ambient", "sidecar"),
        lambda w, m: ipt(w, m, "-t", "nat", "-F", OUT_CHAIN[m]),
        lambda w, m: [],
    ),
    "nat table flushed": (
        ("ambient", "sidecar"),
        lambda w, m: ipt(w, m, "-t", "nat", "-F"),
        lambda w, m: [],
    ),
    "policy changed": (
        ("ambient",),  # sidecar pods hook nat only, whose chains refuse a DROP policy
        lambda w, m: ipt(w, m, "-t", "mangle", "-P", "OUTPUT", "DROP"),
        lambda w, m: ipt(w, m, "-t", "mangle", "-P", "OUTPUT", "ACCEPT"),
    ),
    "foreign nft table at an earlier priority": (
        ("ambient", "sidecar"),
        nft_notrack,
        lambda w, m: [["nft", "delete table inet hrfault"]],
    ),
}
CASES = [(name, mode) for name, (modes, _t, _c) in CLASSES.items() for mode in modes]


@pytest.mark.parametrize(("fault", "mode"), CASES, ids=[f"{m}-{n.replace(' ', '-')}" for n, m in CASES])
def test_bypass_is_repaired_within_2s(world: World, fault: str, mode: str) -> None:
    w = world
    pod = w.pods[mode]
    _modes, tamper, cleanup = CLASSES[fault]
    assert wait_for(lambda: w.proxied(mode, b"before"), 10, "traffic through the proxy before the fault")
    rules = headrace_rules(pod.netns.path)
    repairs = w.agent.metric("headrace_agent_drift_repairs_total")
    for argv in tamper(w, mode):
        run(["nsenter", f"--net={pod.netns.path}", *argv])
    t0 = time.monotonic()
    bypassed = not w.proxied(mode, b"tampered")  # right after the fault (the repair may already be done)
    back = None
    while time.monotonic() - t0 < REPAIR_LIMIT + 3:
        if w.proxied(mode, b"after"):
            back = time.monotonic() - t0
            break
        time.sleep(0.05)
    try:
        violations = 0 if back is not None and back <= REPAIR_LIMIT else 1
        same_rules = headrace_rules(pod.netns.path) == rules
        counted = w.agent.metric("headrace_agent_drift_repairs_total") > repairs
        violations += (not same_rules) + (not counted)
        record(f"bypass: {fault} ({mode}, iptables)", 1, violations,
               f"back through the proxy after {back if back is None else round(back, 2)} s; bypass seen: {bypassed}")
        assert back is not None, f"{fault}: traffic never came back through the proxy"
        assert back <= REPAIR_LIMIT, f"{fault}: back through the proxy only after {back:.2f} s"
        assert same_rules, f"{fault}: our rules differ after the repair"
        assert counted, f"{fault}: the repair was not counted"
    finally:
        for argv in cleanup(w, mode):
            run(["nsenter", f"--net={pod.netns.path}", *argv], check=False)


def test_status_row_of_the_watched_sidecar_pod(world: World) -> None:
    row: dict[str, Any] = world.agent.status()[world.pods["sidecar"].uid]
    assert (row["mode"], row["backend"], row["state"]) == ("sidecar", "iptables", "enrolled")
    assert "plugin" in row["reason"]
