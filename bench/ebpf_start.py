"""eBPF agent start-up: time to the plugin socket, and restart → converged.

    .venv/bin/python bench/ebpf_start.py [--pods 20,250] [--warm-runs 3]

1. Time from starting `headrace agent` to its plugin socket accepting a connection (the agent listens
   before its start-up imports; a request waits in the backlog), to the first request (STATUS) answered,
   and to the compiled eBPF object being in <state-dir>/bpf-cache: `--backend auto` with nothing cached
   (compiles in the background, serves at once), `--backend ebpf` with nothing cached (compiles before
   serving), then `--warm-runs` times `ebpf` with the object cached, `iptables`, and a bare
   `headrace --help` (what any start costs on this machine).
2. For each pod count: N ambient pod-like processes (each in a fresh netns, in a kubelet-style cgroup), the
   reference proxy in a cgroup of its own (`--proxy-cgroup`), the agent on eBPF; all enrolled, then the
   agent is SIGKILLed and restarted: time from the restart until every pod is `enrolled` again (adopted
   from its pins: programs checked, not reloaded), and whether that run compiled or read the cache.
Prints a table; cleans up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.lab.agent_run import AgentRun
from node_agent.lab.netns import NetNS
from node_agent.lab.objects import ns_object, pod_object, write_object
from node_agent.lab.pod_cgroups import CGROUP2_ROOT, PodProcs, rmdir_cgroup
from node_agent.lab.processes import HEADRACE
from node_agent.serve.status_client import StatusError, query


def socket_up(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def time_to_socket(node: NetNS, base: Path, objects: Path, backend: str = "ebpf") -> tuple[float, float, float]:
    """Seconds from spawning the agent to its plugin socket accepting a connection, to the agent answering
    a request on it (STATUS), and (eBPF) to the compiled object being in the cache; then it is stopped."""
    sock = base / "cni.sock"
    sock.unlink(missing_ok=True)
    cmd = ["nsenter", f"--net={node.path}", HEADRACE, "agent", "--objects-dir", str(objects),
           "--state-dir", str(base / "state"), "--cni-socket", str(sock), "--proxy-socket", str(base / "proxy.sock"),
           "--backend", backend, "--log-level", "warning"]
    log = base / f"agent-{backend}.log"
    t0 = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        while not socket_up(str(sock)):
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited with {proc.returncode}")
            if time.monotonic() - t0 > 120:
                raise RuntimeError("no socket within 120 s")
            time.sleep(0.005)
        up = time.monotonic() - t0
        try:
            query(str(sock), timeout=120)
        except StatusError as e:
            raise RuntimeError(f"{e}; agent log: {log.read_text()[-2000:]}") from e
        answered = time.monotonic() - t0
        while backend in ("ebpf", "auto") and not list((base / "state" / "bpf-cache").glob("*.bpfobj.json")):
            if time.monotonic() - t0 > 300:
                raise RuntimeError("no compiled object within 300 s")
            time.sleep(0.01)
        return up, answered, time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def interpreter_floor() -> tuple[float, float, float]:
    """What any start costs here (the machine's load included): the `headrace` entry point doing nothing."""
    t0 = time.monotonic()
    subprocess.run([HEADRACE, "--help"], stdout=subprocess.DEVNULL, check=True)
    took = time.monotonic() - t0
    return took, took, took


def wait_enrolled(agent: AgentRun, uids: list[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = agent.status()
        if all(status.get(u, {}).get("state") == "enrolled" and status[u].get("backend") == "ebpf" for u in uids):
            return
        time.sleep(0.01)
    row = next((r for u, r in agent.status().items() if u in uids and r.get("state") != "enrolled"), {})
    raise RuntimeError(f"not all {len(uids)} pods enrolled on eBPF within {timeout:.0f} s (e.g. {row})")


def restart_converged(n: int) -> float:
    node = NetNS.create("hre-node-")
    pods = PodProcs()
    objects = Path(tempfile.mkdtemp(prefix="hre-bench-", dir="/tmp"))
    proxy_cg = CGROUP2_ROOT / f"headrace-test-proxy-{uuid.uuid4().hex[:8]}"
    proxy_cg.mkdir()
    agent = AgentRun(node.path, objects, extra=["--backend", "ebpf", "--proxy-cgroup", str(proxy_cg),
                                                "--drift-interval", "2", "--log-level", "info"])
    try:
        write_object(objects, "ns.json", ns_object("bench", ambient=True))
        uids = []
        for i in range(n):
            uid = str(uuid.uuid4())
            proc = pods.pod(uid)
            veth = ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]
            for argv in (veth, ["link", "set", "eth0", "up"]):  # TC needs an interface besides lo
                subprocess.run(["nsenter", f"--net=/proc/{proc.pid}/ns/net", "ip", *argv], check=True)
            ip = f"10.99.{i // 250}.{i % 250 + 2}"
            write_object(objects, f"pod{i}.json", pod_object("bench", f"p{i}", uid, [ip]))
            uids.append(uid)
        agent.start_proxy()
        assert agent.proxy is not None
        (proxy_cg / "cgroup.procs").write_text(str(agent.proxy.pid))
        agent.start_agent()
        wait_enrolled(agent, uids, 120 + n)
        agent.kill_agent(signal.SIGKILL)
        t0 = time.monotonic()
        agent.start_agent()
        wait_enrolled(agent, uids, 120 + n)
        took = time.monotonic() - t0
        return took
    finally:
        agent.close()
        pods.close()
        rmdir_cgroup(proxy_cg)
        node.delete()
        shutil.rmtree(objects, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", default="20,250")
    ap.add_argument("--warm-runs", type=int, default=3)
    args = ap.parse_args()
    node = NetNS.create("hre-sock-")
    base = Path(tempfile.mkdtemp(prefix="hre-sock-", dir="/tmp"))
    cache = base / "shared-cache"
    try:
        objects = base / "objects"
        objects.mkdir()
        auto_base = base / "auto"
        auto_base.mkdir()
        cold_auto = time_to_socket(node, auto_base, objects, "auto")
        cold = time_to_socket(node, base, objects)
        warm = [time_to_socket(node, base, objects) for _ in range(args.warm_runs)]
        ipt = [time_to_socket(node, base, objects, "iptables") for _ in range(args.warm_runs)]
        floor = [interpreter_floor() for _ in range(args.warm_runs)]
        rows = [("auto, cold (bg compile)", [cold_auto]), ("ebpf, cold (compiles)", [cold]),
                ("ebpf, object cached", warm), ("iptables", ipt), ("floor: headrace --help", floor)]
        shutil.copytree(base / "state" / "bpf-cache", cache)
        print("agent start → plugin socket accepting, → first request answered, → eBPF object ready "
              "(median of the runs, max)")
        print(f"{'agent':<23}  {'runs':>4}  {'socket s':>8}  {'max':>6}  {'answered s':>10}  {'max':>6}  "
              f"{'object s':>8}")
        for label, runs in rows:
            ups, answers, ready = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]
            obj = f"{statistics.median(ready):>8.3f}" if label.startswith(("ebpf", "auto")) else f"{'-':>8}"
            print(f"{label:<23}  {len(runs):>4}  {statistics.median(ups):>8.3f}  {max(ups):>6.3f}  "
                  f"{statistics.median(answers):>10.3f}  {max(answers):>6.3f}  {obj}", flush=True)
        print("SIGKILL + restart → every pod enrolled again on eBPF")
        print(f"{'pods':>5}  {'restart → converged s':>21}")
        os.environ["HEADRACE_BPF_CACHE_DIR"] = str(cache)  # the agents below share the object compiled above
        for n in [int(x) for x in args.pods.split(",") if x.strip()]:
            print(f"{n:>5}  {restart_converged(n):>21.3f}", flush=True)
    finally:
        for state in (base / "state", base / "auto" / "state"):
            subprocess.run(["umount", str(state / "bpf")], capture_output=True, check=False)
        node.delete()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
