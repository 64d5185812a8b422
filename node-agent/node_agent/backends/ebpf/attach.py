"""Attach programs to a pod's own cgroup v2 directory (BPF_F_ALLOW_MULTI), never to a cgroup2 root."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

from cni.kernel.netns import stat_identity
from node_agent.backends.ebpf import bpfsys


class CgroupError(Exception):
    pass


def parse_cgroup2_mounts(mountinfo: str) -> list[Path]:
    """The cgroup2 mount points in a /proc/<pid>/mountinfo text."""
    out: list[Path] = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            out.append(Path(left.split()[4].replace("\\040", " ")))
    return out


class MountTable:
    """The cgroup2 mount points, read again only when the mount table changed: the kernel flags an open
    mountinfo file with POLLPRI/POLLERR on every mount or unmount (the drift check validates each pod's
    cgroup every second; re-reading the whole table for each was most of its cost)."""

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self.path = path
        self.reads = 0
        self._lock = threading.Lock()
        self._fd = -1
        self._poll = select.poll()
        self._mounts: list[Path] = []

    def cgroup2(self) -> list[Path]:
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
                self._reload()
            elif self._poll.poll(0):
                self._reload()
            return list(self._mounts)

    def _reload(self) -> None:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        self._mounts = parse_cgroup2_mounts(b"".join(chunks).decode("utf-8", "replace"))
        self.reads += 1


MOUNTS = MountTable()


def cgroup2_mounts() -> list[Path]:
    return MOUNTS.cgroup2()


_VALID: dict[str, tuple[int, int, int, Path]] = {}  # path -> (mount table reads, st_dev, st_ino, resolved)
_VALID_MAX = 65536


def validate_cgroup(path: str | None) -> Path:
    """The pod cgroup as a resolved path; refuses a missing dir, a non-cgroup2 dir and any cgroup2 root.
    A path found valid is remembered with what it led to (device and inode) and the mount table it was
    judged against: the drift check asks every pod every interval, and resolving the path component by
    component was a good part of it. Another directory there, or a mount change, is judged again."""
    if not path:
        raise CgroupError("the pod's cgroup v2 directory is unknown (PodTarget.cgroup_path); eBPF needs it")
    cgroup2_mounts()  # notices a mount change (MOUNTS.reads moves)
    reads, before = MOUNTS.reads, stat_identity(path)
    known = _VALID.get(path)
    if known is not None and before is not None and known[:3] == (reads, *before):
        return known[3]
    p = _validate(path)
    if before is not None and stat_identity(path) == before and MOUNTS.reads == reads:
        if len(_VALID) >= _VALID_MAX:
            _VALID.clear()
        _VALID[path] = (reads, *before, p)
    return p


def _resolved_dir(path: str) -> Path | None:
    """The directory `path` leads to as the kernel names it (every link followed; one O_PATH open instead of
    a stat per component), or None when it is not a directory."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    finally:
        os.close(fd)


def _validate(path: str) -> Path:
    p = _resolved_dir(path)
    if p is None:
        raise CgroupError(f"pod cgroup {Path(path).resolve()} does not exist")
    mounts = cgroup2_mounts()
    if not mounts:
        raise CgroupError("no cgroup2 filesystem is mounted (mount cgroup2, e.g. at /sys/fs/cgroup/unified)")
    owner = [m for m in mounts if p == m or m in p.parents]
    if not owner:
        raise CgroupError(f"{p} is not inside a cgroup2 mount ({', '.join(map(str, mounts))})")
    if any(p == m for m in mounts):
        raise CgroupError(f"{p} is a cgroup2 root: refusing to attach host-wide")
    return p


def cgroup_id(path: Path) -> int:
    return os.stat(path).st_ino


def find_cgroup_by_id(cg_id: int) -> Path | None:
    """The cgroup2 directory with this id (inode), searched below every cgroup2 mount."""
    for m in cgroup2_mounts():
        for dirpath, _dirs, _files in os.walk(m):
            try:
                if os.stat(dirpath).st_ino == cg_id:
                    return Path(dirpath)
            except FileNotFoundError:
                continue
    return None


class Cgroup:
    """An open cgroup directory fd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise CgroupError(f"cannot open cgroup {path}: {e.strerror}") from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attached(self, attach_type: int) -> list[int]:
        return bpfsys.prog_query(self.fd, attach_type)

    def attach(self, prog_fd: int, attach_type: int, replace_fd: int | None = None) -> None:
        flags = bpfsys.F_ALLOW_MULTI
        if replace_fd is not None:
            flags |= bpfsys.F_REPLACE
        bpfsys.prog_attach(prog_fd, self.fd, attach_type, flags, replace_fd or 0)

    def detach(self, prog_fd: int, attach_type: int) -> None:
        bpfsys.prog_detach(prog_fd, self.fd, attach_type)


def cgroup2_path_of_pid(pid: int, proc: Path = Path("/proc"), mounts: list[Path] | None = None) -> Path | None:
    """The cgroup v2 directory a process is in ("0::/path" in /proc/PID/cgroup under the cgroup2 mount)."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    rel = next((line[3:] for line in text.splitlines() if line.startswith("0::")), None)
    mnts = cgroup2_mounts() if mounts is None else mounts
    if rel is None or not mnts:
        return None
    return mnts[0] / rel.lstrip("/")


def pod_cgroup_of_pid(
    pid: int, pod_uid: str | None = None, proc: Path = Path("/proc"), mounts: list[Path] | None = None
) -> Path | None:
    """The pod-level cgroup v2 directory of a pod process: the ancestor named for the pod UID by the kubelet
    (cgroupfs `pod<uid>`, systemd `...-pod<uid_with_underscores>.slice`), else the process's own cgroup.
    None when unknown or when that is a cgroup2 root (never attach host-wide)."""
    own = cgroup2_path_of_pid(pid, proc, mounts)
    if own is None:
        return None
    roots = set(cgroup2_mounts() if mounts is None else mounts)
    if pod_uid:
        marks = (f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}")
        for cand in (own, *own.parents):
            if cand in roots:
                break
            if any(m in cand.name for m in marks):
                return cand
    return None if own in roots else own
