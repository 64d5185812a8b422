"""Idle agent with sidecar pods: what the drift checks cost on each backend.

    .venv/bin/python bench/sidecar_idle.py [--pods 100] [--backends nftables,nft,legacy,ebpf]
                                           [--drift-interval 1] [--settle 5] [--window 20]

For each backend a simulated node (node_agent.lab.SimNode: its own netns and bridge, the real chain
bridge + host-local + headrace-cni, as bench/cni_add_latency.py runs it) gets `headrace agent` on that
backend, then N sidecar pods (annotation `sidecar.istio.io/status`) added through the chain one after
another, each ADD handed to the agent. Once all are in and the first checks have run (`--settle`), the
agent's CPU (its own, the tools it ran and its running children) is sampled over `--window` seconds and
its RSS read. Printed per backend: the pods, the seconds the ADDs took in all, idle CPU as % of one core
and per pod (µs of agent CPU per pod and second), RSS. Sidecar pods on nftables and iptables-nft are
checked when their netns announces a change; iptables-legacy and eBPF pods are polled every drift
interval. The node's IPv4 subnet is a /24: at most ~250 pods. No assertions: it prints a table. The pods
are deleted through the chain with the agent still up; everything is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` when run as a script

from node_agent.backends.ebpf import pod_cgroup
from node_agent.lab.agent_run import AgentRun
from node_agent.lab.simnode import HEADRACE_CNI, SimNode

from bench.agent_enrol import agent_cpu, agent_rss
from bench.cni_add_latency import AGENT_ONLY, BACKENDS, guarded, new_pod, table
from bench.interrupts import stop_like_ctrl_c

MAX_PODS = 250  # the node's /24


def measure(root: Path, backend: str, pods: int, drift: float, settle: float, window: float,
            nodes: list[SimNode], agents: list[AgentRun]) -> list[str]:
    conf, agent_args = BACKENDS[backend]
    ebpf = backend in AGENT_ONLY
    node = SimNode.create(root / backend, headrace=dict(conf), pod_cgroups=ebpf)
    nodes.append(node)
    if ebpf:  # the node's kubelet cgroup root, as with `kubelet --cgroup-root`
        os.environ[pod_cgroup.ROOTS_ENV] = str(node.cgroup_base)
        agent_args = [*agent_args, "--proxy-cgroup", str(node.proxy_cgroup())]
    node.add_namespace("bench")
    runner = node.runner()
    agent = AgentRun(node.netns.path, node.objects_dir, root / f"agent-{backend}", state_dir=node.state_dir,
                     cni_socket=node.agent_socket, proxy_socket=node.state_dir / "proxy.sock",
                     extra=[*agent_args, "--drift-interval", str(drift), "--log-level", "warning"])
    agents.append(agent)
    agent.start_agent()
    assert agent.agent is not None
    proc = psutil.Process(agent.agent.pid)
    start = time.monotonic()
    for i in range(pods):
        pod = new_pod(node, "sidecar", i)
        pod.result = runner.add(pod.container_id, pod.netns.path, args=pod.cni_args)
        print(f"  {backend}: {i + 1}/{pods} added", file=sys.stderr, end="\r", flush=True)
    added = time.monotonic() - start
    time.sleep(settle)
    cpu0, w0 = agent_cpu(proc), time.monotonic()
    time.sleep(window)
    core = (agent_cpu(proc) - cpu0) / (time.monotonic() - w0)
    rss = agent_rss(proc)
    for pod in list(node.pods.values()):  # through the chain while the agent is up (it owns eBPF pods' DEL)
        node.remove_pod(pod)
    return [backend, str(pods), f"{added:.1f}", f"{core * 100:.2f}", f"{core / pods * 1e6:.0f}", f"{rss:.1f}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--backends", default="nftables,nft,legacy,ebpf",
                    help="comma-separated: legacy,nft (iptables flavours), nftables, ebpf")
    ap.add_argument("--drift-interval", type=float, default=1.0)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after the last ADD before the window")
    ap.add_argument("--window", type=float, default=20.0, help="seconds of the idle CPU window")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if not backends or any(b not in BACKENDS for b in backends) or not 1 <= args.pods <= MAX_PODS:
        ap.error(f"--backends: a list of {', '.join(BACKENDS)}; --pods: 1..{MAX_PODS}")
    if not HEADRACE_CNI.exists():
        ap.error(f"{HEADRACE_CNI} not found: run `make setup` first")
    stop_like_ctrl_c()
    root = Path(tempfile.mkdtemp(prefix="hrbench-idle-"))
    nodes: list[SimNode] = []
    agents: list[AgentRun] = []
    rows: list[list[str]] = []

    def work() -> None:
        for backend in backends:
            rows.append(measure(root, backend, args.pods, args.drift_interval, args.settle, args.window,
                                nodes, agents))

    if (status := guarded(work, agents, nodes, root)) != 0:
        return status
    print(file=sys.stderr)
    print(f"Idle agent with sidecar pods (drift interval {args.drift_interval:g} s, {args.window:g} s window "
          f"{args.settle:g} s after the last ADD; CPU: the agent, the tools it ran, its children)")
    print()
    print(table(rows, ["backend", "pods", "all added s", "idle CPU %", "µs CPU per pod per s", "RSS MiB"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
