"""Agent enrolment benchmark: label change → pods enrolled, idle cost, and re-adoption after a restart.

    .venv/bin/python bench/agent_enrol.py [--pods 1,10,100] [--drift-interval 2]

For each pod count a node netns gets N pod-like processes (each in a fresh netns, inside a kubelet-style
cgroup v2 directory `.../pod<uid>`), their Pod objects in an objects dir, the reference proxy and
`headrace agent --backend iptables` in the node netns. Then the namespace is labelled ambient and the
agent's status is polled: per-pod time from the label write to `enrolled` (rules in and proxy ack),
median / p99 / total (per pod from the agent's `enrolled_at`). With all pods enrolled: the agent's RSS
and CPU over 5 s idle (drift checks and the iptables tools it runs included). Finally the agent is
SIGKILLed and restarted: per pod, the time from the restart until it is enrolled again (adoption: rules
checked, not re-applied; fresh snapshot to the proxy), median / p99 / all, and the new agent's reconcile
passes until then (count, longest pass, from its `headrace_agent_reconcile_duration_seconds`). Prints a
table; cleans up.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.lab.agent_run import AgentRun
from node_agent.lab.netns import NetNS
from node_agent.lab.objects import ns_object, pod_object, write_object
from node_agent.lab.pod_cgroups import PodProcs


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
        time.sleep(0.1)  # the times are the agent's own (enrolled_at): polling faster only loads the agent
    if len(done) < len(uids):
        raise RuntimeError(f"only {len(done)}/{len(uids)} pods enrolled within {timeout:.0f} s")
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


def run_one(n: int, drift: float, agent_args: list[str] | None = None) -> dict[str, float]:
    node = NetNS.create("hra-node-")
    pods = PodProcs()
    objects = Path(tempfile.mkdtemp(prefix="hra-bench-", dir="/tmp"))
    agent = AgentRun(node.path, objects, extra=["--drift-interval", str(drift), "--log-level", "info",
                                                   *(agent_args or [])])
    try:
        write_object(objects, "ns.json", ns_object("bench", ambient=False))
        uids = []
        for i in range(n):
            uid = str(uuid.uuid4())
            pods.pod(uid)
            write_object(objects, f"pod{i}.json",
                         pod_object("bench", f"p{i}", uid, [f"10.99.{i // 250}.{i % 250 + 2}"]))
            uids.append(uid)
        agent.start_proxy()
        agent.start_agent()
        t0 = time.time()
        write_object(objects, "ns.json", ns_object("bench", ambient=True))
        lat = list(wait_all_enrolled(agent, uids, t0, 60 + n).values())
        assert agent.agent is not None
        proc = psutil.Process(agent.agent.pid)
        time.sleep(2)
        cpu0 = proc.cpu_times()
        time.sleep(5)
        cpu1 = proc.cpu_times()
        # the agent plus the tools it ran (iptables-save for drift checks), as % of one core
        idle_cpu = (sum(cpu1[:4]) - sum(cpu0[:4])) / 5 * 100
        rss = proc.memory_info().rss / 2**20
        agent.kill_agent(signal.SIGKILL)
        t1 = time.time()
        agent.start_agent()
        again = list(wait_all_enrolled(agent, uids, t1, 60 + n).values())
        passes, longest = reconcile_passes(agent)
        return {"median": statistics.median(lat), "p99": p99(lat), "total": max(lat), "rss": rss,
                "cpu": idle_cpu, "r_median": statistics.median(again), "r_p99": p99(again),
                "restart": max(again), "passes": passes, "longest": longest}
    finally:
        agent.close()
        pods.close()
        node.delete()
        shutil.rmtree(objects, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", default="1,10,100")
    ap.add_argument("--drift-interval", type=float, default=2.0)
    ap.add_argument("--agent-args", default="", help="extra `headrace agent` flags (space separated)")
    args = ap.parse_args()
    counts = [int(x) for x in args.pods.split(",") if x.strip()]
    print("label → enrolled per pod (median, p99, all); idle with all enrolled (RSS, CPU incl. tools); after a "
          "SIGKILL + restart: per pod back to enrolled (median, p99, all) and reconcile passes (count, longest ≤)")
    print(f"{'pods':>5}  {'median s':>9}  {'p99 s':>7}  {'all s':>7}  {'idle RSS MiB':>12}  {'idle CPU %':>10}  "
          f"{'restart median s':>16}  {'p99 s':>7}  {'all s':>7}  {'passes':>6}  {'longest ≤ s':>11}")
    for n in counts:
        r = run_one(n, args.drift_interval, args.agent_args.split())
        print(f"{n:>5}  {r['median']:>9.3f}  {r['p99']:>7.3f}  {r['total']:>7.3f}  {r['rss']:>12.1f}  "
              f"{r['cpu']:>10.1f}  {r['r_median']:>16.3f}  {r['r_p99']:>7.3f}  {r['restart']:>7.3f}  "
              f"{r['passes']:>6}  {r['longest']:>11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
