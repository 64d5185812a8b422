"""The bypass classes of the nftables and eBPF backends, applied to a live ambient pod (agent + reference
proxy) and a live sidecar pod (redirected by the plugin, watched by the agent) on a simulated node: real
TCP from inside the pod's cgroup shows the fault and then, within 2 s, the traffic back through the proxy
(drift check at its default 1 s interval), with our state exactly as before and the repair counted in
headrace_agent_drift_repairs_total. The iptables backend's classes: test_bypass_classes.py.

nftables: a foreign base chain ahead of ours (a `notrack` at raw priority in another inet table; an ip
nat chain at an earlier priority that binds a DNAT first; an iptables-nft raw NOTRACK rule: iptables-nft's
tables are foreign to this backend), our chain altered (a `return` on top) or emptied, our table flushed
or deleted, a changed policy on one of our base chains. eBPF: a program detached from the pod cgroup, a
foreign program attached to the pod cgroup beside ours at the same hook (it runs after ours and can
rewrite the destination back); on the sidecar pod's inbound (TC) a foreign filter ahead of ours on the
pod interface's ingress: a u32 match-all without action (TC_ACT_OK) at a lower pref, a direct-action program returning
TC_ACT_OK at a lower pref or at ours under another handle, and a tcx program (runs before every clsact
filter) — each one lets inbound connections reach the app past the proxy (mode `sidecar-in`); the same
program on egress, ahead of our reverse port rewrite (the replies leave from the proxy's port: the peer
resets the connection). Not a repair but a report: a connect4 program on the pods' parent cgroup, which
the running agent reports within 2 s and leaves attached (not ours).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_agent.lab.simnode import Pod, SimNode
from node_agent.lab.traffic import Listener, tcp_request

from tests.faults.fault_report import record
from tests.kernel.agent_kit import node_agent, run, wait_for
from tests.kernel.test_backend_parity import PORT, ParityRun, _ebpf_problems, bpftool_cgroup, ours, start_app

pytestmark = [pytest.mark.faults, pytest.mark.kernel]

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
SIDECAR = {"sidecar.istio.io/status": "{}"}
REPAIR_LIMIT = 2.0


class World:
    def __init__(self, backend: str, node: SimNode, agent: ParityRun, apps: list[subprocess.Popen[bytes]]) -> None:
        self.backend, self.node, self.agent, self.apps = backend, node, agent, apps
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
        self.pods["sidecar-in"] = self.pods["sidecar"]  # the same pod, its inbound (TC on eBPF)
        start_app(self.pods["sidecar"].netns.path, "scapp", apps)  # reached directly when inbound is bypassed

    def proxied(self, mode: str, payload: bytes) -> bool:
        """One real connection from the pod (inside its cgroup) to the server: did it go through the proxy?"""
        pod = self.pods[mode]
        if mode == "sidecar-in":
            try:
                # a short timeout: a broken inbound (replies from the wrong port) hangs rather than fails
                reply = tcp_request(self.server.netns.path, pod.ipv4, PORT, payload, timeout=0.4)
                return reply == b"inbound|" + payload
            except OSError:
                return False
        if mode == "sidecar":
            try:
                reply = tcp_request(pod.netns.path, self.server.ipv4, PORT, payload, timeout=0.7, cgroup=pod.cgroup)
                return reply == b"outbound|" + payload
            except OSError:
                return False
        seen = self._outbound_lines()
        try:
            reply = tcp_request(pod.netns.path, self.server.ipv4, PORT, payload, timeout=0.7, cgroup=pod.cgroup)
            if reply != b"server|" + payload:
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
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    backend = str(request.param)
    if backend == "ebpf" and _ebpf_problems():
        pytest.skip(f"eBPF cannot run here: {'; '.join(_ebpf_problems())}")
    root = Path(tmp_path_factory.mktemp(f"bypass-{backend}")) / "node"
    node = SimNode.create(root, headrace={"backend": backend}, pod_cgroups=True)
    try:
        with node_agent(node, ParityRun) as (agent, apps):
            agent.proxy_cgroup = node.proxy_cgroup()
            agent.use_backend(backend)
            agent.extra += ["--drift-interval", "1"]  # the agent's default interval
            w = World(backend, node, agent, apps)
            sc = w.pods["sidecar"]
            with Listener(sc.netns.path, 15001, label="outbound"), \
                    Listener(sc.netns.path, 15006, cgroup=sc.cgroup, label="inbound"):  # the sidecar's Envoy
                wait_for(lambda: w.agent.pod_state(w.pods["ambient"].uid) == "enrolled", 30, "ambient enrolled")
                wait_for(lambda: (w.agent.status().get(w.pods["sidecar"].uid) or {}).get("state") == "enrolled",
                         30, "plugin sidecar pod taken over by the agent")
                yield w
    finally:
        node.close()


def _eventually(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def nft(*commands: str) -> list[list[str]]:
    return [["nft", c] for c in commands]


def detach_connect4(w: World, mode: str) -> list[list[str]]:
    cg = w.pods[mode].pod_cgroup
    assert cg is not None
    prog = next(p for p in bpftool_cgroup(cg) if p["name"] == "hr_connect4")
    return [["bpftool", "cgroup", "detach", cg, prog["attach_type"], "id", str(prog["id"])]]


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def _u32_imm(raw: bytes) -> int:
    return int(struct.unpack("<i", raw)[0])  # the little-endian word of network-order bytes, as a signed imm


def foreign_connect4(w: World, mode: str) -> list[list[str]]:
    """Attach a foreign cgroup/connect4 program to the pod cgroup (after ours, so it runs after ours) that
    writes the server's address back into every connect: the connection goes straight to the server."""
    from node_agent.backends.ebpf import bpfsys

    cg = w.pods[mode].pod_cgroup
    assert cg is not None
    ip = _u32_imm(socket.inet_aton(w.server.ipv4))
    port = _u32_imm(struct.pack(">H", PORT) + b"\0\0")
    insns = b"".join([
        _insn(0xB7, dst=2, imm=ip),  # r2 = server address
        _insn(0x63, dst=1, src=2, off=4),  # ctx->user_ip4 = r2
        _insn(0xB7, dst=2, imm=port),  # r2 = port (network order)
        _insn(0x63, dst=1, src=2, off=24),  # ctx->user_port = r2
        _insn(0xB7, dst=0, imm=1),  # r0 = 1: allow
        _insn(0x95),  # exit
    ])
    prog = bpfsys.prog_load(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, insns, "hrfault_conn4",
                            bpfsys.ATTACH_CGROUP_INET4_CONNECT)
    cgfd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(prog, cgfd, bpfsys.ATTACH_CGROUP_INET4_CONNECT, bpfsys.F_ALLOW_MULTI)
    finally:
        os.close(cgfd)
        os.close(prog)
    return []


