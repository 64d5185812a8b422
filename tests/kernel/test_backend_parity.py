"""The same behaviour on every redirection backend, through the product path.

Every test runs once with `iptables`, once with `nftables` and once with `ebpf`: a simulated node whose pods
are made like a real runtime makes them (bridge + host-local + headrace-cni with `backend: <b>` in the
conflist, an infra process per pod in a kubelet-like cgroup v2 directory), the agent (`--backend <b>`) and
the reference proxy (in its own cgroup, `--proxy-cgroup`) as processes in the node netns. Clients and the
sidecar proxy's listeners run inside the pod's cgroup, as a pod's processes would.

- sidecar: outbound lands on 15001 with SO_ORIGINAL_DST (IPv4 and IPv6), inbound lands on 15006 with the
  original destination, uid 1337 bypasses, an excluded port bypasses; after CNI DEL nothing of ours is left
  (iptables-save / bpftool cgroup show / tc filter / pins);
- ambient: labelling a namespace with running pods sends their traffic through the reference proxy (JSON
  lines name the workloads and the original destination); agent SIGKILL + restart re-adopts without
  duplicates (same rules / same program ids) and traffic stays redirected; drift (flushed chains / a
  detached program) is repaired; unlabel → direct, nothing of ours left;
- a pod switched from one backend to the other (agent restarted with the other --backend) keeps working
  and keeps only the new backend's redirection.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.simnode import Pod, SimNode
from node_agent.lab.traffic import Listener, tcp_request

from tests.kernel.agent_kit import AgentRun, headrace_rules, node_agent, run, wait_for

pytestmark = pytest.mark.kernel

BACKENDS = ("iptables", "nftables", "ebpf")
# the backend a pod moves to when the agent restarts with another --backend (test_ambient_pod_switches_backend)
SWITCH_TO = {"iptables": "ebpf", "nftables": "iptables", "ebpf": "iptables"}
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
SIDECAR = {"sidecar.istio.io/status": "{}"}
PORT = 8080


def start_app(netns_path: str, label: str, apps: list[subprocess.Popen[bytes]]) -> None:
    """The lab's app server (IPv4 and IPv6 on PORT, replies `label|payload`) inside a pod's netns."""
    apps.append(
        subprocess.Popen(
            [
                "nsenter",
                f"--net={netns_path}",
                sys.executable,
                "-m",
                "node_agent.lab.appserver",
                "--port",
                str(PORT),
                "--label",
                label,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )


def _ebpf_problems() -> list[str]:
    from node_agent.backends.select import ebpf_problems

    return list(ebpf_problems())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "ebpf":
        problems = _ebpf_problems()
        if problems:
            pytest.skip(f"eBPF cannot run here: {'; '.join(problems)}")
    return name


class ParityRun(AgentRun):
    """AgentRun whose reference proxy joins the node's proxy cgroup (ambient eBPF answers there)."""

    proxy_cgroup: Path

    def start_proxy(self) -> None:
        self.proxy_runs += 1
        out = open(self.base / f"proxy{self.proxy_runs}.out", "wb")
        err = open(self.base / f"proxy{self.proxy_runs}.log", "wb")
        self.proxy = subprocess.Popen(
            self.proxy_argv("parity-proxy", "--cgroup", str(self.proxy_cgroup)),
            stdout=out,
            stderr=err,
        )
        out.close()
        err.close()

    def use_backend(self, name: str) -> None:
        self.extra = ["--backend", name, "--proxy-cgroup", str(self.proxy_cgroup)]


@pytest.fixture
def env(make_node: Any, backend: str) -> Iterator[tuple[SimNode, ParityRun, list[subprocess.Popen[bytes]]]]:
    yield from node_env(make_node, backend)


@pytest.fixture
def ebpf_env(make_node: Any) -> Iterator[tuple[SimNode, ParityRun, list[subprocess.Popen[bytes]]]]:
    problems = _ebpf_problems()
    if problems:
        pytest.skip(f"eBPF cannot run here: {'; '.join(problems)}")
    yield from node_env(make_node, "ebpf")


def node_env(make_node: Any, backend: str) -> Iterator[tuple[SimNode, ParityRun, list[subprocess.Popen[bytes]]]]:
    node: SimNode = make_node(headrace={"backend": backend}, pod_cgroups=True)
    with node_agent(node, ParityRun) as (agent, apps):
        agent.proxy_cgroup = node.proxy_cgroup()
        agent.use_backend(backend)
        yield node, agent, apps


