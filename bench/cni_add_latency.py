"""CNI ADD latency: headrace-cni's ADD next to the reference bridge plugin's ADD in the same chain.

    .venv/bin/python bench/cni_add_latency.py [--runs 30] [--backends legacy,nft,nftables[,ebpf]] [--agent both]
        [--launcher both]

For each backend (iptables-legacy, iptables-nft, nftables; eBPF when asked, agent up only: the plugin hands
an eBPF node's sidecar pods to the agent, which attaches programs to the pod's cgroup, so its pods get
kubelet-like cgroups) a simulated node (its own netns; node_agent.lab)
runs the chain bridge + host-local + headrace-cni the way a runtime does (libcni semantics, every plugin a
fresh process exec'd inside the node netns; headrace-cni through the `python -IS` launcher `headrace
install-cni` lays). `--agent`: `up` runs `headrace agent` (same backend) on the node, so the plugin sends
its one-request ADD and the agent decides and applies; `down` has no agent (the plugin's standalone path:
pod lookup, iptables-restore / `nft -f`); `both` measures the two on the same node, one after the other.
`--launcher`: `python` is the launcher whose `#!` line runs the interpreter, which relays the ADD (and DEL);
`front` names the compiled front (`make front`), which relays without an interpreter and runs it only for
what the agent did not take (rows `up+front`, `down+front`); `both` measures them side by side.
Each run adds (and then deletes) one sidecar pod (annotation `sidecar.istio.io/status`) and one non-mesh
pod, side by side, and asks headrace-cni STATUS once (cniVersion 1.1.0, as containerd 2 asks it every
5 s; relayed to the agent when it is up). Printed: median and p90 wall time per plugin and command, and
the ratio of medians headrace-cni ADD / bridge ADD; for context the start-up of a bare `python3 -IS -c
pass`, of `headrace-cni` answering VERSION, and of `nsenter --net` itself. No assertions: it prints a table.
Everything (agent, pods, netns, the node's bridge, files) is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` when run as a script

from node_agent.backends.ebpf import pod_cgroup
from node_agent.install_cni.runtime import front_binary
from node_agent.lab.agent_run import AgentRun
from node_agent.lab.cni_runner import CniInvocationError, CniRunner
from node_agent.lab.netns import NetNS
from node_agent.lab.plugin_launcher import write_plugin_launcher
from node_agent.lab.pod_cgroups import rmdir_cgroup
from node_agent.lab.simnode import HEADRACE_CNI, Pod, SimNode

from bench.interrupts import stop_like_ctrl_c, uninterrupted
from cni.contract.spec import SidecarSpec
from cni.rules import builder, transition

SIDECAR_ANNOTATIONS = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}
KINDS = ("sidecar", "non-mesh")
FLAVOURS = ("legacy", "nft")
# backend label -> (headrace-cni conflist fields, `headrace agent` arguments)
BACKENDS: dict[str, tuple[dict[str, str], list[str]]] = {
    "legacy": ({"backend": "iptables", "iptables": "legacy"}, ["--backend", "iptables", "--iptables", "legacy"]),
    "nft": ({"backend": "iptables", "iptables": "nft"}, ["--backend", "iptables", "--iptables", "nft"]),
    "nftables": ({"backend": "nftables"}, ["--backend", "nftables"]),
    "ebpf": ({"backend": "ebpf"}, ["--backend", "ebpf"]),
}
DEFAULT_BACKENDS = "legacy,nft,nftables"
# on these the plugin hands sidecar pods to the agent (none without it: it fails closed), whose programs go
# on the pod's cgroup: agent up only, and pods with kubelet-like cgroups
AGENT_ONLY = ("ebpf",)
AGENT_MODES = {"up": (True,), "down": (False,), "both": (False, True)}
LAUNCHERS = {"python": (False,), "front": (True,), "both": (False, True)}
PLUGINS = ("bridge", "headrace-cni")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Samples:
    """Seconds per (plugin, command) for one (flavour, pod kind)."""

    by_key: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, plugin: str, command: str, seconds: float) -> None:
        self.by_key.setdefault((plugin, command), []).append(seconds)

    def get(self, plugin: str, command: str) -> list[float]:
        return self.by_key.get((plugin, command), [])


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{statistics.median(numerator) / statistics.median(denominator):.2f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def result_rows(results: dict[tuple[str, str, str], Samples]) -> list[list[str]]:
    rows = []
    for (flavour, agent, kind), s in results.items():
        b_add, h_add = s.get("bridge", "ADD"), s.get("headrace-cni", "ADD")
        b_del, h_del = s.get("bridge", "DEL"), s.get("headrace-cni", "DEL")
        rows.append(
            [
                flavour,
                agent,
                kind,
                str(len(h_add)),
                ms(percentile(b_add, 50)),
                ms(percentile(b_add, 90)),
                ms(percentile(h_add, 50)),
                ms(percentile(h_add, 90)),
                ratio(h_add, b_add),
                ms(percentile(b_del, 50)),
                ms(percentile(h_del, 50)),
                ms(percentile(s.get("headrace-cni", "STATUS"), 50)),
            ]
        )
    return rows


RESULT_HEADER = [
    "backend",
    "agent",
    "pod",
    "runs",
    "bridge ADD p50 ms",
    "bridge ADD p90",
    "headrace-cni ADD p50 ms",
    "headrace-cni ADD p90",
    "ratio headrace/bridge (p50)",
    "bridge DEL p50",
    "headrace-cni DEL p50",
    "headrace-cni STATUS p50",
]


# -- measuring -------------------------------------------------------------------------------------------


def new_pod(node: SimNode, kind: str, run: int) -> Pod:
    """A pod netns registered on the node at once (so node.close() removes it even mid-ADD)."""
    netns = NetNS.create("hrbpod-")
    name = f"{'side' if kind == 'sidecar' else 'plain'}-{run}-{secrets.token_hex(3)}"
    annotations = dict(SIDECAR_ANNOTATIONS) if kind == "sidecar" else {}
    pod = Pod("bench", name, str(uuid.uuid4()), netns, secrets.token_hex(16), {}, {}, annotations)
    node.pods[pod.uid] = pod
    node.write_pod(pod)
    if node.pod_cgroups:  # made by the kubelet before the sandbox, no process in it yet at ADD (containerd)
        (node.cgroup_base / "kubepods" / f"pod{pod.uid}").mkdir(parents=True)
    return pod


def one_cycle(node: SimNode, runner: CniRunner, kind: str, run: int, samples: Samples) -> None:
    """ADD then DEL one pod of this kind; record each plugin's wall time."""
    pod = new_pod(node, kind, run)
    mark = len(runner.timings)
    pod.result = runner.add(pod.container_id, pod.netns.path, args=pod.cni_args)
    runner.delete(pod.container_id, pod.netns.path, args=pod.cni_args)
    for t in runner.timings[mark:]:
        samples.add(t.plugin, t.command, t.seconds)
    pod.netns.delete()
    node.pods.pop(pod.uid, None)
    (node.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").unlink(missing_ok=True)
    rmdir_cgroup(node.cgroup_base / "kubepods" / f"pod{pod.uid}")


def one_status(runner: CniRunner, samples: Samples) -> None:
    """headrace-cni STATUS as a runtime asks it (cniVersion 1.1.0, no pod)."""
    plugin = runner.plugin_conf("headrace-cni")
    conf = {**plugin, "name": runner.conflist["name"], "cniVersion": "1.1.0"}
    mark = len(runner.timings)
    runner.exec_plugin(plugin, "STATUS", stdin_override=json.dumps(conf).encode())
    for t in runner.timings[mark:]:
        samples.add(t.plugin, t.command, t.seconds)


def measure_backend(
    root: Path, backend: str, agent_modes: Sequence[bool], fronts: Sequence[bool], runs: int,
    nodes: list[SimNode], agents: list[AgentRun], progress: Callable[[str], None],
) -> dict[tuple[str, str], Samples]:
    """(agent up/down[+front], pod kind) -> samples on one node of this backend. With both, one agent runs
    and the "down" chains name an agent socket that does not exist, and each run measures every chain, side
    by side."""
    conf, agent_args = BACKENDS[backend]
    if backend in AGENT_ONLY:
        agent_modes = (True,)
    node = SimNode.create(root / backend, headrace=dict(conf), pod_cgroups=backend in AGENT_ONLY, front=False)
    if backend in AGENT_ONLY:  # the node's kubelet cgroup root, as with `kubelet --cgroup-root`
        os.environ[pod_cgroup.ROOTS_ENV] = str(node.cgroup_base)
        agent_args = [*agent_args, "--proxy-cgroup", str(node.proxy_cgroup())]
    nodes.append(node)
    node.add_namespace("bench")
    runners: dict[str, CniRunner] = {}
    for up in agent_modes:
        for front in fronts:
            label = ("up" if up else "down") + ("+front" if front else "")
            if up and not front:
                runners[label] = node.runner()
                continue
            # its own launcher: the node's runs the interpreter and relays to the running agent's socket
            sock = str(node.agent_socket) if up else str(root / f"no-agent-{backend}.sock")
            conflist = node.conflist()
            conflist["plugins"][-1]["agent_socket"] = sock
            bin_dir = root / f"bin-{label}-{backend}"
            bin_dir.mkdir()
            write_plugin_launcher(bin_dir / "headrace-cni", sock, front=front)
            runners[label] = CniRunner(conflist, [node.cni_path[0], str(bin_dir)], node.root / "cache",
                                       run_netns=node.netns.path)
    if any(label.startswith("up") for label in runners):
        agent = AgentRun(node.netns.path, node.objects_dir, root / f"agent-{backend}", state_dir=node.state_dir,
                         cni_socket=node.agent_socket, proxy_socket=node.state_dir / "proxy.sock",
                         extra=[*agent_args, "--log-level", "warning"])
        agents.append(agent)
        agent.start_agent()
    out = {(label, kind): Samples() for label in runners for kind in KINDS}
    # One warm-up cycle per chain and kind (page cache, first nft table set-up), not recorded.
    for runner in runners.values():
        for kind in KINDS:
            one_cycle(node, runner, kind, -1, Samples())
    for i in range(runs):
        for label, runner in runners.items():  # side by side: each run does every chain and kind
            for kind in KINDS:
                one_cycle(node, runner, kind, i, out[(label, kind)])
            one_status(runner, out[(label, KINDS[-1])])
        progress(f"{backend}: {i + 1}/{runs}")
    return out


def startup_samples(
    argv: Sequence[str], runs: int, env: dict[str, str] | None = None, stdin: bytes = b""
) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, input=stdin, env=env, capture_output=True, check=True)
        samples.append(time.perf_counter() - start)
    return samples