Tamper = Callable[[World, str], list[list[str]]]


def pod_ifaces(w: World, mode: str) -> list[tuple[int, str]]:
    links = json.loads(run(["nsenter", f"--net={w.pods[mode].netns.path}", "ip", "-j", "link", "show"]).stdout)
    return [(int(link["ifindex"]), str(link["ifname"])) for link in links if link["ifname"] != "lo"]


def tc_ok_program() -> int:
    """A direct-action TC program that returns TC_ACT_OK (0, also tcx's TCX_PASS) for every packet."""
    from node_agent.backends.ebpf import bpfsys

    return bpfsys.prog_load(bpfsys.PROG_TYPE_SCHED_CLS, _insn(0xB7, dst=0, imm=0) + _insn(0x95), "hrfault_tcok", 0)


def foreign_tc_program(prio: int, handle: int, egress: bool = False) -> Tamper:
    """A foreign direct-action filter (TC_ACT_OK) on the pod interfaces' ingress (or egress) at prio/handle."""

    def tamper(w: World, mode: str) -> list[list[str]]:
        from node_agent.backends.ebpf import tc

        from cni.kernel.netns import run_in_thread

        prog = tc_ok_program()

        def work() -> None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for index, _name in pod_ifaces(w, mode):
                    ipr.tc("add-filter", "bpf", index, handle, fd=prog, name="hrfault_tcok",
                           parent=tc.EGRESS_PARENT if egress else tc.INGRESS_PARENT, classid=1, direct_action=True,
                           prio=prio)

        try:
            run_in_thread(w.pods[mode].netns.path, work, name="fault-tc")
        finally:
            os.close(prog)
        return []

    return tamper


def foreign_tcx(w: World, mode: str) -> list[list[str]]:
    """A tcx ingress program that passes every packet: it runs before every clsact filter."""
    from node_agent.backends.ebpf import bpfsys

    from cni.kernel.netns import run_in_thread

    prog = tc_ok_program()
    ifaces = pod_ifaces(w, mode)

    def work() -> None:
        for index, _name in ifaces:
            bpfsys.prog_attach(prog, index, bpfsys.ATTACH_TCX_INGRESS, 0)

    try:
        run_in_thread(w.pods[mode].netns.path, work, name="fault-tcx")
    finally:
        os.close(prog)
    return []


def tc_del_pref(prio: int) -> Tamper:
    return lambda w, m: [["tc", "filter", "del", "dev", name, "ingress", "pref", str(prio)]
                         for _i, name in pod_ifaces(w, m)]

