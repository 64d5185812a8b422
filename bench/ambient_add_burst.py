"""Ambient ADD and DEL in a burst: N pods created (then deleted) at once in an ambient namespace, beside N
created (then deleted) at once outside the mesh, on the same node.

    .venv/bin/python bench/ambient_add_burst.py [--pods 10,50] [--rounds 3] [--backends nftables,nft,legacy]
        [--launchers python,front] [--restart SETTLE]

Per backend (nftables, iptables-nft, iptables-legacy; eBPF when asked) a simulated node (node_agent.lab)
runs `headrace agent` on that backend and the reference node proxy, and the chain bridge + host-local +
headrace-cni (through the launcher install-cni lays: `front`, the default and what nodes run, the
compiled front, which relays the ADD without starting an interpreter; `python` the interpreter, which
relays it; both: one node each, one after the other, rows `<backend>+front`) the way a runtime does. Each round, per
burst size N: N pods of namespace `mesh` (labelled ambient) are added at once, one thread per pod (its
Pod object written first without IPs, its netns and kubelet-style cgroup directory made, as a kubelet
and containerd do before the ADD), then N pods of namespace `plain` (outside the mesh) the same way; each
burst's pods are deleted at once after it (every pod's chain DEL on a thread of its own, its netns still
there, as a kubelet tears pods down). An ambient ADD is answered once the agent has enrolled the pod (its
redirection in and the proxy's ack); a non-mesh ADD has nothing to wait for; an ambient DEL once the
agent has taken the redirection out. `--restart SETTLE`: the agent is SIGKILLed and started again between
each burst's ADD and its DEL (the DEL burst starts SETTLE seconds after every pod is enrolled again), so
the DELs meet an agent that did not write the pods' rules itself.

Printed per backend and N, over all rounds: headrace-cni's ADD median and p99 for each kind, the
bridge plugin's ADD median in the same chains, the wall time of a whole burst (median of the rounds),
and the ratios ambient / non-mesh of headrace-cni's median and of the burst; then headrace-cni's DEL
median and p99 for each kind, the bridge plugin's DEL median, and the wall time of each DEL burst. No
assertions: it prints two tables. Everything (agents, proxies, pods, netns, bridges, files) is removed at
the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` when run as a script

from node_agent.backends.ebpf import pod_cgroup
from node_agent.install_cni.runtime import front_binary
from node_agent.lab.agent_run import AgentRun
from node_agent.lab.cni_runner import CniInvocationError, CniRunner
from node_agent.lab.netns import NetNS
from node_agent.lab.pod_cgroups import rmdir_cgroup
from node_agent.lab.simnode import Pod, SimNode

from bench.cni_add_latency import BACKENDS, guarded, ms, percentile, table

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
KINDS = {"ambient": "mesh", "non-mesh": "plain"}  # kind -> namespace
DEFAULT_BACKENDS = "nftables,nft,legacy"


class Burst:
    """One burst's figures: per pod, headrace-cni's and the bridge plugin's ADD; the burst's wall time."""

    def __init__(self) -> None:
        self.headrace: list[float] = []
        self.bridge: list[float] = []
        self.wall = 0.0
        self.errors: list[CniInvocationError] = []


def make_pods(node: SimNode, namespace: str, n: int, label: str) -> list[Pod]:
    """N pods as the kubelet leaves them before the ADD: object without IPs, netns, cgroup directory."""
    pods = []
    for i in range(n):
        pod = Pod(namespace, f"{label}-{i}-{secrets.token_hex(3)}", str(uuid.uuid4()), NetNS.create("hrbburst-"),
                  secrets.token_hex(16), {}, {}, {})
        node.pods[pod.uid] = pod  # node.close() removes it even mid-ADD
        node.write_pod(pod)
        (node.cgroup_base / "kubepods" / f"pod{pod.uid}").mkdir(parents=True)
        pods.append(pod)
    return pods


def at_once(node: SimNode, pods: list[Pod], step: Callable[[CniRunner, Pod], object]) -> Burst:
    """`step` (the chain's ADD or DEL) for every pod on a thread of its own, released together."""
    burst = Burst()
    gate = threading.Barrier(len(pods) + 1)
    lock = threading.Lock()

    def one(pod: Pod) -> None:
        runner = node.runner()  # its own: its timings are this pod's
        gate.wait()
        try:
            step(runner, pod)
        except CniInvocationError as exc:
            with lock:
                burst.errors.append(exc)
            return
        with lock:
            for t in runner.timings:
                (burst.headrace if t.plugin == "headrace-cni" else burst.bridge).append(t.seconds)

    threads = [threading.Thread(target=one, args=(p,)) for p in pods]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    burst.wall = time.perf_counter() - start
    return burst


def add_at_once(node: SimNode, pods: list[Pod]) -> Burst:
    def add(runner: CniRunner, pod: Pod) -> None:
        pod.result = runner.add(pod.container_id, pod.netns.path, args=pod.cni_args)

    return at_once(node, pods, add)


def delete_at_once(node: SimNode, pods: list[Pod]) -> Burst:
    """Every pod's chain DEL at once (its netns still there); then the pods are gone (netns, object, cgroup)."""
    try:
        return at_once(node, pods, lambda runner, pod: runner.delete(pod.container_id, pod.netns.path,
                                                                     args=pod.cni_args))
    finally:
        for pod in pods:
            pod.netns.delete()
            node.pods.pop(pod.uid, None)
            (node.objects_dir / f"pod-{pod.namespace}-{pod.name}.json").unlink(missing_ok=True)
            rmdir_cgroup(node.cgroup_base / "kubepods" / f"pod{pod.uid}")


def restarted(agent: AgentRun, pods: list[Pod], settle: float) -> None:
    """The agent SIGKILLed and started again; back once it is ready, holds every ambient pod of `pods`
    enrolled again, and `settle` seconds more have passed (its first drift checks of them)."""
    agent.kill_agent()
    agent.start_agent()
    agent.wait_ready(60, "agent ready after its restart")
    wanted = {p.uid for p in pods if p.namespace == KINDS["ambient"]}
    deadline = time.monotonic() + 60
    while wanted - {uid for uid, st in agent.status().items() if st.get("state") == "enrolled"}:
        if time.monotonic() > deadline:
            raise TimeoutError("the restarted agent did not enrol the burst's pods again within 60 s")
        time.sleep(0.1)
    time.sleep(settle)


def measure_backend(root: Path, backend: str, front: bool, sizes: Sequence[int], rounds: int,
                    nodes: list[SimNode], agents: list[AgentRun], progress: Callable[[str], None],
                    restart: float | None = None) -> dict[tuple[int, str, str], list[Burst]]:
    """(N, kind, "ADD" | "DEL") -> the bursts of every round, on one node running the agent on this backend
    (`restart`: the agent restarted between each burst's ADD and its DEL, that many seconds settled)."""
    conf, agent_args = BACKENDS[backend]
    label = backend + ("+front" if front else "")
    node = SimNode.create(root / label, headrace=dict(conf), pod_cgroups=True, front=front)
    nodes.append(node)
    os.environ[pod_cgroup.ROOTS_ENV] = str(node.cgroup_base)  # the node's kubelet cgroup root
    for kind, namespace in KINDS.items():
        node.add_namespace(namespace, AMBIENT if kind == "ambient" else None)
    agent = AgentRun(node.netns.path, node.objects_dir, root / f"agent-{label}", state_dir=node.state_dir,
                     cni_socket=node.agent_socket, proxy_socket=node.state_dir / "proxy.sock",
                     extra=[*agent_args, "--proxy-cgroup", str(node.proxy_cgroup()), "--log-level", "warning"])
    agents.append(agent)
    agent.start_proxy()
    agent.start_agent()
    out: dict[tuple[int, str, str], list[Burst]] = {(n, kind, cmd): [] for n in sizes for kind in KINDS
                                                    for cmd in ("ADD", "DEL")}
    for r in range(-1, rounds):  # round -1 warms up (page cache, first tables), not recorded
        for n in sizes:
            for kind, namespace in KINDS.items():  # side by side: each round does both kinds
                pods = make_pods(node, namespace, n, f"{kind[0]}{r}")
                try:
                    burst = add_at_once(node, pods)
                    if restart is not None and not burst.errors:
                        restarted(agent, pods, restart)
                finally:
                    deleted = delete_at_once(node, pods)
                for b in (burst, deleted):
                    if b.errors:  # the first failed ADD or DEL (`guarded` prints it)
                        raise b.errors[0]
                if r >= 0:
                    out[(n, kind, "ADD")].append(burst)
                    out[(n, kind, "DEL")].append(deleted)
        progress(f"{label}: round {r + 1}/{rounds}")
    return out


def rows(backend: str, results: dict[tuple[int, str, str], list[Burst]], cmd: str = "ADD") -> list[list[str]]:
    """The table's rows of one command (the ratio columns: ADD only)."""
    out = []
    for n in sorted({n for n, _kind, _cmd in results}):
        amb, plain = results[(n, "ambient", cmd)], results[(n, "non-mesh", cmd)]
        h_amb = [s for b in amb for s in b.headrace]
        h_plain = [s for b in plain for s in b.headrace]
        bridge = [s for b in amb + plain for s in b.bridge]
        wall_amb = statistics.median(b.wall for b in amb)
        wall_plain = statistics.median(b.wall for b in plain)
        out.append([
            backend, str(n), ms(percentile(h_amb, 50)), ms(percentile(h_amb, 99)), ms(percentile(h_plain, 50)),
            ms(percentile(h_plain, 99)), ms(percentile(bridge, 50)), ms(wall_amb), ms(wall_plain),
            *([f"{percentile(h_amb, 50) / percentile(h_plain, 50):.2f}", f"{wall_amb / wall_plain:.2f}"]
              if cmd == "ADD" else []),
        ])
    return out


HEADER = ["backend", "pods", "ambient ADD p50", "p99", "non-mesh ADD p50", "p99", "bridge ADD p50",
          "ambient burst", "non-mesh burst", "ratio ADD p50", "ratio burst"]
DEL_HEADER = ["backend", "pods", "ambient DEL p50", "p99", "non-mesh DEL p50", "p99", "bridge DEL p50",
              "ambient DEL burst", "non-mesh DEL burst"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", default="10,50", help="burst sizes, comma separated")
    ap.add_argument("--rounds", type=int, default=3, help="bursts per size and kind (>=1)")
    ap.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"of {','.join(BACKENDS)}")
    ap.add_argument("--launchers", default="front",
                    help="front (the compiled front relays: the default), python (the interpreter relays), or both")
    ap.add_argument("--restart", type=float, default=None, metavar="SETTLE",
                    help="restart the agent (SIGKILL) between each burst's ADD and DEL; the DEL burst starts "
                         "SETTLE seconds after every pod is enrolled again")
    args = ap.parse_args(argv)
    launchers = [x for x in args.launchers.split(",") if x]
    sizes = [int(x) for x in args.pods.split(",") if x]
    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or args.rounds < 1 or not sizes or min(sizes) < 1 or max(sizes) > 200:
        ap.error(f"backends of {sorted(BACKENDS)}, --rounds >= 1, burst sizes 1..200 (unknown: {unknown})")
    if not launchers or not set(launchers) <= {"python", "front"}:
        ap.error("--launchers: python, front or python,front")
    if "front" in launchers and not front_binary():
        ap.error("the compiled front is not built: run `make front`")
    if os.geteuid() != 0:
        print("needs root (netns, bridges, cgroups)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="hrbburst-"))
    nodes: list[SimNode] = []
    agents: list[AgentRun] = []
    all_rows: list[list[str]] = []
    del_rows: list[list[str]] = []

    def work() -> None:
        for backend, launcher in ((b, x) for b in backends for x in launchers):
            front = launcher == "front"
            results = measure_backend(root, backend, front, sizes, args.rounds, nodes, agents,
                                      lambda m: print(m, file=sys.stderr, flush=True), args.restart)
            all_rows.extend(rows(backend + ("+front" if front else ""), results))
            del_rows.extend(rows(backend + ("+front" if front else ""), results, "DEL"))
            for running in agents:
                running.close()
            for node in nodes:
                node.close()
            agents.clear()
            nodes.clear()

    started = time.time()
    code = guarded(work, agents, nodes, root)
    if all_rows:
        print(f"\n{args.rounds} rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; "
              f"wall time of each plugin's exec, ms\n")
        print(table(all_rows, HEADER))
        print()
        if args.restart is not None:
            print(f"DEL after the agent's restart (SIGKILL, every pod enrolled again, {args.restart:g} s "
                  f"settled)\n")
        print(table(del_rows, DEL_HEADER))
    return code


if __name__ == "__main__":
    sys.exit(main())