def context_rows(runs: int, node_netns: str | None, launcher: Path, front: Path | None) -> list[list[str]]:
    """Start-up costs; `launcher` is the `python -IS` plugin launcher the chain runs (as install-cni lays it),
    `front` the one naming the compiled front (which runs the interpreter for VERSION)."""
    rows = []
    version_env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/sbin:/usr/bin"}
    cases: list[tuple[str, list[str], dict[str, str] | None]] = [
        ("python3 -IS -c pass (/usr/bin/python3)", ["/usr/bin/python3", "-IS", "-c", "pass"], None),
        ("venv python -c pass (.pth files)", [sys.executable, "-c", "pass"], None),
        ("headrace-cni VERSION (-IS launcher)", [str(launcher)], version_env),
        *([("headrace-cni VERSION (compiled front, then the -IS launcher)", [str(front)], version_env)]
          if front else []),
        ("headrace-cni VERSION (venv console script)", [str(HEADRACE_CNI)], version_env),
    ]
    if node_netns:
        cases.append(("nsenter --net=NODE true", ["nsenter", f"--net={node_netns}", "--", "true"], None))
    for label, argv, env in cases:
        s = startup_samples(argv, runs, env, b'{"cniVersion":"1.0.0"}' if env else b"")
        rows.append([label, str(len(s)), ms(percentile(s, 50)), ms(percentile(s, 90))])
    return rows


