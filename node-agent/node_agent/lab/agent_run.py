"""The node agent (`headrace agent`) and the reference proxy (`headrace proxy`) run as real processes inside
a node netns (`nsenter --net=NODE`), each with a private state dir, sockets and logs; the agent's status,
metrics and health are read back. Used by the agent benchmarks and the agent kernel tests.

    node = NetNS.create("hra-node-"); pods = PodProcs(); agent = AgentRun(node.path, objects_dir)
    write_object(objects_dir, "ns.json", ns_object("app", ambient=True)); agent.start_proxy(); agent.start_agent()
    wait_for(lambda: agent.pod_state(uid) == "enrolled", 20, "enrolled"); agent.close(); pods.close()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node_agent.backends.ebpf import loader, object_cache
from node_agent.lab.netns import run_in
from node_agent.lab.processes import HEADRACE
from node_agent.netns.pin import NetnsPins
from node_agent.serve.status_client import StatusError, query


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition", poll: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something true, and return that; TimeoutError after ``timeout`` s."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = cond()
        if last:
            return last
        time.sleep(poll)
    raise TimeoutError(f"timed out waiting for {what} (last: {last!r})")


class AgentRun:
    """`headrace agent` (and optionally `headrace proxy`) inside a node netns, with a private state dir."""

    def __init__(
        self,
        node_path: str,
        objects_dir: Path,
        base: Path | None = None,
        *,
        state_dir: Path | None = None,
        cni_socket: Path | None = None,
        proxy_socket: Path | None = None,
        zds_socket: Path | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.node_path = node_path
        self.objects_dir = objects_dir
        self.base = base or Path(tempfile.mkdtemp(prefix="hra-", dir="/tmp"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.state = state_dir or self.base / "state"
        self.cni_socket = str(cni_socket or self.base / "cni.sock")
        self.proxy_socket = str(proxy_socket or self.base / "proxy.sock")
        self.zds_socket = str(zds_socket or self.base / "zds.sock")
        self.protocol = "grpc"  # what the reference proxy speaks: "grpc" or "zds" (ztunnel's protocol)
        self.extra = extra or []
        self.source = ["--objects-dir", str(objects_dir)]  # or the Kubernetes API: --kubeconfig F --node-name N
        self.agent: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.agent_runs = 0
        self.proxy_runs = 0
        self.metrics_port = 15014

    def _nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.node_path}", *argv]

    def start_agent(self) -> None:
        self.agent_runs += 1
        err = open(self.base / f"agent{self.agent_runs}.log", "wb")
        self.agent = subprocess.Popen(
            self._nsenter(
                HEADRACE,
                "agent",
                *self.source,
                "--state-dir",
                str(self.state),
                "--cni-socket",
                self.cni_socket,
                "--proxy-socket",
                self.proxy_socket,
                "--zds-socket",
                self.zds_socket,
                "--backend",
                "iptables",
                "--metrics-addr",
                f"127.0.0.1:{self.metrics_port}",
                "--drift-interval",
                "0.5",
                "--log-level",
                "debug",
                *self.extra,
            ),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        err.close()
        self.wait_ready(60)  # eBPF compiles at start: slow on a busy machine

    def wait_ready(self, timeout: float, what: str = "agent ready") -> None:
        """Until /readyz answers 200; TimeoutError with its last answer and the agent log's tail."""
        try:
            wait_for(self.ready, timeout, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; /readyz: {self.http('/readyz')}; agent log ends: {self.agent_log()[-4000:]}"
                               ) from None

    def proxy_argv(self, proxy_id: str, *extra: str) -> list[str]:
        """`headrace proxy` over self.protocol, at the matching agent socket."""
        if self.protocol == "zds":
            return self._nsenter(HEADRACE, "proxy", "--protocol", "zds", "--socket", self.zds_socket,
                                 "--id", proxy_id, *extra)
        return self._nsenter(HEADRACE, "proxy", "--socket", self.proxy_socket, "--id", proxy_id, *extra)

    def start_proxy(self) -> None:
        self.proxy_runs += 1
        out = open(self.base / f"proxy{self.proxy_runs}.out", "wb")
        err = open(self.base / f"proxy{self.proxy_runs}.log", "wb")
        self.proxy = subprocess.Popen(
            self.proxy_argv("test-proxy"),
            stdout=out,
            stderr=err,
        )
        out.close()
        err.close()

    def proxy_lines(self, run_no: int | None = None) -> list[dict[str, Any]]:
        path = self.base / f"proxy{run_no or self.proxy_runs}.out"
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def proxy_log(self, run_no: int | None = None) -> str:
        return (self.base / f"proxy{run_no or self.proxy_runs}.log").read_text()

    def agent_log(self) -> str:
        return "".join((self.base / f"agent{i}.log").read_text() for i in range(1, self.agent_runs + 1))

    def failure_logs(self, tail: int = 12000) -> list[tuple[str, str]]:
        """The ends of every agent and proxy log this run wrote, titled, for a failed test's report."""
        names = [f"agent{i}.log" for i in range(1, self.agent_runs + 1)]
        names += [f"proxy{i}.{ext}" for i in range(1, self.proxy_runs + 1) for ext in ("log", "out")]
        found = []
        for name in names:
            path = self.base / name
            if path.is_file():
                found.append((f"{name} (last {tail} characters)", path.read_text(errors="replace")[-tail:]))
        return found

    def wait_compiled(self, timeout: float = 120.0) -> None:
        """Until this run's agent has ended its start-up compile of the eBPF object (eBPF nodes, and the x_tables
        change count on iptables-legacy ones), done or given up, as a node's long-running agent has: a bench
        that labels pods right after the start would otherwise measure the compile beside them."""
        log, cache = self.base / f"agent{self.agent_runs}.log", self.state / loader.CACHE_DIR
        wait_for(lambda: any(cache.glob("*" + object_cache.SUFFIX)) or " unavailable" in log.read_text(), timeout,
                 "the agent's eBPF compile ended")

    def ready(self) -> bool:
        if self.agent is not None and self.agent.poll() is not None:
            raise RuntimeError(f"agent exited {self.agent.returncode}: {self.agent_log()[-3000:]}")
        return self.http("/readyz")[0] == 200

    def http(self, path: str) -> tuple[int, str]:
        """GET on the agent's metrics server, which listens inside the node netns."""
        code = (
            "import sys,urllib.request,urllib.error\n"
            "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=5); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e: print(e.code); print(e.read().decode())\n"
            "except Exception as e: print(0); print(e)\n"
        )
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        out = run_in(self.node_path, [sys.executable, "-c", code, url], check=False, timeout=30)
        first, _, rest = out.stdout.partition("\n")
        return (int(first) if first.strip().isdigit() else 0), rest

    def metric(self, name: str) -> float:
        _, text = self.http("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def status(self) -> dict[str, dict[str, Any]]:
        try:
            reply = query(self.cni_socket, 10)
        except StatusError:
            return {}
        return {p["uid"]: p for p in reply["pods"]}

    def pod_state(self, uid: str) -> str:
        return str(self.status().get(uid, {}).get("state", "absent"))

    def kill_agent(self, sig: int = signal.SIGKILL) -> None:
        assert self.agent is not None
        self.agent.send_signal(sig)
        self.agent.wait(15)

    def close(self) -> None:
        for proc in (self.proxy, self.agent):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        NetnsPins(self.state / "netns").release_all()
        # anything else mounted under the state dir (the eBPF backend's bpffs with --backend auto)
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            points = [line.split()[1] for line in fh]
        for point in sorted((p for p in points if p.startswith(str(self.state) + "/")), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)
        if not os.environ.get("HEADRACE_KEEP_LAB_LOGS"):  # set it to read the agent and proxy logs afterwards
            shutil.rmtree(self.base, ignore_errors=True)