# ---- what of ours is in a pod -----------------------------------------------------------------------------
def bpftool_cgroup(cgroup: str | None) -> list[dict[str, Any]]:
    if not cgroup or not Path(cgroup).is_dir():
        return []
    out = run(["bpftool", "-j", "cgroup", "show", cgroup], check=False).stdout.strip()
    return [p for p in (json.loads(out) if out else []) if str(p.get("name", "")).startswith("hr_")]


def tc_filters(netns_path: str) -> list[str]:
    """Our TC ingress filters (bpf programs named hr_*) on every interface of the pod."""
    links = json.loads(run(["nsenter", f"--net={netns_path}", "ip", "-j", "link", "show"]).stdout)
    found: list[str] = []
    for link in links:
        ifname = link["ifname"]
        if ifname == "lo":
            continue
        out = run(["nsenter", f"--net={netns_path}", "tc", "-j", "filter", "show", "dev", ifname, "ingress"],
                  check=False).stdout.strip()
        for f in json.loads(out) if out else []:
            name = str(f.get("options", {}).get("bpf_name", ""))
            if name.startswith("hr_"):
                found.append(f"{ifname}:{name}")
    return sorted(found)


def ebpf_state(pod: Pod) -> list[str]:
    """Our cgroup programs (attach type + name) and TC filters of a pod."""
    progs = [f"{p['attach_type']}:{p['name']}" for p in bpftool_cgroup(pod.pod_cgroup)]
    return sorted(progs) + tc_filters(pod.netns.path)


def ebpf_ids(pod: Pod) -> list[int]:
    return sorted(int(p["id"]) for p in bpftool_cgroup(pod.pod_cgroup))


def iptables_state(pod: Pod) -> list[str]:
    return headrace_rules(pod.netns.path, 4) + headrace_rules(pod.netns.path, 6)


def nftables_state(pod: Pod) -> list[str]:
    """The lines of our nftables table in the pod (none: no table)."""
    proc = run(["nsenter", f"--net={pod.netns.path}", "nft", "list", "table", "inet", "headrace"], check=False)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def node_table(node: SimNode) -> str:
    """The node netns' probe SNAT table of the nftables backend ("" when there is none)."""
    proc = run(["nsenter", f"--net={node.netns.path}", "nft", "list", "table", "inet", "headrace_node"], check=False)
    return proc.stdout if proc.returncode == 0 else ""


def inbound_only_rules(pod: Pod) -> bool:
    """Whether the pod's iptables rules are the eBPF backend's ambient inbound-only ones (every outbound
    address excluded: outbound is eBPF's), not the iptables backend's full ambient rules."""
    rules = iptables_state(pod)
    return any("HEADRACE_AM_PRERT" in r for r in rules) and any(
        "-d 0.0.0.0/1" in r and "skip excluded outbound range" in r for r in rules
    )


def ours(pod: Pod, backend: str) -> list[str]:
    if backend == "ebpf":  # an ambient pod's inbound is the rules backend's (original-source routing)
        inbound = iptables_state(pod) if inbound_only_rules(pod) else []
        return ebpf_state(pod) + [f"inbound {line}" for line in inbound]
    return nftables_state(pod) if backend == "nftables" else iptables_state(pod)


def anything_of_ours(node: SimNode, pod: Pod) -> list[str]:
    """Everything any backend could have left in or for a pod (bpftool + iptables + nftables + pins)."""
    left = ebpf_state(pod) + iptables_state(pod) + nftables_state(pod)
    pin_dir = node.state_dir / "bpf" / pod.uid
    if pin_dir.exists():
        left.append(f"pinned: {pin_dir}")
    return left


# ---- traffic helpers --------------------------------------------------------------------------------------
def request(src: Pod, host: str, payload: bytes, timeout: float = 6.0) -> bytes:
    """A request from inside the pod's cgroup, retried while the far side is not up yet."""
    end = time.monotonic() + timeout
    while True:
        try:
            reply = tcp_request(src.netns.path, host, PORT, payload, cgroup=src.cgroup)
            if reply or time.monotonic() > end:
                return reply
        except OSError:
            if time.monotonic() > end:
                raise
        time.sleep(0.1)


def proxied(agent: AgentRun, client: str, server: str, dst: str, after: int = 0) -> list[dict[str, Any]]:
    lines = agent.proxy_lines()[after:]
    out = [x for x in lines if x.get("direction") == "outbound" and x.get("workload") == client and x.get("dst") == dst]
    inn = [x for x in lines if x.get("direction") == "inbound" and x.get("workload") == server]
    return out + inn if out and inn else []