# backend → class → (modes, tamper (argv lists run in the pod netns), cleanup of what is not ours)
CLASSES: dict[str, dict[str, tuple[tuple[str, ...], Tamper, Tamper]]] = {
    "nftables": {
        "foreign notrack at raw priority": (
            ("ambient", "sidecar"),
            lambda w, m: nft("add table inet hrfault",
                             "add chain inet hrfault out { type filter hook output priority -300; }",
                             f"add rule inet hrfault out tcp dport {PORT} notrack"),
            lambda w, m: nft("delete table inet hrfault"),
        ),
        "foreign nat chain binds first": (
            ("ambient", "sidecar"),
            lambda w, m: nft("add table ip hrfault",
                             "add chain ip hrfault out { type nat hook output priority -110; }",
                             f"add rule ip hrfault out tcp dport {PORT} dnat to {w.server.ipv4}:{PORT}"),
            lambda w, m: nft("delete table ip hrfault"),
        ),
        "iptables-nft raw NOTRACK": (
            ("ambient", "sidecar"),
            lambda w, m: [["iptables-nft", "-t", "raw", "-I", "OUTPUT", "-p", "tcp", "-j", "NOTRACK"]],
            lambda w, m: [["iptables-nft", "-t", "raw", "-F"]],
        ),
        "our chain altered": (
            ("ambient", "sidecar"),
            lambda w, m: nft("insert rule inet headrace nat_output meta l4proto tcp return"),
            lambda w, m: [],
        ),
        "our chain emptied": (
            ("ambient", "sidecar"),
            lambda w, m: nft("flush chain inet headrace nat_output"),
            lambda w, m: [],
        ),
        "our table flushed": (
            ("ambient", "sidecar"),
            lambda w, m: nft("flush table inet headrace"),
            lambda w, m: [],
        ),
        "our table deleted": (
            ("ambient", "sidecar"),
            lambda w, m: nft("delete table inet headrace"),
            lambda w, m: [],
        ),
        "policy changed": (
            ("ambient",),  # sidecar REDIRECT pods have nat chains only
            lambda w, m: nft("chain inet headrace mangle_output { policy drop; }"),
            lambda w, m: [],
        ),
    },
    "ebpf": {
        "program detached": (
            ("ambient", "sidecar"),
            detach_connect4,
            lambda w, m: [],
        ),
        "foreign program after ours": (
            ("ambient", "sidecar"),
            foreign_connect4,
            lambda w, m: [],
        ),
        "foreign tc u32 match-all at a lower pref": (  # no action: its verdict is TC_ACT_OK
            ("sidecar-in",),
            lambda w, m: [["tc", "filter", "add", "dev", name, "ingress", "pref", "1", "protocol", "all", "u32",
                           "match", "u32", "0", "0", "classid", "1:1"] for _i, name in pod_ifaces(w, m)],
            tc_del_pref(1),
        ),
        "foreign tc program returning OK at a lower pref": (
            ("sidecar-in",),
            foreign_tc_program(1, 1),
            tc_del_pref(1),
        ),
        "foreign tc program at our pref, other handle": (
            ("sidecar-in",),
            foreign_tc_program(0x4852, 2),
            lambda w, m: [],
        ),
        "foreign tc program returning OK on egress": (  # replies leave with the proxy's port: reset
            ("sidecar-in",),
            foreign_tc_program(1, 1, egress=True),
            lambda w, m: [["tc", "filter", "del", "dev", name, "egress", "pref", "1"] for _i, name in pod_ifaces(w, m)],
        ),
        "foreign tcx program": (
            ("sidecar-in",),
            foreign_tcx,
            lambda w, m: [],
        ),
    },
}
CASES = [(backend, name, mode) for backend, classes in CLASSES.items()
         for name, (modes, _t, _c) in classes.items() for mode in modes]


@pytest.mark.parametrize(("world", "fault", "mode"), CASES, indirect=["world"],
                         ids=[f"{b}-{m}-{n.replace(' ', '-')}" for b, n, m in CASES])
