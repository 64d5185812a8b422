"""Agent enrolment benchmark: label change → pods enrolled, idle cost, and re-adoption after a restart.

    .venv/bin/python bench/agent_enrol.py [--pods 1,10,100] [--backends nftables,iptables-nft,...]
                                          [--drift-interval 1] [--settle 5] [--window 10]

For each pod count and backend (side by side: nftables, iptables-nft, iptables-legacy, ebpf) a node netns
gets N pod-like processes (each in a fresh netns, inside a kubelet-style cgroup v2 directory
`.../pod<uid>`), their Pod objects in an objects dir, the reference proxy and `headrace agent` on that
backend in the node netns. Then the namespace is labelled ambient and the
agent's status is polled: per-pod time from the label write to `enrolled` (rules in and proxy ack),
median / p99 / total (per pod from the agent's `enrolled_at`), and the agent's CPU seconds meanwhile (a
figure that the machine's other load does not inflate). With all pods enrolled and settled: the agent's
RSS and CPU over an idle window (drift checks and the tools it runs included). The agent's figures
include its rules helper child where it runs one (eBPF ambient pods' rules on an iptables host). Finally
the agent is SIGKILLed and restarted: per pod, the time from the restart until it is enrolled again
(adoption: rules checked, not re-applied; fresh snapshot to the proxy), median / p99 / all, and the new
agent's reconcile passes until then (count, longest pass, from its
`headrace_agent_reconcile_duration_seconds`). Last, `--settle` seconds later, the label is removed: per pod,
the time until the restarted agent has released it (redirection out, proxy told, pin released; from its
log line), median / p99 / all. Prints a table; cleans up.

On eBPF and iptables-legacy nodes the agent compiles its eBPF object once at start (a few seconds of a
child process's CPU; cached in its state dir after): the label is written once that compile has ended,
as on a node whose agent has been running (the restart reuses the object). The agent's start itself is
`bench/ebpf_start.py`'s.

The agent's state dir (records, pins, sockets) and the objects dir are on a tmpfs (/dev/shm), as the
agent's `/var/run/headrace` is on a node; on a disk file system (ext4) each record written by rename
can start a writeback, which a node never pays.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.lab.agent_run import AgentRun
from node_agent.lab.netns import NetNS
from node_agent.lab.objects import ns_object, pod_object, write_object
from node_agent.lab.pod_cgroups import CGROUP2_ROOT, PodProcs, rmdir_cgroup

from bench.interrupts import stop_like_ctrl_c, uninterrupted


def scratch_dir(prefix: str) -> Path:
    """A fresh directory on a tmpfs (/dev/shm) where there is one, else in /tmp."""
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        tmpfs = any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in fh)
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if tmpfs else "/tmp"))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def wait_all_enrolled(agent: AgentRun, uids: list[str], t0: float, timeout: float) -> dict[str, float]:
    """Per pod: seconds from t0 (wall clock) to the agent's enrolled_at."""
    done: dict[str, float] = {}
    end = time.monotonic() + timeout
    while len(done) < len(uids) and time.monotonic() < end:
        status = agent.status()
        for uid in uids:
            row = status.get(uid, {})
            if uid not in done and row.get("state") == "enrolled":
                done[uid] = float(row["enrolled_at"]) - t0
        # the times are the agent's own (enrolled_at): polling faster only loads the agent, which encodes
        # every pod's row for each poll (~10 % of its interpreter's time in a 1000-pod wave at 10 polls/s)
        time.sleep(max(0.1, len(uids) / 2500))
    if len(done) < len(uids):
        raise RuntimeError(f"only {len(done)}/{len(uids)} pods enrolled within {timeout:.0f} s")
    return done


def wait_all_released(agent: AgentRun, uids: list[str], t0: float, timeout: float) -> dict[str, float]:
    """Per pod: seconds from t0 (wall clock) to the agent's log line of its removal (step `removed`: the
    redirection out, the proxy told, the pin released), once the agent holds none of them."""
    want = set(uids)
    end = time.monotonic() + timeout
    while held := [u for u, row in agent.status().items() if u in want and row.get("state") != "none"]:
        if time.monotonic() > end:
            raise RuntimeError(f"{len(held)}/{len(uids)} pods still held after {timeout:.0f} s")
        time.sleep(max(0.1, len(uids) / 2500))
    done: dict[str, float] = {}
    for line in agent.agent_log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step") == "removed" and rec.get("uid") in want:
            at = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
            if at >= t0:
                done[rec["uid"]] = at - t0
    if len(done) < len(uids):
        raise RuntimeError(f"only {len(done)}/{len(uids)} removals logged")
    return done