# ---- sidecar ----------------------------------------------------------------------------------------------
def test_sidecar_parity(env: Any, backend: str) -> None:
    node, agent, _apps = env
    agent.start_agent()  # the ebpf plugin hands sidecar pods to the agent; iptables applies them itself
    peer = node.add_pod("plain", "peer")
    pod = node.add_pod(
        "app", "web", annotations={**SIDECAR, "traffic.sidecar.istio.io/excludeOutboundPorts": "9090"}
    )
    installed = ours(pod, backend)
    assert installed, f"no {backend} redirection in the pod"
    assert all(not ours(pod, b) for b in BACKENDS if b != backend)
    if backend == "ebpf":
        row = agent.status()[pod.uid]
        assert (row["mode"], row["backend"], row["state"]) == ("sidecar", "ebpf", "enrolled")

    with (
        Listener(pod.netns.path, 15001, cgroup=pod.cgroup, label="outbound") as out4,
        Listener(pod.netns.path, 15001, family=6, cgroup=pod.cgroup, label="outbound6") as out6,
        Listener(peer.netns.path, PORT, label="peer"),
        Listener(peer.netns.path, PORT, family=6, label="peer6"),
        Listener(peer.netns.path, 9090, label="peer9090"),
    ):
        # outbound → 15001, the original destination readable with SO_ORIGINAL_DST
        assert tcp_request(pod.netns.path, peer.ipv4, PORT, b"out", cgroup=pod.cgroup) == b"outbound|out"
        conn = out4.wait_one()
        assert conn.original_dst == (peer.ipv4, PORT)
        assert tcp_request(pod.netns.path, peer.ipv6, PORT, b"out6", cgroup=pod.cgroup) == b"outbound6|out6"
        assert out6.wait_one().original_dst == (peer.ipv6, PORT)
        # the proxy's uid bypasses
        reply = tcp_request(pod.netns.path, peer.ipv4, PORT, b"proxy", uid=1337, gid=1337, cgroup=pod.cgroup)
        assert reply == b"peer|proxy"
        # an excluded outbound port bypasses
        assert tcp_request(pod.netns.path, peer.ipv4, 9090, b"excl", cgroup=pod.cgroup) == b"peer9090|excl"
        assert out4.count() == 0

    # inbound → 15006 with the original destination
    with Listener(pod.netns.path, 15006, cgroup=pod.cgroup, label="inbound") as inbound:
        assert tcp_request(peer.netns.path, pod.ipv4, PORT, b"in", cgroup=peer.cgroup) == b"inbound|in"
        assert inbound.wait_one().original_dst == (pod.ipv4, PORT)

    # CNI DEL: nothing of ours remains (checked before the harness removes the netns and cgroup)
    node.runner().delete(pod.container_id, pod.netns.path, args=pod.cni_args)
    wait_for(lambda: not anything_of_ours(node, pod), 10, "nothing of ours after DEL")
    node.remove_pod(pod)

    # a sidecar pod redirected before an agent restart: still redirected after it, and its DEL (handled
    # by the new agent, which never saw its ADD) leaves no program on the cgroup and no pins
    pod2 = node.add_pod("app", "web2", annotations=SIDECAR)
    agent.kill_agent(signal.SIGKILL)
    agent.start_agent()
    with Listener(pod2.netns.path, 15001, cgroup=pod2.cgroup, label="outbound2") as out2:
        assert tcp_request(pod2.netns.path, peer.ipv4, PORT, b"o2", cgroup=pod2.cgroup) == b"outbound2|o2"
        assert out2.wait_one().original_dst == (peer.ipv4, PORT)
    node.runner().delete(pod2.container_id, pod2.netns.path, args=pod2.cni_args)
    wait_for(
        lambda: not bpftool_cgroup(pod2.pod_cgroup) and not iptables_state(pod2) and not nftables_state(pod2)
        and not (node.state_dir / "bpf" / pod2.uid).exists(),
        10,
        "nothing of ours after DEL by a restarted agent",
    )


