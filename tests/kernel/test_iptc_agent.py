"""The agent process on a legacy-iptables node: drift checks decided in-process, tampering still repaired.

A pod (a process in its own netns, kubelet-style cgroup) is wired by a veth to a server netns. With the
agent running `--iptables legacy`, the pod's connection to the server goes through the reference proxy
(outbound 15001). Idle drift checks are counted as in-process (python-iptables, nothing spawned). Then a
foreign rule is inserted at the top of our OUTPUT chain that lets TCP bypass the proxy: the fingerprint
no longer matches, the iptables-save compare finds it, the agent repairs it, and the pod's traffic goes
through the proxy again. With HEADRACE_IPTC_CHECK=0 no check is in-process.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni.kernel.netns import entered
from cni.rules.node_probe import NODE_CHAIN
from tests.harness.netns import NetNS
from tests.kernel.agent_kit import (
    AgentRun,
    PodProcs,
    headrace_rules,
    ns_object,
    pod_object,
    run,
    wait_for,
    write_object,
)

pytestmark = pytest.mark.kernel

POD_IP, SERVER_IP, PORT = "10.77.0.2", "10.77.0.9", 8080
ENV = ("HEADRACE_IPTC_CHECK", "HEADRACE_XT_CHANGE_COUNT")  # the in-process check; the x_tables change count


class LegacyWorld:
    def __init__(self, tmp: Path, iptc: str, count: str = "0") -> None:
        self.node = NetNS.create("hra-node-")
        self.pods = PodProcs()
        self.server = NetNS.create("hr-iptc-srv-")
        self.objects = tmp / "objects"
        self.objects.mkdir()
        self.agent = AgentRun(self.node.path, self.objects, extra=["--iptables", "legacy"])
        self.uid = str(uuid.uuid4())
        self.proc = self.pods.pod(self.uid)
        self.netns = f"/proc/{self.proc.pid}/ns/net"
        pod = ["nsenter", f"--net={self.netns}"]
        veth = f"hrp{os.urandom(3).hex()}"
        run([*pod, "ip", "link", "set", "lo", "up"])
        run([*pod, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth9"])
        run([*pod, "ip", "link", "set", "eth9", "netns", self.server.name])
        run([*pod, "ip", "addr", "add", f"{POD_IP}/24", "dev", veth])
        run([*pod, "ip", "link", "set", veth, "up"])
        self.server.run(["ip", "addr", "add", f"{SERVER_IP}/24", "dev", "eth9"])
        self.server.run(["ip", "link", "set", "eth9", "up"])
        self.env = {name: os.environ.get(name) for name in ENV}
        os.environ.update(zip(ENV, (iptc, count), strict=True))  # the agent process inherits them
        write_object(self.objects, "ns.json", ns_object("app", ambient=True))
        write_object(self.objects, "pod.json", pod_object("app", "web", self.uid, [POD_IP]))
        self.stop = threading.Event()
        with entered(self.server.path):
            self.listener = socket.create_server((SERVER_IP, PORT))
        self.listener.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"hi")

    def request(self) -> bytes:
        with entered(self.netns):
            c = socket.create_connection((SERVER_IP, PORT), timeout=5)
        with c:
            return c.recv(16)

    def checks(self) -> dict[str, float]:
        _, text = self.agent.http("/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith('headrace_agent_iptables_checks_total{path="'):
                out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
        return out

    def via_proxy(self) -> int:
        return sum(1 for x in self.agent.proxy_lines()
                   if x.get("direction") == "outbound" and x.get("dst") == f"{SERVER_IP}:{PORT}")

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)
        for name, value in self.env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.agent.close()
        self.pods.close()
        self.server.delete()
        self.node.delete()


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LegacyWorld]:
    w = LegacyWorld(tmp_path, *getattr(request, "param", ("1",)))
    try:
        yield w
    finally:
        w.close()


def enrolled(w: LegacyWorld) -> bool:
    return w.agent.status().get(w.uid, {}).get("state") == "enrolled"


def started(w: LegacyWorld) -> list[str]:
    """Start the proxy and the agent; the pod's rules once it is enrolled."""
    w.agent.start_proxy()
    w.agent.start_agent()
    wait_for(lambda: enrolled(w), 20, "pod enrolled")
    return headrace_rules(w.netns)