def test_bypass_is_repaired_within_2s(world: World, fault: str, mode: str) -> None:
    w, backend = world, world.backend
    pod = w.pods[mode]
    _modes, tamper, cleanup = CLASSES[backend][fault]
    assert wait_for(lambda: w.proxied(mode, b"before"), 10, "traffic through the proxy before the fault")
    state = ours(pod, backend)
    repairs = w.agent.metric("headrace_agent_drift_repairs_total")
    logged = w.agent.agent_log().count("ebpf-foreign-tc")
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
        same = _eventually(lambda: ours(pod, backend) == state, 3.0)
        counted = w.agent.metric("headrace_agent_drift_repairs_total") > repairs
        violations += (not same) + (not counted)
        record(f"bypass: {fault} ({mode}, {backend})", 1, violations,
               f"back through the proxy after {back if back is None else round(back, 2)} s; bypass seen: {bypassed}")
        assert back is not None, f"{fault}: traffic never came back through the proxy"
        assert back <= REPAIR_LIMIT, f"{fault}: back through the proxy only after {back:.2f} s"
        assert same, f"{fault}: our state differs after the repair: {ours(pod, backend)} != {state}"
        assert counted, f"{fault}: the repair was not counted"
        if mode == "sidecar-in":  # what was removed is logged
            assert w.agent.agent_log().count("ebpf-foreign-tc") > logged, "the removal was not logged"
    finally:
        for argv in cleanup(w, mode):
            run(["nsenter", f"--net={pod.netns.path}", *argv], check=False)


@pytest.mark.parametrize("world", ["ebpf"], indirect=True)
def test_parent_cgroup_program_is_reported_not_removed(world: World) -> None:
    """A connect4 program on the pods' parent cgroup (`kubepods`), attached with BPF_F_ALLOW_MULTI, runs
    after ours for every pod below and sends connections straight to the server. Not ours to remove: the
    running agent reports it within 2 s (metrics, `status` reason, log) and leaves it attached; once its
    owner detaches it, the report clears and traffic goes through the proxy again."""
    from node_agent.backends.ebpf import bpfsys

    w = world
    assert wait_for(lambda: w.proxied("sidecar", b"before"), 10, "traffic through the proxy before")
    pod_cg = w.pods["sidecar"].pod_cgroup
    assert pod_cg is not None
    parent = Path(pod_cg).parent
    ip = _u32_imm(socket.inet_aton(w.server.ipv4))
    port = _u32_imm(struct.pack(">H", PORT) + b"\0\0")
    insns = b"".join([_insn(0xB7, dst=2, imm=ip), _insn(0x63, dst=1, src=2, off=4), _insn(0xB7, dst=2, imm=port),
                      _insn(0x63, dst=1, src=2, off=24), _insn(0xB7, dst=0, imm=1), _insn(0x95)])
    prog = bpfsys.prog_load(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR, insns, "hrfault_parent4",
                            bpfsys.ATTACH_CGROUP_INET4_CONNECT)
    cgfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    repairs = w.agent.metric("headrace_agent_drift_repairs_total")
    attached = False
    try:
        bpfsys.prog_attach(prog, cgfd, bpfsys.ATTACH_CGROUP_INET4_CONNECT, bpfsys.F_ALLOW_MULTI)
        attached = True
        t0 = time.monotonic()
        assert not w.proxied("sidecar", b"bypassed")  # straight to the server
        reported = _eventually(lambda: w.agent.metric("headrace_agent_ebpf_parent_program_pods") >= 2, 5.0)
        took = time.monotonic() - t0
        row = w.agent.status()[w.pods["sidecar"].uid]
        still = bpfsys.prog_info(prog).prog_id in bpfsys.prog_query(cgfd, bpfsys.ATTACH_CGROUP_INET4_CONNECT)
        violations = (not reported) + (took > REPAIR_LIMIT) + (not still)
        record("parent-cgroup connect4 program reported, not removed (ebpf)", 1, violations,
               f"reported after {round(took, 2)} s")
        assert reported and took <= REPAIR_LIMIT, f"reported after {took:.2f} s"
        assert f"on parent cgroup {parent} at cgroup/connect4" in row["reason"], row
        assert row["state"] == "enrolled" and row["alerts"]
        assert still, "the agent removed a program of the node's parent cgroup"
        assert w.agent.metric("headrace_agent_ebpf_parent_program_alerts_total") >= 2
        assert w.agent.metric("headrace_agent_drift_repairs_total") == repairs  # nothing of ours to repair
        assert "ebpf-parent-cgroup" in w.agent.agent_log()
        bpfsys.prog_detach(prog, cgfd, bpfsys.ATTACH_CGROUP_INET4_CONNECT)
        attached = False
        assert _eventually(lambda: w.agent.metric("headrace_agent_ebpf_parent_program_pods") == 0, 5.0)
        assert "alerts" not in w.agent.status()[w.pods["sidecar"].uid]
        assert wait_for(lambda: w.proxied("sidecar", b"after"), 5, "traffic through the proxy again")
    finally:
        if attached:
            bpfsys.prog_detach(prog, cgfd, bpfsys.ATTACH_CGROUP_INET4_CONNECT)
        os.close(cgfd)
        os.close(prog)
