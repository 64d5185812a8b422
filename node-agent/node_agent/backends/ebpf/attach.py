"""Attach programs to a pod's own cgroup v2 directory (BPF_F_ALLOW_MULTI), never to a cgroup2 root."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

from cni.kernel.netns import stat_identity
from node_agent.backends.ebpf import bpfsys, cgroup_fs, pinning


class CgroupError(Exception):
    pass


def parse_cgroup2_mounts(mountinfo: str) -> list[Path]:
    """The cgroup2 mount points in a /proc/<pid>/mountinfo text."""
    return [Path(point) for point, fstype in pinning.parse_mounts(mountinfo.splitlines()) if fstype == "cgroup2"]


class MountTable:
    """The cgroup2 mount points, read again only when the mount table changed: the kernel flags an open
    mountinfo file with POLLPRI/POLLERR on every mount or unmount (each pod netns pinned is one, and the
    table grows by a line with each)."""

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


_VALID: dict[str, tuple[int, int, Path]] = {}  # path -> (st_dev, st_ino, resolved) of a valid pod cgroup
_VALID_MAX = 65536


def validate_cgroup(path: str | None) -> Path:
    """The pod cgroup as a resolved path; refuses a missing dir, a non-cgroup2 dir and any cgroup2 root
    (the root of a cgroup2 mount: attaching there would be host-wide). Asked of the directory itself
    (`cgroup_fs`), not of the mount table, which changes with every pod netns pinned; kernels before 5.8
    (no mount-root flag) compare with the cgroup2 mount points instead. A path found valid is remembered
    with the directory it led to (device and inode): the drift check asks for every pod every interval,
    and a stat costs a quarter of the full look. Another directory there is judged again."""
    if not path:
        raise CgroupError("the pod's cgroup v2 directory is unknown (PodTarget.cgroup_path); eBPF needs it")
    before = stat_identity(path)
    known = _VALID.get(path)
    if known is not None and before is not None and known[:2] == before:
        return known[2]
    p = _validate(path)
    if before is not None and stat_identity(path) == before:
        if len(_VALID) >= _VALID_MAX:
            _VALID.clear()
        _VALID[path] = (*before, p)
    return p


def _validate(path: str) -> Path:
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise CgroupError(f"pod cgroup {Path(path).resolve()} does not exist") from None
    except OSError as e:
        raise CgroupError(f"cannot open pod cgroup {path}: {e.strerror}") from e
    try:
        p = Path(os.readlink(f"/proc/self/fd/{fd}"))  # the directory as the kernel names it (links followed)
        if cgroup_fs.fs_magic(fd) != cgroup_fs.CGROUP2_MAGIC:
            raise CgroupError(f"{p} is not inside a cgroup2 mount")
        root = cgroup_fs.mount_root(fd)
    except OSError as e:
        raise CgroupError(f"cannot inspect pod cgroup {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    if root or (root is None and p in cgroup2_mounts()):
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