# ---- ambient ----------------------------------------------------------------------------------------------
def test_ambient_parity(env: Any, backend: str) -> None:
    node, agent, apps = env
    node.add_namespace("shop")
    client = node.add_pod("shop", "client")
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)
    agent.start_proxy()
    agent.start_agent()
    uids = (client.uid, server.uid)
    dst = f"{server.ipv4}:{PORT}"

    # before: direct
    assert request(client, server.ipv4, b"hello") == b"server|hello"
    assert agent.proxy_lines() == []

    # label the namespace: running pods enrolled with this backend, traffic through the proxy
    node.set_namespace_labels("shop", AMBIENT)
    wait_for(lambda: all(agent.pod_state(u) == "enrolled" for u in uids), 30, "pods enrolled")
    rows = agent.status()
    assert {rows[u]["backend"] for u in uids} == {backend}
    state = {p.uid: ours(p, backend) for p in (client, server)}
    assert all(state.values()), state
    others = [o for o in BACKENDS if o != backend and not (backend == "ebpf" and o == "iptables")]
    assert not any(ours(p, other) for p in (client, server) for other in others)
    if backend == "ebpf":  # the inbound (only) of ambient pods is in iptables, with the policy routing
        assert all(inbound_only_rules(p) for p in (client, server))
        assert not any(tc_filters(p.netns.path) for p in (client, server))
    if backend == "nftables":  # the node-side probe SNAT is nftables too, one rule per enrolled pod IP
        wait_for(lambda: all(p.ipv4 in node_table(node) for p in (client, server)), 10, "node probe SNAT table")
    assert request(client, server.ipv4, b"through") == b"server|through"
    lines = wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst), 10, "proxy lines")
    outbound = next(x for x in lines if x["direction"] == "outbound")
    # Both backends keep the pod IP as the source the proxy sees (eBPF: connect4 redirects to the pod's own
    # IP:15001, so the kernel picks the pod IP as source, as iptables REDIRECT leaves it).
    assert outbound["src"].rsplit(":", 1)[0] == client.ipv4, outbound
    assert outbound["bytes_sent"] == len(b"through") and outbound["bytes_received"] == len(b"server|through")

    # SIGKILL + restart: adopted, nothing duplicated or reloaded, traffic still redirected
    ids = {p.uid: ebpf_ids(p) for p in (client, server)}
    agent.kill_agent(signal.SIGKILL)
    seen = len(agent.proxy_lines())
    assert request(client, server.ipv4, b"agent-down") == b"server|agent-down"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst, seen), 10, "proxied while agent down")
    agent.start_agent()
    wait_for(lambda: all(agent.pod_state(u) == "enrolled" for u in uids), 30, "re-enrolled")
    assert {p.uid: ours(p, backend) for p in (client, server)} == state
    assert {p.uid: ebpf_ids(p) for p in (client, server)} == ids
    seen = len(agent.proxy_lines())
    assert request(client, server.ipv4, b"after-restart") == b"server|after-restart"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst, seen), 10, "proxied after restart")

    # drift: flushed chains / a detached program → repaired and counted (on change events the repair can
    # come before the test could read the altered state: the counter proves it happened)
    repairs = agent.metric("headrace_agent_drift_repairs_total")
    if backend == "iptables":
        run(["nsenter", f"--net={client.netns.path}", "iptables-nft", "-t", "nat", "-F"])
    elif backend == "nftables":
        run(["nsenter", f"--net={client.netns.path}", "nft", "flush", "chain", "inet", "headrace", "am_output"])
    else:
        progs = bpftool_cgroup(client.pod_cgroup)
        prog = next((p for p in progs if p["name"] == "hr_connect4"), None)
        assert prog is not None and client.pod_cgroup is not None, progs
        run(["bpftool", "cgroup", "detach", client.pod_cgroup, prog["attach_type"], "id", str(prog["id"])])
    wait_for(lambda: agent.metric("headrace_agent_drift_repairs_total") > repairs, 10, "drift repaired")
    wait_for(lambda: ours(client, backend) == state[client.uid], 10, "our state exactly as before")
    if backend == "ebpf":  # its inbound rules announce their changes: the polled passes read only the
        # programs, so a repair within seconds (the backstop is 120 s) is the change announcement's
        repairs = agent.metric("headrace_agent_drift_repairs_total")
        run(["nsenter", f"--net={client.netns.path}", "iptables-nft", "-t", "nat", "-F"])
        wait_for(lambda: agent.metric("headrace_agent_drift_repairs_total") > repairs, 10, "inbound repaired")
        wait_for(lambda: ours(client, backend) == state[client.uid], 10, "inbound rules as before")
    seen = len(agent.proxy_lines())
    assert request(client, server.ipv4, b"repaired") == b"server|repaired"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst, seen), 10, "proxied after repair")

    # unlabel: nothing of ours left, traffic direct
    node.set_namespace_labels("shop", {})
    wait_for(lambda: not any(anything_of_ours(node, p) for p in (client, server)), 30, "unenrolled")
    if backend == "nftables":
        wait_for(lambda: node_table(node) == "", 10, "node probe SNAT table removed")
    seen = len(agent.proxy_lines())
    assert request(client, server.ipv4, b"direct") == b"server|direct"
    time.sleep(0.5)
    assert len(agent.proxy_lines()) == seen