FLOOR_CHILD = Path(__file__).resolve().parent / "add_floor_child.py"


def floor_rows(runs: int, root: Path, flavours: Sequence[str], node_netns: str) -> list[list[str]]:
    """The floor of a sidecar ADD (bench/add_floor_child.py): `python3 -IS` under nsenter into the node
    netns, running only the iptables-restore (+ `ip`) processes the plugin runs, with the same rule text,
    into a fresh pod netns each run. Dual-stack and IPv4-only."""
    rule_files = []
    for family in (4, 6):
        path = root / f"floor-rules-v{family}.txt"
        path.write_text(transition.fresh_ruleset_text(builder.sidecar_rules(SidecarSpec(), family)))
        rule_files.append(str(path))
    rows = []
    for flavour in flavours:
        for label, files in (("IPv4+IPv6", rule_files), ("IPv4 only", rule_files[:1])):
            samples = []
            for _ in range(runs):
                pod_netns = NetNS.create("hrbfloor-")
                try:
                    argv = ["nsenter", f"--net={node_netns}", "--", sys.executable, "-IS", str(FLOOR_CHILD)]
                    start = time.perf_counter()
                    subprocess.run([*argv, pod_netns.path, flavour, *files], capture_output=True, check=True)
                    samples.append(time.perf_counter() - start)
                finally:
                    pod_netns.delete()
            what = f"floor, {flavour}, {label}: python3 -IS + the plugin's restore processes only"
            rows.append([what, str(len(samples)), ms(percentile(samples, 50)), ms(percentile(samples, 90))])
    return rows


