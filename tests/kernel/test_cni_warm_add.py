"""The one-request ADD on the real chain (bridge + host-local + headrace-cni as the installed `-IS` launcher)
with a real agent in the node netns (cases marked `+front` through the compiled front's relay, the others
through the interpreter's):

- agent up: a sidecar pod's ADD is decided and applied by the agent (plugin log: "applied by the agent",
  no iptables/nft step of the plugin; agent status: held, drift watched); outbound TCP lands on 15001
  with the original destination; on every backend a dual-stack pod's ADD starts no process for its
  rules in the agent (strace of the agent during the ADD); CHECK passes; DEL, relayed too, removes the
  rules (the agent does and says so, the plugin removes nothing; the pod is not taken over again); a
  non-mesh pod is answered by the agent;
- agent down (no socket, or a stale socket of a killed agent): the standalone path, quickly;
- agent wedged (SIGSTOP) then killed during a sidecar ADD: the plugin falls back to its standalone path
  after the first-answer bound, the rules are in exactly once; an ambient pod the agent took and then
  died on fails closed (CNI code 103);
- hostile version-2 and version-3 requests (bad fields, the host netns, an oversized line) are refused
  with a reason, and the agent still serves the next ADD;
- a rule-less pod after DEL when the agent died between ADD and DEL (the plugin's standalone removal).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.cni_runner import CniInvocationError
from node_agent.lab.simnode import Pod, SimNode

from cni.contract import agent_add
from tests.harness.traffic import Listener, tcp_request
from tests.kernel.agent_kit import AgentRun, headrace_rules, run, wait_for

pytestmark = pytest.mark.kernel

SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
# (conflist backend, iptables flavour, agent --backend, node dual-stack)
BACKENDS = {
    "nftables": ("nftables", "auto", "nftables", True),
    "iptables-nft": ("iptables", "nft", "iptables", True),
    "iptables-legacy": ("iptables", "legacy", "iptables", True),
}


def plugin_lines(node: SimNode, container_id: str) -> list[dict[str, Any]]:
    out = []
    for line in node.log_file.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("container_id") == container_id:
            out.append(rec)
    return out


def nft_table(netns: str) -> str:
    return run(["nsenter", f"--net={netns}", "nft", "list", "table", "inet", "headrace"], check=False).stdout


def our_rules(netns: str, backend: str) -> str:
    return nft_table(netns) if backend == "nftables" else "\n".join(headrace_rules(netns))


def redirected(pod: Pod, peer: Pod) -> None:
    """Outbound TCP of the pod lands on its 15001 with the original destination; uid 1337 goes out."""
    with Listener(peer.netns.path, 8080, label="peer"), Listener(pod.netns.path, 15001, label="out") as out:
        assert tcp_request(pod.netns.path, peer.ipv4, 8080, b"o") == b"out|o"
        assert out.wait_one().original_dst == (peer.ipv4, 8080)
        assert tcp_request(pod.netns.path, peer.ipv4, 8080, b"p", uid=1337, gid=1337) == b"peer|p"


@pytest.fixture
def warm(make_node: Callable[..., SimNode], tmp_path: Path, request: pytest.FixtureRequest
         ) -> Iterator[tuple[SimNode, AgentRun, str]]:
    name = getattr(request, "param", "iptables-nft")  # "<backend>+front": the launcher names the compiled front
    conf_backend, flavour, agent_backend, dual = BACKENDS[name.removesuffix("+front")]
    node = make_node(headrace={"backend": conf_backend, "iptables": flavour}, dual_stack=dual,
                     front=name.endswith("+front"))
    agent = AgentRun(node.netns.path, node.objects_dir, tmp_path / "agent", state_dir=node.state_dir,
                     cni_socket=node.agent_socket, proxy_socket=node.state_dir / "proxy.sock",
                     extra=["--backend", agent_backend, "--iptables", flavour])
    try:
        yield node, agent, conf_backend
    finally:
        agent.close()


@pytest.mark.parametrize("warm", [*BACKENDS, "nftables+front", "iptables-legacy+front"], indirect=True)
def test_sidecar_add_applied_by_the_agent(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, backend = warm
    agent.start_agent()
    peer = node.add_pod("plain", "peer")
    pod = node.add_pod("shop", "web", annotations=SIDECAR)
    lines = plugin_lines(node, pod.container_id)
    assert any(r["msg"] == "sidecar redirect applied by the agent" for r in lines), lines
    assert not any(r["step"] in ("apply-sidecar", "apply-nft") for r in lines), "the plugin wrote rules itself"
    assert any(r["msg"] == "ADD ok (relayed to the agent)" for r in lines), "the launcher relayed the ADD"
    assert our_rules(pod.netns.path, backend)
    # held once the ADD's reply is on its way: until then the row is the source's (state none)
    wait_for(lambda: agent.status().get(pod.uid, {}).get("state") == "enrolled", 10, "agent holds the pod")
    row = agent.status()[pod.uid]
    assert row["mode"] == "sidecar" and row["state"] == "enrolled" and "by the agent" in row["reason"]
    # the non-mesh peer was answered by the agent too
    assert any(r["msg"].startswith("mode none") for r in plugin_lines(node, peer.container_id))
    _, metrics = agent.http("/metrics")
    assert 'headrace_agent_plugin_adds_total{outcome="sidecar"} 1.0' in metrics
    assert 'headrace_agent_plugin_adds_total{outcome="none"} 1.0' in metrics
    redirected(pod, peer)
    node.runner().check(pod.container_id, pod.netns.path, args=pod.cni_args)  # the plugin reads them back
    node.runner().delete(pod.container_id, pod.netns.path, args=pod.cni_args)  # netns still there
    assert not our_rules(pod.netns.path, backend)
    wait_for(lambda: pod.uid not in agent.status() or agent.pod_state(pod.uid) == "none", 10, "agent let go")
    # the agent held the pod on the plugin's backend: it removed the rules, the plugin removed nothing
    deleting = [r for r in plugin_lines(node, pod.container_id) if r.get("cmd") == "DEL"]
    assert any(r["msg"] == "redirect removed by the agent" for r in deleting), deleting
    assert any(r["msg"] == "DEL ok (relayed to the agent)" for r in deleting), "the launcher relayed the DEL"
    assert not any(r["step"] in ("remove", "remove-nft") for r in deleting), deleting
    time.sleep(1.5)  # a few reconcile passes: the pod (still in the source) is not taken over again
    assert not our_rules(pod.netns.path, backend)
    assert pod.uid not in agent.status() or agent.pod_state(pod.uid) == "none"


def checks(agent: AgentRun, path: str) -> float:
    _, metrics = agent.http("/metrics")
    for line in metrics.splitlines():
        if line.startswith(f'headrace_agent_iptables_checks_total{{path="{path}"}} '):
            return float(line.split()[1])
    return 0.0


def test_a_warm_sidecar_pods_first_drift_check_reads_nothing_back(warm: tuple[SimNode, AgentRun, str]) -> None:
    """iptables-nft: the rules the agent wrote at the ADD (its own fresh batches, nothing else committed
    meanwhile, no table but ours) are recorded as verified, so the held pod's first drift check is a
    ruleset generation read: no iptables-nft-save. A flushed chain afterwards is still found and repaired."""
    node, agent, _ = warm
    agent.start_agent()
    pod = node.add_pod("shop", "web", annotations=SIDECAR)
    wait_for(lambda: checks(agent, "in_process") >= 1, 10, "the held pod's first drift check")
    time.sleep(1.0)  # two drift intervals more
    assert checks(agent, "iptables_save") == 0
    run(["nsenter", f"--net={pod.netns.path}", "iptables-nft", "-t", "nat", "-F", "HEADRACE_SC_OUTPUT"])
    wait_for(lambda: checks(agent, "iptables_save") >= 1, 10, "the flushed chain read back")
    wait_for(lambda: any(line.startswith("nft: -A HEADRACE_SC_OUTPUT") for line in headrace_rules(pod.netns.path)),
             10, "the flushed chain repaired")


@pytest.mark.parametrize("name", ["nftables", "iptables-nft", "iptables-legacy"])
def test_sidecar_add_starts_no_process(make_node: Callable[..., SimNode], tmp_path: Path, name: str) -> None:
    """Dual-stack pod, nftables: libnftables and rtnetlink (`::6` on lo) in the agent; iptables: the table
    written by the agent itself (legacy: xt_fresh_write, nft: nft_fresh_write); nothing exec'd by the
    agent for the ADD (on iptables the drift check's first read of the held pods may start processes)."""
    conf_backend, flavour, agent_backend, _ = BACKENDS[name]
    node = make_node(headrace={"backend": conf_backend, "iptables": flavour}, dual_stack=True)
    agent = AgentRun(node.netns.path, node.objects_dir, tmp_path / "agent", state_dir=node.state_dir,
                     cni_socket=node.agent_socket, proxy_socket=node.state_dir / "proxy.sock",
                     extra=["--backend", agent_backend, "--iptables", flavour])
    trace = tmp_path / "agent.strace"
    try:
        agent.start_agent()
        # the start's one-off look for another kind's node probe SNAT is over
        wait_for(lambda: "node probe SNAT of other kinds checked" in agent.agent_log(), 20, "the start's checks")
        node.add_pod("shop", "warmup", annotations=SIDECAR)  # first use of every code path
        assert agent.agent is not None
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=execve,execveat", "-o", str(trace),
                                   "-p", str(agent.agent.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)  # attached to every thread
            pod = node.add_pod("shop", "web", annotations=SIDECAR)
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
        assert "sidecar redirect applied by the agent" in node.log_file.read_text()
        assert our_rules(pod.netns.path, conf_backend)
        lo = run(["nsenter", f"--net={pod.netns.path}", "ip", "-6", "addr", "show", "dev", "lo"]).stdout
        assert "inet6 ::6/128" in lo
        execs = [line for line in trace.read_text().splitlines() if "execve" in line]
        if name != "nftables":  # what would write rules; the drift check's first read (after the reply:
            # iptables-save, python-iptables' loading) is not the ADD's
            execs = [line for line in execs if any(f'/{cmd}"' in line for cmd in ("ip", "nsenter", "nft"))
                     or "-restore" in line]
        assert execs == [], execs
    finally:
        agent.close()


@pytest.mark.parametrize("warm", ["iptables-nft", "iptables-nft+front"], indirect=True)
def test_agent_down_means_standalone(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, _backend = warm
    peer = node.add_pod("plain", "peer")
    start = time.monotonic()
    pod = node.add_pod("shop", "nosock", annotations=SIDECAR)  # no socket at all
    assert time.monotonic() - start < 5
    assert any(r["step"] == "apply-sidecar" for r in plugin_lines(node, pod.container_id))
    redirected(pod, peer)
    agent.start_agent()
    agent.kill_agent(signal.SIGKILL)  # leaves its socket file behind: connect refused
    assert node.agent_socket.exists()
    start = time.monotonic()
    stale = node.add_pod("shop", "stale", annotations=SIDECAR)
    assert time.monotonic() - start < 5
    lines = plugin_lines(node, stale.container_id)
    assert any("refused the connection" in r["msg"] for r in lines) and any(r["step"] == "apply-sidecar" for r in lines)
    redirected(stale, peer)


@pytest.mark.parametrize("warm", ["iptables-nft", "iptables-nft+front"], indirect=True)
def test_wedged_then_killed_agent_falls_back_without_half_state(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, _backend = warm
    agent.start_agent()
    peer = node.add_pod("plain", "peer")
    before = headrace_rules(peer.netns.path)
    assert agent.agent is not None
    agent.agent.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        pod = node.add_pod("shop", "wedged", annotations=SIDECAR)
        took = time.monotonic() - start
    finally:
        agent.kill_agent(signal.SIGKILL)
    assert 1.5 < took < 10, took  # the first-answer bound (2 s), then the standalone apply
    lines = plugin_lines(node, pod.container_id)
    assert any("did not answer in time" in r["msg"] for r in lines), lines
    assert any(r["step"] == "apply-sidecar" for r in lines)
    rules = headrace_rules(pod.netns.path)
    assert len(rules) == len(set(rules)), "a rule is in twice"
    assert before == []
    redirected(pod, peer)

    # killed while it holds the connection: EOF, then the standalone path
    agent.start_agent()
    assert agent.agent is not None
    agent.agent.send_signal(signal.SIGSTOP)
    result: dict[str, Any] = {}

    def add() -> None:
        result["pod"] = node.add_pod("shop", "killed", annotations=SIDECAR)

    adder = threading.Thread(target=add)
    adder.start()
    time.sleep(0.5)
    agent.kill_agent(signal.SIGKILL)
    adder.join(30)
    killed = result["pod"]
    lines = plugin_lines(node, killed.container_id)
    assert any(r["step"] == "apply-sidecar" for r in lines), lines
    redirected(killed, peer)


@pytest.mark.parametrize("warm", ["iptables-nft", "iptables-nft+front"], indirect=True)
def test_ambient_pod_fails_closed_when_the_agent_dies_holding_it(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, _ = warm
    agent.start_agent()  # no node proxy: the enrolment waits for its ack
    result: dict[str, Any] = {}

    def add() -> None:
        try:
            node.add_pod("mesh", "amb", labels={"istio.io/dataplane-mode": "ambient"})
        except CniInvocationError as exc:
            result["error"] = exc

    adder = threading.Thread(target=add)
    adder.start()
    wait_for(lambda: "the plugin waits for the outcome" in agent.agent_log(), 10, "ADD arrived")
    time.sleep(0.3)
    agent.kill_agent(signal.SIGKILL)
    adder.join(30)
    err = result.get("error")
    assert err is not None, "an ambient ADD succeeded without the agent"
    assert '"code": 103' in str(err) or '"code":103' in str(err), str(err)


def _ask_raw(sock_path: Path, payload: bytes) -> bytes:
    """Everything the agent sends back before it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(payload)
        buf = b""
        try:
            while chunk := s.recv(65536):
                buf += chunk
        except ConnectionResetError:  # the agent answered and closed without reading all (an oversized line)
            pass
    return buf


def _ask(sock_path: Path, payload: bytes) -> dict[str, Any]:
    return dict(json.loads(_ask_raw(sock_path, payload).split(b"\n")[0]))


def _req(path: str, **change: Any) -> dict[str, Any]:
    req = agent_add.add_request("c1", path, "eth0", "shop", "web", "", ["10.9.0.5/24"], "iptables", "nft",
                                ["kube-system"])
    for key, value in change.items():
        if value is None:
            req.pop(key, None)
        else:
            req[key] = value
    return req


def test_hostile_requests_are_refused(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, _ = warm
    agent.start_agent()
    pod_netns = node.add_pod("plain", "peer").netns.path
    bad = {
        "bad namespace": _req(pod_netns, pod={"namespace": "Shop!", "name": "web", "uid": ""}),
        "no pod": _req(pod_netns, pod=None),
        "relative netns": _req(pod_netns, netns="run/netns/x"),
        "host netns": _req("/proc/1/ns/net"),
        "agent's own netns": _req("/proc/self/ns/net"),
        "not a netns": _req("/etc/hostname"),
        "too many ips": _req(pod_netns, ips=[f"10.0.0.{i}" for i in range(40)]),
        "bad ip": _req(pod_netns, ips=["10.0.0.300"]),
        "unknown backend": _req(pod_netns, rules={"backend": "pf", "iptables": "nft"}),
        "no rules": _req(pod_netns, rules=None),
        "bad excluded": _req(pod_netns, exclude_namespaces=["ok", "NOT OK"]),
        "huge excluded": _req(pod_netns, exclude_namespaces=["a"] * 1000),
        "not ADD": _req(pod_netns, cmd="DEL"),
    }
    for what, req in bad.items():
        reply = _ask(node.agent_socket, (json.dumps(req) + "\n").encode())
        assert reply["ok"] is False and reply["retry"] is False and reply["error"], (what, reply)
    huge = _ask(node.agent_socket, b'{"v": 2, "cmd": "ADD", "pad": "' + b"x" * 200_000 + b'"}\n')
    assert huge == {"ok": False, "error": "request too long", "retry": False}
    # the relayed ADD (version 3): malformed requests refused the same way
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": pod_netns,
           "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"}
    conf = node.conflist()
    netconf = {**conf["plugins"][-1], "name": conf["name"], "cniVersion": conf["cniVersion"]}
    relay_bad = {
        "env not an object": {"v": 3, "cmd": "ADD", "env": "CNI_COMMAND=ADD", "stdin": netconf},
        "env beyond CNI_*": {"v": 3, "cmd": "ADD", "env": {**env, "LD_PRELOAD": "/tmp/x.so"}, "stdin": netconf},
        "env value not a string": {"v": 3, "cmd": "ADD", "env": {**env, "CNI_ARGS": ["x"]}, "stdin": netconf},
        "config not an object": {"v": 3, "cmd": "ADD", "env": env, "stdin": "{}"},
        "cmd and CNI_COMMAND differ": {"v": 3, "cmd": "DEL", "env": env, "stdin": netconf},
        "CHECK, not relayed": {"v": 3, "cmd": "CHECK", "env": {**env, "CNI_COMMAND": "CHECK"}, "stdin": netconf},
    }
    for what, req in relay_bad.items():
        reply = _ask(node.agent_socket, (json.dumps(req) + "\n").encode())
        assert reply["ok"] is False and reply["retry"] is False and reply["error"], (what, reply)
    # well-formed, but what the plugin refuses: the plugin's own CNI error, from the agent
    no_prev = _ask_raw(node.agent_socket, (json.dumps({"v": 3, "cmd": "ADD", "env": env, "stdin": netconf})
                                           + "\n").encode())
    head, _, body = no_prev.partition(b"\n")
    assert head.split()[:3] == [b"HR3", b"done", b"1"] and json.loads(body)["code"] == 7, no_prev
    # the host's netns as CNI_NETNS: the agent acts on nothing; it refuses the netns as the plugin does
    # (CNI code 106) or leaves it to the plugin
    host = {"v": 3, "cmd": "ADD", "env": {**env, "CNI_NETNS": "/proc/1/ns/net"},
            "stdin": {**netconf, "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.5/24"}]}}}
    answer = _ask_raw(node.agent_socket, (json.dumps(host) + "\n").encode())
    head, _, body = answer.partition(b"\n")
    assert answer == b"HR3 standalone\n" or (head.split()[:3] == [b"HR3", b"done", b"1"]
                                              and json.loads(body)["code"] == 106), answer
    # still serving: a real sidecar ADD goes through the agent
    pod = node.add_pod("shop", "after", annotations=SIDECAR)
    assert any(r["msg"] == "sidecar redirect applied by the agent" for r in plugin_lines(node, pod.container_id))


def test_del_after_the_agent_died_removes_agent_rules(warm: tuple[SimNode, AgentRun, str]) -> None:
    node, agent, _backend = warm
    agent.start_agent()
    pod = node.add_pod("shop", "web", annotations=SIDECAR)
    assert any(r["msg"] == "sidecar redirect applied by the agent" for r in plugin_lines(node, pod.container_id))
    assert headrace_rules(pod.netns.path)
    agent.kill_agent(signal.SIGKILL)
    node.runner().delete(pod.container_id, pod.netns.path, args=pod.cni_args)
    assert headrace_rules(pod.netns.path) == []


@pytest.mark.parametrize("warm", ["iptables-legacy", "iptables-nft"], indirect=True)
def test_a_held_sidecar_pod_keeps_its_flavour_when_the_agents_flavour_changes(
    warm: tuple[SimNode, AgentRun, str],
) -> None:
    """An agent restarted with the other iptables flavour checks a sidecar pod it holds in the flavour the
    pod's rules are in (no second set in its own flavour: nothing to leave behind), and DEL takes them out."""
    node, agent, _backend = warm
    before = agent.extra[-1]
    agent.start_agent()
    peer = node.add_pod("plain", "peer")
    pod = node.add_pod("shop", "web", annotations=SIDECAR)
    assert any(r["msg"] == "sidecar redirect applied by the agent" for r in plugin_lines(node, pod.container_id))
    agent.kill_agent(signal.SIGTERM)
    agent.extra[-1] = "nft" if before == "legacy" else "legacy"
    agent.start_agent()
    wait_for(lambda: agent.pod_state(pod.uid) == "enrolled", 10, "the restarted agent holds the pod")
    assert agent.status()[pod.uid]["backend"] == f"iptables-{before}"
    time.sleep(1.5)  # drift checks (every 0.5 s)
    assert {r.split(":")[0] for r in headrace_rules(pod.netns.path)} == {before}
    assert "drift found" not in agent.agent_log()
    redirected(pod, peer)
    node.runner().delete(pod.container_id, pod.netns.path, args=pod.cni_args)
    assert headrace_rules(pod.netns.path) == []


@pytest.mark.parametrize("warm", ["nftables+front", "iptables-nft"], indirect=True)
def test_status_is_the_agents_while_it_is_up_and_the_plugins_own_check_otherwise(
    warm: tuple[SimNode, AgentRun, str]
) -> None:
    """A runtime asks STATUS every few seconds (containerd 2, for each kubelet Status call): with the agent
    up the launcher relays it and the agent answers (no plugin code runs, nothing is logged), whatever
    the plugin's own pod source; with the agent gone the plugin's own check runs again."""
    node, agent, _backend = warm
    runner = node.runner("1.1.0")
    plugin = runner.plugin_conf("headrace-cni")
    broken = dict(plugin, objects_dir=str(node.root / "missing"))  # the plugin's own check fails on it
    agent.start_agent()
    logged = len(node.log_file.read_text().splitlines()) if node.log_file.exists() else 0
    assert runner.exec_plugin(plugin, "STATUS") is None
    assert runner.exec_plugin(broken, "STATUS") is None
    assert (len(node.log_file.read_text().splitlines()) if node.log_file.exists() else 0) == logged
    with pytest.raises(CniInvocationError) as info:
        node.runner("1.0.0").exec_plugin(plugin, "STATUS")  # the plugin's error, from the agent
    assert info.value.code == 1
    assert json.loads(node.log_file.read_text().splitlines()[-1])["code"] == 1  # logged as the plugin would
    agent.kill_agent(signal.SIGKILL)
    with pytest.raises(CniInvocationError) as info:
        runner.exec_plugin(broken, "STATUS")
    assert info.value.code == 50 and "missing is not a directory" in info.value.stdout
    assert runner.exec_plugin(plugin, "STATUS") is None
    assert any(r["msg"] == "ready" for r in map(json.loads, node.log_file.read_text().splitlines()))
