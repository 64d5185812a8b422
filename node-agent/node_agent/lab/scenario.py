"""`headrace lab`: the whole flow on the local kernel, step by step, with a summary table.

A simulated node (its own netns) gets pods in three namespaces through the real chain (bridge +
host-local + headrace-cni), the agent (on a local objects dir) and the reference proxy. Traffic flows
directly; namespace `shop` is labelled ambient and, with nothing restarted, the same traffic passes the
proxy; a sidecar-annotated pod shows sidecar redirection; the label is removed and traffic is direct again.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from cni.kernel.netns import entered
from node_agent.lab.agent_run import wait_for
from node_agent.lab.processes import HEADRACE, PYTHON, LabProcess, agent_status, read_json_lines, start_in_netns
from node_agent.lab.simnode import Pod, SimNode
from node_agent.lab.traffic import Listener, tcp_request

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
SIDECAR_STATUS = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
APP_PORT = 8080
STATE_FILE = "lab.json"


class StepFailed(Exception):
    pass


@dataclass
class StepResult:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class Lab:
    """A running lab: the node, its pods by short name, and the background processes."""

    dir: Path
    node: SimNode
    pods: dict[str, Pod] = field(default_factory=dict)
    procs: list[LabProcess] = field(default_factory=list)

    @property
    def cni_socket(self) -> Path:
        return self.node.state_dir / "cni.sock"

    @property
    def proxy_socket(self) -> Path:
        return self.node.state_dir / "proxy.sock"

    @property
    def proxy_log(self) -> Path:
        return self.dir / "proxy-connections.jsonl"

    def save(self) -> None:
        data = {
            "node": self.node.to_dict(),
            "pods": {k: p.uid for k, p in self.pods.items()},
            "procs": [p.to_dict() for p in self.procs],
        }
        (self.dir / STATE_FILE).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, lab_dir: Path) -> Lab:
        data = json.loads((lab_dir / STATE_FILE).read_text())
        node = SimNode.from_dict(data["node"])
        lab = cls(lab_dir, node, procs=[LabProcess.from_dict(p) for p in data["procs"]])
        lab.pods = {k: node.pods[uid] for k, uid in data["pods"].items() if uid in node.pods}
        return lab

    # -- building blocks ------------------------------------------------------------------------------
    def start_agent(self) -> None:
        argv = [
            HEADRACE,
            "agent",
            "--objects-dir",
            str(self.node.objects_dir),
            "--node-name",
            self.node.netns.name,
            "--state-dir",
            str(self.node.state_dir),
            "--cni-socket",
            str(self.cni_socket),
            "--proxy-socket",
            str(self.proxy_socket),
            "--zds-socket",
            str(self.node.state_dir / "zds.sock"),  # no longer than proxy.sock: fits the 108-byte limit
            "--metrics-addr",
            "127.0.0.1:15014",
        ]
        self.procs.append(start_in_netns("agent", self.node.netns.path, argv, self.dir / "agent.log"))

    def start_proxy(self) -> None:
        argv = [HEADRACE, "proxy", "--socket", str(self.proxy_socket)]
        self.procs.append(
            start_in_netns("proxy", self.node.netns.path, argv, self.dir / "proxy.log", stdout=self.proxy_log)
        )

    def start_app(self, key: str) -> None:
        pod = self.pods[key]
        argv = [PYTHON, "-m", "node_agent.lab.appserver", "--port", str(APP_PORT), "--label", key]
        self.procs.append(start_in_netns(f"app-{key}", pod.netns.path, argv, self.dir / f"app-{key}.log"))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def teardown(self) -> None:
        self.stop()
        self.node.close()
        unmount_below(self.dir)  # the agent's pinned netns (it keeps them over its own restarts)
        shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict[str, dict[str, Any]]:
        return {f"{p.get('namespace')}/{p.get('name')}": p for p in agent_status(self.cni_socket)}

    def headrace_chains(self, key: str) -> list[str]:
        pod = self.pods[key]
        found = []
        for save in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"):
            out = subprocess.run(
                ["nsenter", f"--net={pod.netns.path}", "--", save], capture_output=True, text=True, check=False
            ).stdout
            found += [line for line in out.splitlines() if line.startswith(":HEADRACE")]
        return found


def unmount_below(root: Path) -> None:
    """Lazily unmount every mount point at or below root (deepest first)."""
    prefix = str(root.resolve())
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        wait_for(check, timeout, what, poll=0.2)
    except TimeoutError:
        raise StepFailed(f"timed out after {timeout:.0f} s waiting for {what}") from None


def create(lab_dir: Path) -> Lab:
    if (lab_dir / STATE_FILE).exists():
        raise click.ClickException(f"a lab is already up in {lab_dir}; run `headrace lab down` first")
    lab_dir.mkdir(parents=True, exist_ok=True)
    node = SimNode.create(lab_dir / "node", headrace={})
    return Lab(lab_dir, node)


class Runner:
    """Runs named steps, prints a progress line for each, and keeps the results for the summary."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.results: list[StepResult] = []

    def step(self, name: str, fn: Callable[[], str]) -> None:
        n = len(self.results) + 1
        click.echo(f"[{n:2}/{self.total}] {name} ...", nl=False)
        start = time.monotonic()
        try:
            detail = fn()
            ok = True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        secs = time.monotonic() - start
        self.results.append(StepResult(name, ok, detail, secs))
        click.echo(f" {'ok' if ok else 'FAILED'} ({secs:.1f} s){'' if ok else ' — ' + detail}")
        if not ok:
            raise StepFailed(detail)

    def summary(self) -> None:
        width = max(len(r.name) for r in self.results) if self.results else 10
        click.echo("\nsummary")
        click.echo(f"  {'step':<{width}}  result  seconds  detail")
        for r in self.results:
            click.echo(f"  {r.name:<{width}}  {'ok' if r.ok else 'FAILED':<6}  {r.seconds:7.2f}  {r.detail}")