def guarded(work: Callable[[], None], agents: list[AgentRun], nodes: list[SimNode], root: Path) -> int:
    """Run work; 0, 130 after a Ctrl-C, 1 when a CNI call failed. Then, whatever happened, the agents end,
    the nodes go (their pods, netns and bridge) and the scratch dir; a second Ctrl-C cannot cut that short."""
    try:
        work()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    except CniInvocationError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        with uninterrupted():
            for running in agents:
                running.close()
            for node in nodes:
                node.close()
            shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30, help="ADD+DEL cycles per pod kind, backend, agent (>=1)")
    parser.add_argument("--backends", "--flavours", default=DEFAULT_BACKENDS,
                        help="comma-separated: legacy,nft (iptables flavours), nftables, ebpf (agent up only)")
    parser.add_argument("--agent", choices=sorted(AGENT_MODES), default="both",
                        help="headrace agent running on the node (up), not (down), or both")
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="both",
                        help="the interpreter's launcher (python), the compiled front's (front), or both")
    args = parser.parse_args(argv)
    backends = [f for f in args.backends.split(",") if f]
    if args.runs < 1 or any(f not in BACKENDS for f in backends) or not backends:
        parser.error("--runs must be >= 1 and --backends a list of legacy, nft, nftables, ebpf")
    flavours = [b for b in backends if b in FLAVOURS]
    if not HEADRACE_CNI.exists():
        parser.error(f"{HEADRACE_CNI} not found: run `make setup` first")
    if args.launcher != "python" and not front_binary():
        parser.error("the compiled front is not built: run `make front` (or --launcher python)")
    stop_like_ctrl_c()

    root = Path(tempfile.mkdtemp(prefix="hrbench-"))
    nodes: list[SimNode] = []
    agents: list[AgentRun] = []
    results: dict[tuple[str, str, str], Samples] = {}

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, end="\r", flush=True)

    context: list[list[str]] = []

    def work() -> None:
        for backend in backends:
            measured = measure_backend(root, backend, AGENT_MODES[args.agent], LAUNCHERS[args.launcher], args.runs,
                                       nodes, agents, progress)
            for (agent_label, kind), s in measured.items():
                results[(backend, agent_label, kind)] = s
        print(file=sys.stderr)
        launcher = root / "headrace-cni"
        write_plugin_launcher(launcher)
        front = None
        if True in LAUNCHERS[args.launcher]:
            (root / "front").mkdir()
            front = root / "front" / "headrace-cni"
            write_plugin_launcher(front, front=True)
        context.extend(context_rows(args.runs, nodes[0].netns.path if nodes else None, launcher, front))
        if nodes and flavours:
            context.extend(floor_rows(args.runs, root, flavours, nodes[0].netns.path))

    if (status := guarded(work, agents, nodes, root)) != 0:
        return status

    print(
        f"CNI ADD/DEL latency, chain bridge (+ host-local IPAM) + headrace-cni (-IS launcher), {args.runs} runs"
        " per row (wall ms per plugin exec, nsenter into the node netns included for both); agent up: the"
        " one-request ADD to `headrace agent`, down: the plugin's standalone path; +front: through the"
        " compiled front"
    )
    print()
    print(table(result_rows(results), RESULT_HEADER))
    print()
    print("Start-up, for context (fresh process each run):")
    print()
    print(table(context, ["process", "runs", "p50 ms", "p90 ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
