"""Agent idle CPU on an iptables node: drift checks polled by iptables-save vs polled in-process (legacy:
python-iptables fingerprint; nft: the netns' ruleset generation) vs on change (nf_tables notifications;
on legacy hosts the events mode polls in-process, as legacy tables announce nothing).

    .venv/bin/python bench/agent_idle_cpu.py [--pods 100] [--drift-interval 2] [--window 5] [--windows 3]
                                             [--rounds 2] [--ipv6] [--baseline] [--iptables legacy|nft]

A node netns gets N pod-like processes (each in a fresh netns and a kubelet-style cgroup), their Pod
objects in an ambient namespace, the reference proxy and `headrace agent --backend iptables --iptables
FLAVOUR` (default legacy). The same node is measured with the agent in three drift-check modes,
alternating (rounds): polled (`--no-drift-events`) with HEADRACE_IPTC_CHECK=0 (every check runs
`iptables-FLAVOUR-save` per family per pod), polled with the default in-process check, and the default
(events: a pod is checked when its netns announces a change, every pod every `--drift-backstop`).
Each time the agent is (re)started (SIGKILL in
between: the new one adopts the pods), waits until all pods are enrolled and the checks have settled
(3 drift intervals), then its CPU (own + reaped children, i.e. the iptables tools) is sampled over
`--windows` windows of `--window` seconds.
Prints per pod count: the median (and range) of the windows per mode, the ratio, and the check counts per
second from the agent's `headrace_agent_iptables_checks_total{path}` (proof of which path ran), and with
`--baseline` the agent's floor (drift interval one hour: no drift checks at all). Cleans up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.lab.agent_run import AgentRun
from node_agent.lab.netns import NetNS
from node_agent.lab.objects import ns_object, pod_object, write_object
from node_agent.lab.pod_cgroups import PodProcs

from bench.agent_enrol import wait_all_enrolled

MODES = {"iptables-save": "0", "in-process": "1", "events": "1"}  # HEADRACE_IPTC_CHECK per mode
POLLED = ("iptables-save", "in-process")  # run with --no-drift-events: every pod polled every drift interval
BASELINE = "no drift checks"  # --baseline: the agent with a drift interval of an hour (its idle floor)
ENV = "HEADRACE_IPTC_CHECK"


@dataclass
class ModeResult:
    samples: list[float] = field(default_factory=list)  # CPU % per window
    rates: dict[str, list[float]] = field(default_factory=lambda: {"in_process": [], "iptables_save": []})


def check_counts(agent: AgentRun) -> dict[str, float]:
    """headrace_agent_iptables_checks_total by path."""
    _, text = agent.http("/metrics")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('headrace_agent_iptables_checks_total{path="'):
            path = line.split('path="', 1)[1].split('"', 1)[0]
            out[path] = float(line.rsplit(" ", 1)[1])
    return out


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def measure(agent: AgentRun, uids: list[str], drift: float, window: float, windows: int, into: ModeResult) -> None:
    agent.start_agent()
    wait_all_enrolled(agent, uids, time.time(), 60 + len(uids))
    time.sleep(3 * drift)  # first checks after adoption are full compares (they record fingerprints)
    assert agent.agent is not None
    proc = psutil.Process(agent.agent.pid)
    counts0 = check_counts(agent)
    t0 = time.monotonic()
    samples: list[float] = []
    for _ in range(windows):
        c0, w0 = cpu_seconds(proc), time.monotonic()
        time.sleep(window)
        samples.append((cpu_seconds(proc) - c0) / (time.monotonic() - w0) * 100)
    elapsed = time.monotonic() - t0
    counts1 = check_counts(agent)
    for path, values in into.rates.items():
        values.append((counts1.get(path, 0.0) - counts0.get(path, 0.0)) / elapsed)
    into.samples.extend(samples)
    agent.kill_agent(signal.SIGKILL)


def run_one(n: int, args: argparse.Namespace) -> dict[str, ModeResult]:
    node = NetNS.create("hra-node-")
    pods = PodProcs()
    objects = Path(tempfile.mkdtemp(prefix="hra-idle-", dir="/tmp"))
    agent = AgentRun(node.path, objects)
    saved_env = os.environ.get(ENV)
    modes = {**MODES, BASELINE: "1"} if args.baseline else dict(MODES)
    results = {m: ModeResult() for m in modes}
    try:
        write_object(objects, "ns.json", ns_object("bench", ambient=True))
        uids = []
        for i in range(n):
            uid = str(uuid.uuid4())
            pods.pod(uid)
            ips = [f"10.99.{i // 250}.{i % 250 + 2}"] + ([f"fd00:99::{i + 2:x}"] if args.ipv6 else [])
            write_object(objects, f"pod{i}.json", pod_object("bench", f"p{i}", uid, ips))
            uids.append(uid)
        agent.start_proxy()
        for _ in range(args.rounds):
            for mode, value in modes.items():
                os.environ[ENV] = value  # the agent inherits the environment
                drift = 3600.0 if mode == BASELINE else args.drift_interval
                agent.extra = ["--iptables", args.iptables, "--drift-interval", str(drift), "--log-level", "info",
                               *(["--no-drift-events"] if mode in POLLED else [])]
                measure(agent, uids, min(drift, args.drift_interval), args.window, args.windows, results[mode])
        return results
    finally:
        if saved_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved_env
        agent.close()
        pods.close()
        node.delete()
        shutil.rmtree(objects, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", default="100", help="comma-separated pod counts")
    ap.add_argument("--drift-interval", type=float, default=2.0)
    ap.add_argument("--window", type=float, default=5.0, help="seconds per CPU sample")
    ap.add_argument("--windows", type=int, default=3, help="samples per agent run")
    ap.add_argument("--rounds", type=int, default=2, help="agent runs per mode (modes alternate)")
    ap.add_argument("--ipv6", action="store_true", help="dual-stack pods (two families checked per pod)")
    ap.add_argument("--baseline", action="store_true", help="also measure the agent without drift checks")
    ap.add_argument("--iptables", choices=("legacy", "nft"), default="legacy", help="the node's iptables flavour")
    args = ap.parse_args()
    counts = [int(x) for x in args.pods.split(",") if x.strip()]
    print(f"agent idle CPU (% of one core, agent + reaped iptables tools), {args.iptables} iptables, drift interval "
          f"{args.drift_interval:g} s, {'dual-stack' if args.ipv6 else 'IPv4'} pods; median (min-max) of "
          f"{args.rounds}x{args.windows} windows of {args.window:g} s per mode; checks/s from the agent's metrics")
    print(f"{'pods':>5}  {'iptables-save CPU %':>22}  {'in-process CPU %':>20}  {'ratio':>6}  "
          f"{'save mode: save/s':>17}  {'in-proc mode: in-proc/s':>23}  {'save/s':>6}  {'events CPU %':>16}  "
          f"{'events: checks/s':>16}" + (f"  {'no drift checks CPU %':>22}" if args.baseline else ""))
    for n in counts:
        r = run_one(n, args)
        cells = []
        for mode in POLLED:
            s = r[mode].samples
            cells.append((statistics.median(s), min(s), max(s)))
        ratio = cells[0][0] / cells[1][0] if cells[1][0] > 0 else float("inf")
        rates = {(m, p): statistics.median(v) for m, res in r.items() for p, v in res.rates.items()}
        print(f"{n:>5}  {cells[0][0]:>8.1f} ({cells[0][1]:.1f}-{cells[0][2]:.1f}){'':>2}  "
              f"{cells[1][0]:>6.1f} ({cells[1][1]:.1f}-{cells[1][2]:.1f}){'':>2}  {ratio:>6.1f}  "
              f"{rates['iptables-save', 'iptables_save']:>17.1f}  {rates['in-process', 'in_process']:>23.1f}  "
              f"{rates['in-process', 'iptables_save']:>6.1f}", end="")
        e = r["events"].samples
        ev_rate = rates["events", "in_process"] + rates["events", "iptables_save"]
        print(f"  {statistics.median(e):>6.2f} ({min(e):.2f}-{max(e):.2f})  {ev_rate:>16.2f}", end="")
        if args.baseline:
            b = r[BASELINE].samples
            print(f"  {statistics.median(b):>8.1f} ({min(b):.1f}-{max(b):.1f}){'':>4}", end="")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