def reconcile_passes(agent: AgentRun) -> tuple[int, float]:
    """The agent's reconcile passes so far and an upper bound of the longest (histogram bucket)."""
    _, text = agent.http("/metrics")
    count, longest = 0, 0.0
    prev = 0.0
    for line in text.splitlines():
        if line.startswith("headrace_agent_reconcile_duration_seconds_count "):
            count = int(float(line.split()[1]))
        elif line.startswith("headrace_agent_reconcile_duration_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            value = float(line.rsplit(" ", 1)[1])
            if value > prev and le != "+Inf":
                longest = float(le)
            elif value > prev:
                longest = float("inf")
            prev = value
    return count, longest


BACKENDS = {  # bench name -> `headrace agent` flags
    "nftables": ["--backend", "nftables"],
    "iptables-nft": ["--backend", "iptables", "--iptables", "nft"],
    "iptables-legacy": ["--backend", "iptables", "--iptables", "legacy"],
    "ebpf": ["--backend", "ebpf"],
}


T = TypeVar("T")


def agent_cpu(proc: psutil.Process) -> float:
    """CPU seconds of the agent, the tools it ran and reaped, and its running children (the rules helper)."""
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system) + sum(
        c.user + c.system for c in _children(proc, lambda child: child.cpu_times()))


def agent_rss(proc: psutil.Process) -> float:
    """MiB resident in the agent and its running children (the rules helper)."""
    return float(proc.memory_info().rss + sum(m.rss for m in _children(proc, lambda c: c.memory_info()))) / 2**20


def _children(proc: psutil.Process, read: Callable[[psutil.Process], T]) -> list[T]:
    out = []
    for child in proc.children(recursive=True):
        try:
            out.append(read(child))
        except psutil.Error:  # ended meanwhile (a tool the agent ran)
            pass
    return out


