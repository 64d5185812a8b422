"""Pod-like processes in cgroup v2 directories laid out like kubelet's (``.../kubepods/pod<uid>/<id>``).

What the agent's /proc scan looks for: a process in a pod's network namespace whose cgroup names the pod.
``sleeper`` starts one (in a given netns, or in a fresh one); ``PodProcs`` is a set of such bare pods for
benchmarks and tests that need no CNI plugin; ``SimNode`` uses ``sleeper`` for its pods' infra processes.
Removing a directory kills what still runs inside first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")


def _netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def sleeper(cgroup: Path, netns_path: str | None = None, seconds: str = "infinity") -> subprocess.Popen[bytes]:
    """``sleep`` inside ``netns_path`` (a fresh netns when None), moved into ``cgroup`` (made if missing).

    Returns once the process is in its netns; RuntimeError when it does not get there within 5 s."""
    cgroup.mkdir(parents=True, exist_ok=True)
    if netns_path is None:
        argv = ["unshare", "--net", "--", "sleep", seconds]
    else:
        argv = ["nsenter", f"--net={netns_path}", "--", "sleep", seconds]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # unshare and nsenter exec sleep in place, so the pid stays
    (cgroup / "cgroup.procs").write_text(str(proc.pid))
    here = _netns_inode("self")
    want = os.stat(netns_path).st_ino if netns_path is not None else None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            ino = _netns_inode(proc.pid)
            entered = ino == want if want is not None else ino != here
            if entered and os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"):
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    kill_if_in(proc.pid, str(cgroup))
    raise RuntimeError(f"the process in {cgroup} did not enter its netns")


def kill_if_in(pid: int, cgroup: str | None) -> None:
    """SIGKILL pid only if it still lives in cgroup (pids are recycled)."""
    if not cgroup:
        return
    try:
        procs = (Path(cgroup) / "cgroup.procs").read_text().split()
    except OSError:
        return
    if str(pid) in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def rmdir_cgroup(path: Path, timeout: float = 3.0) -> None:
    """rmdir a cgroup v2 directory, killing what still runs inside (EBUSY until the processes are gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
        time.sleep(0.02)


def remove_tree(base: Path) -> None:
    """Remove a cgroup v2 subtree, deepest directory first, killing what still runs inside each."""
    if not base.is_dir():
        return
    dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for d in [*dirs, base]:
        rmdir_cgroup(d)


class PodProcs:
    """Bare pods: each a ``sleep`` in a fresh netns (or sharing another's), in a kubelet-style cgroup below
    a private base directory; ``close()`` kills them and removes every directory it made."""

    def __init__(self) -> None:
        self.base = CGROUP2_ROOT / f"headrace-test-{secrets.token_hex(4)}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dirs: list[Path] = []

    def start(self, cgroup_rel: str, share_netns_of: int | None = None) -> subprocess.Popen[bytes]:
        cg = self.base / cgroup_rel
        for d in [cg, *cg.parents]:
            if d == self.base.parent:
                break
            if d not in self.dirs:
                self.dirs.append(d)
        netns = None if share_netns_of is None else f"/proc/{share_netns_of}/ns/net"
        proc = sleeper(cg, netns, seconds="600")
        self.procs.append(proc)
        return proc

    def pod(self, uid: str) -> subprocess.Popen[bytes]:
        return self.start(f"kubepods/besteffort/pod{uid}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(5)
        for d in sorted(self.dirs, key=lambda p: len(p.parts), reverse=True):
            rmdir_cgroup(d)
