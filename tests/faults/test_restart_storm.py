"""The agent and the reference proxy SIGKILLed at random (seeded) points of ADD storms on a simulated node
(bridge + host-local + headrace-cni, pods in kubelet-like cgroups), on each backend, for a few rounds.

After every round: every ambient pod whose ADD succeeded is enrolled and redirected, with exactly the rules
(or programs) of every other pod (none missing, none twice); the pins under the state dir are exactly the
enrolled pods (one bind mount each); no cgroup, bpffs object or pin is left of a pod whose ADD failed; and
clients looping from enrolled pods through the proxy while the agent is SIGKILLed and restarted see no
failed connection (a restarted agent never hands the proxy a snapshot without its workloads). `headrace
status`, asked every 0.1 s during the storm, answers within HEADRACE_STATUS_P95_LIMIT (p95, default 0.2 s)
except while the restarted agent is still starting (those answers are reported, not held to it).

HEADRACE_FAULT_SEED, HEADRACE_FAULT_ROUNDS and HEADRACE_FAULT_PODS change the seed (default 12), the rounds
per backend (default 2 on iptables, 1 on nftables and on eBPF, whose agent start compiles its programs) and the pods per
storm (50).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from node_agent.lab.simnode import Pod, SimNode
from node_agent.lab.traffic import tcp_request

from cni.rules.saved import parse_save
from tests.faults.fault_report import record
from tests.kernel.agent_kit import iptables_save, node_agent, wait_for
from tests.kernel.test_backend_parity import BACKENDS, PORT, ParityRun, _ebpf_problems, ebpf_state, ours, start_app

pytestmark = [pytest.mark.faults, pytest.mark.kernel]

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
SEED = int(os.environ.get("HEADRACE_FAULT_SEED", "12"))
ROUNDS = {"iptables": 2, "nftables": 1, "ebpf": 1}
PODS = int(os.environ.get("HEADRACE_FAULT_PODS", "50"))
STATUS_P95_LIMIT = float(os.environ.get("HEADRACE_STATUS_P95_LIMIT", "0.2"))


def rounds(backend: str) -> int:
    return int(os.environ.get("HEADRACE_FAULT_ROUNDS", "0")) or ROUNDS[backend]


class StormRun(ParityRun):
    """ParityRun that waits longer for a slow start (the eBPF agent compiles its programs at start)."""

    def start_agent(self) -> None:
        try:
            super().start_agent()
        except TimeoutError:
            self.wait_ready(90, "agent ready (slow start)")


STATUS_WATCH = """
import sys, time
from node_agent.serve.status_client import StatusError, query
while True:
    started = time.monotonic()
    try:
        query(sys.argv[1], 2.0)
    except StatusError:
        pass  # the agent is down (killed) right now
    else:
        print(started, time.monotonic() - started, flush=True)
    time.sleep(0.1)