def run_one(n: int, drift: float, agent_args: list[str] | None = None, *, backend: str = "iptables-legacy",
            settle: float = 5.0, window: float = 10.0) -> dict[str, float]:
    node = NetNS.create("hra-node-")
    pods = PodProcs()
    objects = scratch_dir("hra-bench-")
    proxy_cg = CGROUP2_ROOT / f"headrace-test-proxy-{uuid.uuid4().hex[:8]}"
    flags = list(BACKENDS[backend])
    if backend == "ebpf":
        proxy_cg.mkdir()
        flags += ["--proxy-cgroup", str(proxy_cg)]
    agent = AgentRun(node.path, objects, scratch_dir("hra-"),
                     extra=[*flags, "--drift-interval", str(drift), "--log-level", "info", *(agent_args or [])])
    try:
        write_object(objects, "ns.json", ns_object("bench", ambient=False))
        uids = []
        for i in range(n):
            uid = str(uuid.uuid4())
            proc_ = pods.pod(uid)
            if backend == "ebpf":  # TC needs an interface besides lo
                for argv in (["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                             ["link", "set", "eth0", "up"]):
                    subprocess.run(["nsenter", f"--net=/proc/{proc_.pid}/ns/net", "ip", *argv], check=True)
            write_object(objects, f"pod{i}.json",
                         pod_object("bench", f"p{i}", uid, [f"10.99.{i // 250}.{i % 250 + 2}"]))
            uids.append(uid)
        agent.start_proxy()
        if backend == "ebpf":
            assert agent.proxy is not None
            (proxy_cg / "cgroup.procs").write_text(str(agent.proxy.pid))
        agent.start_agent()
        if backend in ("ebpf", "iptables-legacy"):
            agent.wait_compiled()
        assert agent.agent is not None
        proc = psutil.Process(agent.agent.pid)
        assert agent.proxy is not None
        proxy = psutil.Process(agent.proxy.pid)
        time.sleep(1)
        cpu_start, proxy_start = agent_cpu(proc), agent_cpu(proxy)
        t0 = time.time()
        write_object(objects, "ns.json", ns_object("bench", ambient=True))
        lat = list(wait_all_enrolled(agent, uids, t0, 60 + n).values())
        enrol_cpu, proxy_cpu = agent_cpu(proc) - cpu_start, agent_cpu(proxy) - proxy_start
        time.sleep(settle)  # the first checks after the applies, the status annotations written back
        cpu0, w0 = agent_cpu(proc), time.monotonic()
        time.sleep(window)
        # the agent plus the tools it ran (iptables-save for drift checks), as % of one core
        idle_cpu = (agent_cpu(proc) - cpu0) / (time.monotonic() - w0) * 100
        rss = agent_rss(proc)
        agent.kill_agent(signal.SIGKILL)
        t1 = time.time()
        agent.start_agent()
        again = list(wait_all_enrolled(agent, uids, t1, 60 + n).values())
        passes, longest = reconcile_passes(agent)
        time.sleep(settle)  # the restarted agent's first checks of the pods it adopted
        t2 = time.time()
        write_object(objects, "ns.json", ns_object("bench", ambient=False))
        released = list(wait_all_released(agent, uids, t2, 60 + n).values())
        return {"first": min(lat), "proxy_cpu": proxy_cpu, "median": statistics.median(lat), "p99": p99(lat),
                "total": max(lat), "rss": rss,
                "cpu": idle_cpu, "enrol_cpu": enrol_cpu, "r_median": statistics.median(again),
                "r_p99": p99(again), "restart": max(again), "passes": passes, "longest": longest,
                "u_median": statistics.median(released), "u_p99": p99(released), "unlabel": max(released)}
    finally:
        with uninterrupted():
            agent.close()
            pods.close()
            if proxy_cg.exists():
                rmdir_cgroup(proxy_cg)
            node.delete()
            shutil.rmtree(objects, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", default="1,10,100")
    ap.add_argument("--backends", default="iptables-legacy",
                    help=f"comma-separated, side by side: {', '.join(BACKENDS)}")
    ap.add_argument("--drift-interval", type=float, default=1.0)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after enrolment before the idle window")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of the idle CPU window")
    ap.add_argument("--agent-args", default="", help="extra `headrace agent` flags (space separated)")
    args = ap.parse_args()
    counts = [int(x) for x in args.pods.split(",") if x.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {', '.join(unknown)}: expected {', '.join(BACKENDS)}")
    print(f"label → enrolled per pod (first, median, p99, all) and the agent's and the proxy's CPU seconds for it; "
          f"idle with all enrolled "
          f"(RSS, CPU incl. tools, {args.window:g} s window {args.settle:g} s after); after a SIGKILL + restart: per "
          f"pod back to enrolled (median, p99, all) and reconcile passes (count, longest ≤); then, "
          f"{args.settle:g} s later, the label removed: per pod until released (median, p99, all); drift interval "
          f"{args.drift_interval:g} s")
    print(f"{'backend':>15}  {'pods':>5}  {'first s':>7}  {'median s':>9}  {'p99 s':>7}  {'all s':>7}  "
          f"{'enrol CPU s':>11}  {'proxy CPU s':>11}  "
          f"{'idle RSS MiB':>12}  {'idle CPU %':>10}  {'restart median s':>16}  {'p99 s':>7}  {'all s':>7}  "
          f"{'passes':>6}  {'longest ≤ s':>11}  {'unlabel median s':>16}  {'p99 s':>7}  {'all s':>7}")
    stop_like_ctrl_c()
    for n in counts:
        for backend in backends:
            try:
                r = run_one(n, args.drift_interval, args.agent_args.split(), backend=backend, settle=args.settle,
                            window=args.window)
            except KeyboardInterrupt:
                print("interrupted: cleaned up", file=sys.stderr)
                return 130
            print(f"{backend:>15}  {n:>5}  {r['first']:>7.3f}  {r['median']:>9.3f}  {r['p99']:>7.3f}  "
                  f"{r['total']:>7.3f}  {r['enrol_cpu']:>11.2f}  {r['proxy_cpu']:>11.2f}  {r['rss']:>12.1f}  "
                  f"{r['cpu']:>10.2f}  {r['r_median']:>16.3f}  "
                  f"{r['r_p99']:>7.3f}  {r['restart']:>7.3f}  {r['passes']:>6}  {r['longest']:>11.3f}  "
                  f"{r['u_median']:>16.3f}  {r['u_p99']:>7.3f}  {r['unlabel']:>7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