def bring_up(lab: Lab, run: Runner) -> None:
    def start() -> str:
        lab.start_agent()
        lab.start_proxy()
        lab.save()
        wait_until(lambda: lab.cni_socket.exists() and lab.proxy_socket.exists(), 20, "the agent's sockets")
        wait_until(lambda: all(p.alive() for p in lab.procs), 1, "processes")
        return f"agent pid {lab.procs[0].pid}, proxy pid {lab.procs[1].pid}"

    def pods() -> str:
        lab.node.add_namespace("shop")
        lab.node.add_namespace("legacy")
        lab.node.add_namespace("mesh")
        lab.pods["client"] = lab.node.add_pod("shop", "client")
        lab.pods["server"] = lab.node.add_pod("shop", "server")
        lab.pods["plain"] = lab.node.add_pod("legacy", "plain")
        lab.pods["web"] = lab.node.add_pod("mesh", "web", annotations=SIDECAR_STATUS)
        for key in ("server", "plain"):
            lab.start_app(key)
        lab.save()
        return ", ".join(f"{p.namespace}/{p.name}={p.ipv4}" for p in lab.pods.values())

    run.step("start agent and reference proxy in the node netns", start)
    run.step("create pods through bridge + host-local + headrace-cni", pods)


def request(lab: Lab, src: str, dst: str, payload: bytes) -> bytes:
    deadline = time.monotonic() + 5
    while True:
        try:
            return tcp_request(lab.pods[src].netns.path, lab.pods[dst].ipv4, APP_PORT, payload)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_scenario(lab: Lab, run: Runner) -> None:
    bring_up(lab, run)
    seen = len(read_json_lines(lab.proxy_log))
    held: list[socket.socket] = []

    def direct() -> str:
        reply = request(lab, "client", "server", b"hello")
        if reply != b"server|hello":
            raise StepFailed(f"unexpected reply {reply!r}")
        if len(read_json_lines(lab.proxy_log)) != seen:
            raise StepFailed("the proxy saw traffic before enrolment")
        with entered(lab.pods["client"].netns.path):
            s = socket.socket()
        s.settimeout(5)
        s.connect((lab.pods["server"].ipv4, APP_PORT))
        held.append(s)
        return "client -> server:8080 answered directly; proxy log empty; a long-lived connection is open"

    def enrol() -> str:
        lab.node.set_namespace_labels("shop", AMBIENT)
        wait_until(
            lambda: all(lab.status().get(f"shop/{k}", {}).get("state") == "enrolled" for k in ("client", "server")),
            20,
            "shop/client and shop/server enrolled",
        )
        return "agent reports shop/client and shop/server enrolled (no pod restarted)"

    def via_proxy() -> str:
        nonlocal seen
        reply = request(lab, "client", "server", b"through")
        if reply != b"server|through":
            raise StepFailed(f"unexpected reply {reply!r}")
        server = f"{lab.pods['server'].ipv4}:{APP_PORT}"

        def logged() -> bool:
            lines = read_json_lines(lab.proxy_log)[seen:]
            return any(
                x.get("direction") == "outbound" and x.get("workload") == "shop/client" and x.get("dst") == server
                for x in lines
            ) and any(x.get("direction") == "inbound" and x.get("workload") == "shop/server" for x in lines)

        wait_until(logged, 5, "the proxy's outbound and inbound connection lines")
        seen = len(read_json_lines(lab.proxy_log))
        return f"proxy logged outbound shop/client -> {server} and inbound shop/server"

    def long_lived() -> str:
        s = held[0]
        s.sendall(b"still-here")
        reply = s.recv(100)
        if reply != b"server|still-here":
            raise StepFailed(f"unexpected reply {reply!r}")
        return "the connection opened before enrolment still works"

    def sidecar() -> str:
        web = lab.pods["web"]
        if not lab.headrace_chains("web"):
            raise StepFailed("no HEADRACE chains in mesh/web")
        with Listener(web.netns.path, 15001, label="envoy-out") as envoy:
            reply = tcp_request(web.netns.path, lab.pods["plain"].ipv4, APP_PORT, b"x")
            got = envoy.wait_one()
        want = (lab.pods["plain"].ipv4, APP_PORT)
        if reply != b"envoy-out|x" or got.original_dst != want:
            raise StepFailed(f"reply {reply!r}, original destination {got.original_dst}")
        return f"mesh/web -> legacy/plain:8080 captured on 15001, SO_ORIGINAL_DST={want[0]}:{want[1]}"

    def unenrol() -> str:
        lab.node.set_namespace_labels("shop", {})
        wait_until(
            lambda: not lab.headrace_chains("client") and not lab.headrace_chains("server"),
            20,
            "the rules to be removed from shop/client and shop/server",
        )
        reply = request(lab, "client", "server", b"direct-again")
        if reply != b"server|direct-again":
            raise StepFailed(f"unexpected reply {reply!r}")
        time.sleep(0.5)
        if len(read_json_lines(lab.proxy_log)) != seen:
            raise StepFailed("the proxy still saw traffic after the label was removed")
        return "label removed: rules gone, client -> server direct again, proxy saw nothing"

    try:
        run.step("traffic before enrolment goes directly", direct)
        run.step("label namespace shop istio.io/dataplane-mode=ambient", enrol)
        run.step("same traffic now passes the reference proxy", via_proxy)
        run.step("long-lived connection survives enrolment", long_lived)
        run.step("sidecar pod mesh/web is redirected to 15001", sidecar)
        run.step("remove the label: back to direct", unenrol)
    finally:
        for s in held:
            s.close()
