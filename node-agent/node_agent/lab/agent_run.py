"""Helpers for the agent's kernel tests: a node netns, pod-like processes in cgroups, and the agent and
reference proxy run as real processes inside the node netns (`nsenter --net=/run/netns/NODE`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from node_agent.lab.simnode import SimNode

from node_agent.netns.pin import NetnsPins
from node_agent.serve.status_client import StatusError, query

VENV_BIN = Path(sys.executable).parent
HEADRACE = str(VENV_BIN / "headrace")
CGROOT = Path("/sys/fs/cgroup/unified")


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = cond()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


class NodeNetns:
    def __init__(self) -> None:
        self.name = f"hra-node-{secrets.token_hex(4)}"
        run(["ip", "netns", "add", self.name])
        self.path = f"/run/netns/{self.name}"
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])

    def close(self) -> None:
        run(["ip", "netns", "del", self.name], check=False)


class PodProcs:
    """Processes in fresh netns, each placed in a cgroup v2 directory named like kubelet's."""

    def __init__(self) -> None:
        self.base = CGROOT / f"headrace-test-{secrets.token_hex(4)}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dirs: list[Path] = []

    def start(self, cgroup_rel: str, share_netns_of: int | None = None) -> subprocess.Popen[bytes]:
        cg = self.base / cgroup_rel
        cg.mkdir(parents=True, exist_ok=True)
        for d in [cg, *cg.parents]:
            if d == self.base.parent:
                break
            if d not in self.dirs:
                self.dirs.append(d)
        if share_netns_of is None:
            cmd = ["unshare", "--net", "sleep", "600"]
        else:
            cmd = ["nsenter", f"--net=/proc/{share_netns_of}/ns/net", "sleep", "600"]
        proc = subprocess.Popen(cmd)
        self.procs.append(proc)
        (cg / "cgroup.procs").write_text(str(proc.pid))
        host = os.stat("/proc/self/ns/net").st_ino
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                if (
                    os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep")
                    and os.stat(f"/proc/{proc.pid}/ns/net").st_ino != host
                ):
                    break
            except OSError:
                pass
            time.sleep(0.01)
        return proc

    def pod(self, uid: str) -> subprocess.Popen[bytes]:
        return self.start(f"kubepods/besteffort/pod{uid}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(5)
        for d in sorted(self.dirs, key=lambda p: len(p.parts), reverse=True):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def ns_object(name: str, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod_object(
    ns: str, name: str, uid: str, ips: list[str], labels: dict[str, str] | None = None, node: str = ""
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ips[0] if ips else "", "podIPs": [{"ip": ip} for ip in ips]},
    }


def write_object(directory: Path, filename: str, obj: dict[str, Any]) -> None:
    tmp = directory / f".{filename}.tmp"
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, directory / filename)


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
        extra: list[str] | None = None,
    ) -> None:
        self.node_path = node_path
        self.objects_dir = objects_dir
        self.base = base or Path(tempfile.mkdtemp(prefix="hra-", dir="/tmp"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.state = state_dir or self.base / "state"
        self.cni_socket = str(cni_socket or self.base / "cni.sock")
        self.proxy_socket = str(proxy_socket or self.base / "proxy.sock")
        self.extra = extra or []
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
                "--objects-dir",
                str(self.objects_dir),
                "--state-dir",
                str(self.state),
                "--cni-socket",
                self.cni_socket,
                "--proxy-socket",
                self.proxy_socket,
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
        wait_for(lambda: self.ready(), 20, "agent ready")

    def start_proxy(self) -> None:
        self.proxy_runs += 1
        out = open(self.base / f"proxy{self.proxy_runs}.out", "wb")
        err = open(self.base / f"proxy{self.proxy_runs}.log", "wb")
        self.proxy = subprocess.Popen(
            self._nsenter(HEADRACE, "proxy", "--socket", self.proxy_socket, "--id", "test-proxy"),
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

    def ready(self) -> bool:
        if self.agent is not None and self.agent.poll() is not None:
            raise AssertionError(f"agent exited {self.agent.returncode}: {self.agent_log()[-3000:]}")
        return self.http("/readyz")[0] == 200

    def http(self, path: str) -> tuple[int, str]:
        """GET on the agent's metrics server, which listens inside the node netns."""
        code = (
            "import sys,urllib.request,urllib.error\n"
            "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=5); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e: print(e.code); print(e.read().decode())\n"
            "except Exception as e: print(0); print(e)\n"
        )
        out = run(self._nsenter(sys.executable, "-c", code, f"http://127.0.0.1:{self.metrics_port}{path}"), check=False)
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
            run(["umount", "-l", point], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def iptables_save(netns_path: str, family: int, flavour: str) -> str:
    from cni.kernel import flavour as flavour_mod

    tool = flavour_mod.binary(flavour, family, "save")  # type: ignore[arg-type]
    return run(["nsenter", f"--net={netns_path}", tool], check=False).stdout


def headrace_rules(netns_path: str, family: int = 4) -> list[str]:
    """Our rule lines in a netns, from both iptables flavours (a rule in the wrong flavour counts too)."""
    out: list[str] = []
    for flavour in ("nft", "legacy"):
        out += [
            f"{flavour}: {line}"
            for line in iptables_save(netns_path, family, flavour).splitlines()
            if line.startswith("-A") and "HEADRACE" in line
        ]
    return out


AgentT = TypeVar("AgentT", bound=AgentRun)


@contextlib.contextmanager
def node_agent(node: SimNode, agent_cls: type[AgentT]) -> Iterator[tuple[AgentT, list[subprocess.Popen[bytes]]]]:
    """An agent (not started) for a simulated node, sharing the node's state dir and sockets, plus a list
    for the test's app processes; apps are killed and the agent closed afterwards, even on failure."""
    agent = agent_cls(
        node.netns.path,
        node.objects_dir,
        node.root / "run",
        state_dir=node.state_dir,
        cni_socket=node.agent_socket,
        proxy_socket=node.state_dir / "proxy.sock",
    )
    apps: list[subprocess.Popen[bytes]] = []
    try:
        yield agent, apps
    finally:
        for app in apps:
            app.kill()
            app.wait(5)
        agent.close()