"""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "ebpf" and _ebpf_problems():
        pytest.skip(f"eBPF cannot run here: {'; '.join(_ebpf_problems())}")
    return name


@pytest.fixture
def env(tmp_path: Path, backend: str) -> Iterator[tuple[SimNode, ParityRun, list[subprocess.Popen[bytes]]]]:
    node = SimNode.create(tmp_path / "node", headrace={"backend": backend}, pod_cgroups=True)
    try:
        with node_agent(node, StormRun) as (agent, apps):
            agent.proxy_cgroup = node.proxy_cgroup()
            agent.use_backend(backend)
            yield node, agent, apps
    finally:
        node.close()


class Storm:
    """One round: PODS ambient ADDs, 6 at a time; the agent (and maybe the proxy) killed after `kill_at` of
    them finished, restarted after `down` seconds."""

    def __init__(self, node: SimNode, agent: ParityRun, rng: random.Random, round_no: int) -> None:
        self.node, self.agent, self.rng, self.round_no = node, agent, rng, round_no
        self.kill_at = rng.randrange(5, max(6, PODS - 5))
        self.kill_proxy = rng.random() < 0.5
        self.down = rng.uniform(0.0, 0.6)
        self.ok: list[Pod] = []
        self.failed = 0
        self._done = 0
        self._lock = threading.Lock()
        self._killed = threading.Event()
        self.restarting = (0.0, 0.0)  # from the kill until the new agent is ready (CLOCK_MONOTONIC)
        self.status_times: list[float] = []  # requests answered by a running agent
        self.status_starting: list[float] = []  # requests the new agent answered while it was starting

    def _add(self, i: int) -> None:
        try:
            pod = self.node.add_pod("mesh", f"r{self.round_no}-p{i}")
        except Exception:
            with self._lock:
                self.failed += 1
                self._done += 1
            return
        with self._lock:
            self.ok.append(pod)
            self._done += 1
            kill = self._done >= self.kill_at and not self._killed.is_set()
            if kill:
                self._killed.set()
        if kill:
            self._restart()

    def _restart(self) -> None:
        self.restarting = (time.monotonic(), float("inf"))
        self.agent.kill_agent(signal.SIGKILL)
        if self.kill_proxy and self.agent.proxy is not None:
            self.agent.proxy.kill()
            self.agent.proxy.wait(10)
        time.sleep(self.down)
        if self.kill_proxy:
            self.agent.start_proxy()
        self.agent.start_agent()
        self.restarting = (self.restarting[0], time.monotonic())

    def run(self) -> None:
        # `headrace status` asked every 0.1 s during the storm, from a process of its own (this one is busy)
        watcher = subprocess.Popen([sys.executable, "-c", STATUS_WATCH, self.agent.cni_socket],
                                   stdout=subprocess.PIPE, text=True)
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(self._add, range(PODS)))
        watcher.terminate()
        out, _ = watcher.communicate(timeout=10)
        # status is promised within the limit under enrolment load, not while the restarted agent is still
        # importing and adopting (a C extension's import holds the GIL)
        for line in out.splitlines():
            started, took = (float(x) for x in line.split())
            starting = self.restarting[0] <= started <= self.restarting[1]
            (self.status_starting if starting else self.status_times).append(took)

    def status_p95(self) -> float:
        times = sorted(self.status_times)
        return times[int(len(times) * 0.95)] if times else 0.0


def iptables_tables(pod: Pod) -> list[list[str]]:
    """Our rule lines per flavour, family and table (a duplicate is a line twice in one table)."""
    out = []
    for flavour in ("nft", "legacy"):
        for family in (4, 6):
            for table in parse_save(iptables_save(pod.netns.path, family, flavour)).values():
                out.append([line for _c, line in table.rules if "HEADRACE" in line])
    return out


def invariants(node: SimNode, agent: ParityRun, backend: str, pods: list[Pod]) -> list[str]:
    problems: list[str] = []
    status = agent.status()
    uids = {p.uid for p in pods}
    reference: list[str] | None = None
    for pod in pods:
        row = status.get(pod.uid) or {}
        if row.get("state") != "enrolled":
            problems.append(f"{pod.name}: ADD succeeded but state is {row.get('state')!r} ({row.get('reason')})")
        state = ours(pod, backend)
        if not state:
            problems.append(f"{pod.name}: ADD succeeded but nothing of ours redirects it")
        # nftables: one table, replaced whole (a doubled rule shows as a difference from the other pods)
        groups = [ebpf_state(pod)] if backend == "ebpf" else [] if backend == "nftables" else iptables_tables(pod)
        if any(len(set(g)) != len(g) for g in groups):
            problems.append(f"{pod.name}: duplicate rules/programs")
        reference = reference if reference is not None else state
        if state != reference:
            problems.append(f"{pod.name}: its redirection differs from the other pods'")
    pins = {p.name for p in (node.state_dir / "netns").iterdir()} if (node.state_dir / "netns").is_dir() else set()
    if pins != uids:
        problems.append(f"pins {len(pins)} != enrolled pods {len(uids)} (extra {sorted(pins - uids)[:3]}, "
                        f"missing {sorted(uids - pins)[:3]})")
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        mounts = [line.split()[1] for line in fh if line.split()[1].startswith(str(node.state_dir / "netns") + "/")]
    if len(mounts) != len(set(mounts)) or {Path(m).name for m in mounts} != uids:
        problems.append(f"pin mounts {len(mounts)} do not match the enrolled pods {len(uids)} one to one")
    kubepods = node.cgroup_base / "kubepods"
    cgroups = {p.name.removeprefix("pod") for p in kubepods.iterdir() if p.is_dir()} if kubepods.is_dir() else set()
    if not cgroups <= uids | {node.pods[u].uid for u in node.pods}:
        problems.append(f"pod cgroups left of failed ADDs: {sorted(cgroups - uids)[:3]}")
    bpf = node.state_dir / "bpf"
    objects = {p.name for p in bpf.iterdir() if p.is_dir() and len(p.name) > 30} if bpf.is_dir() else set()
    if not objects <= uids:
        problems.append(f"bpffs objects of pods not enrolled: {sorted(objects - uids)[:3]}")
    return problems


def not_enrolled(agent: ParityRun, pods: list[Pod]) -> str:
    """Each pod that is not enrolled, its state and reason, and the agent's last log lines naming it."""
    status = agent.status()
    log = agent.agent_log().splitlines()
    out = []
    for pod in pods:
        row = status.get(pod.uid) or {}
        if row.get("state") != "enrolled":
            lines = [line for line in log if pod.uid in line][-4:]
            out.append(f"{pod.name} {row.get('state')!r} ({row.get('reason')}): " + " | ".join(lines))
    proxy = agent.proxy
    if proxy is not None:
        alive = "running" if proxy.poll() is None else f"exited {proxy.returncode}"
        out.append(f"proxy {alive}, its last lines: " + " | ".join(agent.proxy_log().splitlines()[-3:]))
    return "; ".join(out)