def test_ambient_pod_switches_backend(env: Any, backend: str) -> None:
    """Enrolled with one backend, the agent restarted with the other: the pod moves, keeps working, and
    only the new backend's redirection is left."""
    node, agent, apps = env
    other = SWITCH_TO[backend]
    if other == "ebpf" and _ebpf_problems():
        pytest.skip("eBPF cannot run here")
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    client = node.add_pod("shop", "client")  # ADD returns once enrolled
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)
    dst = f"{server.ipv4}:{PORT}"
    assert agent.status()[client.uid]["backend"] == backend
    assert request(client, server.ipv4, b"before") == b"server|before"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst), 10, "proxied before the switch")

    before = {p.uid: iptables_state(p) for p in (client, server)}
    agent.kill_agent(signal.SIGTERM)
    agent.use_backend(other)
    agent.start_agent()
    pods = (client, server)
    wait_for(
        lambda: all(agent.status().get(p.uid, {}).get("backend") == other for p in pods)
        and all(agent.pod_state(p.uid) == "enrolled" for p in pods),
        30,
        f"pods moved to {other}",
    )
    assert all(ours(p, other) for p in pods)

    def old_gone(p: Pod) -> bool:
        if backend == "ebpf":
            return not ebpf_state(p)
        if other == "ebpf":  # the full ambient rules made way for the eBPF backend's inbound-only ones
            return iptables_state(p) != before[p.uid] and inbound_only_rules(p)
        return not ours(p, backend)

    wait_for(lambda: all(old_gone(p) for p in pods), 10, f"{backend} redirection removed")
    seen = len(agent.proxy_lines())
    assert request(client, server.ipv4, b"after") == b"server|after"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst, seen), 10, "proxied after the switch")

    # unenrol after the switch: nothing of either backend is left (and no program outlives the test)
    node.set_namespace_labels("shop", {})
    wait_for(lambda: not any(anything_of_ours(node, p) for p in pods), 30, "unenrolled after the switch")


def test_ebpf_ambient_without_proxy_cgroup_falls_back_to_iptables(ebpf_env: Any) -> None:
    """`--backend ebpf` without `--proxy-cgroup` and a proxy whose cgroup the agent refuses (it shares the
    agent's): eBPF cannot answer SO_ORIGINAL_DST for the node proxy (fallback_reason), so ambient pods are
    enrolled with iptables — logged, shown in status — and work. (A proxy in a cgroup of its own is
    detected instead: tests/kernel/test_agent_proxy_cgroup.py.)"""
    node, agent, apps = ebpf_env
    agent.extra = ["--backend", "ebpf"]
    node.add_namespace("shop", AMBIENT)
    AgentRun.start_proxy(agent)  # not ParityRun's: the proxy stays in the agent's cgroup
    agent.start_agent()
    client = node.add_pod("shop", "client")
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)
    rows = agent.status()
    assert {rows[p.uid]["backend"] for p in (client, server)} == {"iptables"}
    assert iptables_state(client) and not ebpf_state(client)
    assert "proxy's cgroup" in agent.agent_log()
    assert request(client, server.ipv4, b"fallback") == b"server|fallback"
    dst = f"{server.ipv4}:{PORT}"
    wait_for(lambda: proxied(agent, "shop/client", "shop/server", dst), 10, "proxied via iptables")


def test_ambient_ipv6_parity(env: Any, backend: str) -> None:
    """IPv6 client → server through the proxy: the JSON lines name both workloads and the [v6]:port
    original destination."""
    node, agent, apps = env
    node.add_namespace("shop", AMBIENT)
    agent.start_proxy()
    agent.start_agent()
    client = node.add_pod("shop", "client")  # ADD returns once enrolled
    server = node.add_pod("shop", "server")
    start_app(server.netns.path, "server", apps)
    assert client.ipv6 and server.ipv6
    assert {agent.status()[p.uid]["backend"] for p in (client, server)} == {backend}
    assert request(client, server.ipv6, b"six") == b"server|six"
    dst = f"[{server.ipv6}]:{PORT}"

    def answered() -> list[dict[str, Any]]:
        # the line of the answered attempt (earlier ones may have found the app not listening yet)
        lines = proxied(agent, "shop/client", "shop/server", dst)
        return [x for x in lines if x["direction"] == "outbound" and x["bytes_received"] == len(b"server|six")]

    outbound = wait_for(answered, 10, "IPv6 proxy lines")[-1]
    assert outbound["bytes_sent"] == len(b"six")
    assert outbound["src"].rsplit(":", 1)[0].strip("[]") == client.ipv6, outbound