def test_in_process_drift_checks_and_repair_of_a_bypass_rule(world: LegacyWorld) -> None:
    w = world
    rules = started(w)
    assert rules and all(line.startswith("legacy: ") for line in rules)
    assert w.request() == b"hi"
    wait_for(lambda: w.via_proxy() >= 1, 10, "connection through the proxy")
    # idle: checks decided in-process (the first ones are full compares while iptc loads and records)
    first = wait_for(lambda: (c := w.checks()).get("in_process", 0) >= 3 and c, 15, "in-process checks")
    # a foreign rule at the top of our OUTPUT chain: TCP would bypass the proxy (the repair may come before a
    # read here could see the rule: the repair count tells)
    run(["nsenter", f"--net={w.netns}", "iptables-legacy", "-t", "nat", "-I", "HEADRACE_AM_OUTPUT", "1",
         "-p", "tcp", "-j", "ACCEPT"])
    wait_for(lambda: w.agent.metric("headrace_agent_drift_repairs_total") >= 1, 10, "drift repaired and counted")
    wait_for(lambda: headrace_rules(w.netns) == rules, 10, "bypass rule removed by the drift repair")
    later = w.checks()
    assert later["iptables_save"] > first["iptables_save"]  # the changed fingerprint sent it to the compare
    n = w.via_proxy()
    assert w.request() == b"hi"
    wait_for(lambda: w.via_proxy() > n, 10, "traffic through the proxy again")
    # and back to in-process checks
    wait_for(lambda: w.checks().get("in_process", 0) > later["in_process"] + 2, 15, "in-process again")


@pytest.mark.parametrize("world", [("0",)], indirect=True)
def test_switched_off_every_check_runs_iptables_save(world: LegacyWorld) -> None:
    w = world
    started(w)
    wait_for(lambda: w.checks().get("iptables_save", 0) >= 4, 15, "checks")
    assert w.checks().get("in_process", 0) == 0
    assert w.request() == b"hi"
    wait_for(lambda: w.via_proxy() >= 1, 10, "connection through the proxy")


def checks_still(w: LegacyWorld, seconds: float) -> bool:
    """No drift check of the pod (in-process or iptables-save) over `seconds`: its polls are skipped."""
    before = w.checks()
    time.sleep(seconds)
    return w.checks() == before


@pytest.mark.parametrize("world", [("1", "1")], indirect=True)
def test_with_the_change_count_an_idle_pod_is_not_read_and_a_flush_by_io_uring_is_repaired(world: LegacyWorld) -> None:
    w = world
    rules = started(w)
    wait_for(lambda: checks_still(w, 3.0), 30, "the pod's polls skipped (the count started, nothing changed)")
    # the nat table flushed by an io_uring socket command from another process: no setsockopt(2) at all
    # (the repair can come before a read of the rules here could see them gone: the repair count tells)
    repairs = w.agent.metric("headrace_agent_drift_repairs_total")
    flush = run([sys.executable, "-m", "tests.kernel.uring_flush", w.netns, "nat"])
    assert flush.stdout.strip() == "0"
    wait_for(lambda: w.agent.metric("headrace_agent_drift_repairs_total") > repairs, 10, "the flush repaired")
    wait_for(lambda: headrace_rules(w.netns) == rules, 10, "the flushed rules back")
    n = w.via_proxy()
    assert w.request() == b"hi"
    wait_for(lambda: w.via_proxy() > n, 10, "traffic through the proxy again")
    # a rule inserted by iptables-legacy (setsockopt), once the polls are skipped again
    wait_for(lambda: checks_still(w, 3.0), 30, "the pod's polls skipped again")
    repairs = w.agent.metric("headrace_agent_drift_repairs_total")
    run(["nsenter", f"--net={w.netns}", "iptables-legacy", "-t", "nat", "-I", "HEADRACE_AM_OUTPUT", "1",
         "-p", "tcp", "-j", "ACCEPT"])
    wait_for(lambda: w.agent.metric("headrace_agent_drift_repairs_total") > repairs, 10, "the insert repaired")
    wait_for(lambda: headrace_rules(w.netns) == rules, 10, "the bypass rule removed")
    # the node's probe SNAT (checked at most every 10 s on legacy hosts, and not while the count stands;
    # the rewrite can come before a read of the rules here could see them gone: the agent's log line tells)
    node = headrace_rules(w.node.path)
    assert node
    written = w.agent.agent_log().count("node probe SNAT written")
    run(["nsenter", f"--net={w.node.path}", "iptables-legacy", "-t", "nat", "-F", NODE_CHAIN])
    wait_for(lambda: w.agent.agent_log().count("node probe SNAT written") > written, 25,
             "the node's probe SNAT repaired")
    assert headrace_rules(w.node.path) == node