def loop_clients(pods: list[Pod], server: Pod, stop: threading.Event, out: dict[str, Any]) -> None:
    while not stop.is_set():
        for pod in pods:
            out["tries"] += 1
            try:
                reply = tcp_request(pod.netns.path, server.ipv4, PORT, b"loop", timeout=3, cgroup=pod.cgroup)
                if reply != b"server|loop":
                    out["failures"].append(f"{pod.name}: bad reply")
            except OSError as exc:
                out["failures"].append(f"{pod.name}: {exc}")


def test_sigkill_during_add_storms(env: Any, backend: str) -> None:
    node, agent, apps = env
    rng = random.Random(f"{SEED}-{backend}")
    node.add_namespace("mesh", AMBIENT)
    node.add_namespace("plain")
    server = node.add_pod("plain", "server")
    start_app(server.netns.path, "server", apps)
    agent.start_proxy()
    agent.start_agent()
    total_violations = 0
    all_ok: list[Pod] = []

    def all_enrolled() -> bool:
        return all(agent.pod_state(p.uid) == "enrolled" for p in all_ok)

    def wait_enrolled(what: str) -> None:
        try:
            wait_for(all_enrolled, 60, what)
        except TimeoutError:
            raise AssertionError(f"{what}: not enrolled after 60 s: {not_enrolled(agent, all_ok)}") from None

    for round_no in range(rounds(backend)):
        storm = Storm(node, agent, rng, round_no)
        storm.run()
        all_ok += storm.ok
        wait_enrolled("enrolled after the storm")
        problems = invariants(node, agent, backend, all_ok)
        # the target is 50 ms; the margin is for this shared machine (the unit test proves the status path
        # never waits for the reconcile lock; what is left is CPU and GIL share under a storm)
        if storm.status_p95() > STATUS_P95_LIMIT:
            problems.append(f"status during the storm: p95 {storm.status_p95() * 1000:.0f} ms")

        # clients loop through enrolled pods (and the proxy) while the agent is SIGKILLed and restarted
        clients = rng.sample(all_ok, min(4, len(all_ok)))
        stop = threading.Event()
        seen: dict[str, Any] = {"tries": 0, "failures": []}
        for pod in clients:
            assert tcp_request(pod.netns.path, server.ipv4, PORT, b"warm", timeout=5, cgroup=pod.cgroup)
        loop = threading.Thread(target=loop_clients, args=(clients, server, stop, seen), daemon=True)
        loop.start()
        time.sleep(0.5)
        agent.kill_agent(signal.SIGKILL)
        time.sleep(rng.uniform(0.0, 0.5))
        agent.start_agent()
        wait_enrolled("enrolled after restart")
        time.sleep(1.5)  # the new agent's first snapshot and drift passes
        stop.set()
        loop.join(30)
        problems += [f"client loop: {f}" for f in seen["failures"][:5]]
        total_violations += len(problems)
        record(f"SIGKILL agent{' + proxy' if storm.kill_proxy else ''} during a {PODS}-pod ADD storm ({backend})",
               1, len(problems), f"kill after {storm.kill_at} ADDs, {len(storm.ok)} ok, {storm.failed} failed; "
               f"client loop {seen['tries']} connections; status p95 {storm.status_p95() * 1000:.0f} ms, max "
               f"{max(storm.status_times, default=0) * 1000:.0f} ms over {len(storm.status_times)} requests (and "
               f"{len(storm.status_starting)} while the agent was starting, max "
               f"{max(storm.status_starting, default=0) * 1000:.0f} ms)")
        assert not problems, f"round {round_no}: " + "; ".join(problems[:8])
    assert total_violations == 0
