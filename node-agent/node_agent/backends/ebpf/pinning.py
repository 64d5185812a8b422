"""The bpffs the backend pins into: <state-dir>/bpf (outside /sys, which `ip netns exec` remounts).

Layout: <state-dir>/bpf/node/<map>  (maps shared by all pods of the node, and the index of the pods' maps)
        <state-dir>/bpf/node/progs-<object digest>/<function>  (the cgroup programs, loaded once per node)
        <state-dir>/bpf/<pod-uid>/<prog or map>  (the programs attached for the pod, its maps)
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from cni.contract.pod_uid import valid_uid
from node_agent.backends.ebpf import bpfsys

NODE_DIR = "node"


class PinError(Exception):
    pass


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at path (from /proc/self/mountinfo), or None."""
    target = str(path.resolve())
    found: str | None = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                found = right.split()[0]  # the last mount at a path wins
    return found


def ensure_bpffs(state_dir: str | Path) -> Path:
    """Mount a bpffs at <state-dir>/bpf unless one is there already; return the path."""
    root = Path(state_dir) / "bpf"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if mount_fstype(root) == "bpf":
        return root
    res = subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], capture_output=True, text=True, check=False)
    if res.returncode != 0 or mount_fstype(root) != "bpf":
        raise PinError(
            f"cannot mount a bpffs at {root}: {res.stderr.strip() or 'mount failed'} "
            "(the agent needs CAP_SYS_ADMIN and a writable state dir)"
        )
    return root


def unmount_bpffs(state_dir: str | Path) -> None:
    """Unmount <state-dir>/bpf if it is a bpffs (tests; a node keeps it)."""
    root = Path(state_dir) / "bpf"
    while mount_fstype(root) == "bpf":
        res = subprocess.run(["umount", str(root)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise PinError(f"cannot unmount {root}: {res.stderr.strip()}")


def pinned_pod_dirs(state_dir: Path) -> list[str]:
    """The names of the pod directories in <state-dir>/bpf (none unless a bpffs is mounted there)."""
    root = state_dir / "bpf"
    return pod_dirs(root) if mount_fstype(root) == "bpf" else []


def pod_dirs(root: Path) -> list[str]:
    """The names of the pod directories in a mounted pin root."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != NODE_DIR)


def any_pod_dir(root: Path) -> bool:
    """Whether a mounted pin root holds a pod directory: `pod_dirs` stopping at the first (each pod's
    removal asks, with every other pod's directory there)."""
    with os.scandir(root) as entries:
        return any(e.name != NODE_DIR and e.is_dir() for e in entries)


def unmount_if_unused(state_dir: Path) -> bool:
    """Unpin the node maps and unmount <state-dir>/bpf when it is a bpffs that holds no pod directory any
    more (True: unmounted)."""
    root = state_dir / "bpf"
    if mount_fstype(root) != "bpf" or any_pod_dir(root):
        return False
    remove_dir(root / NODE_DIR)
    unmount_bpffs(state_dir)
    return True


def pod_dir_name(pod_uid: str) -> str:
    if not valid_uid(pod_uid) or pod_uid == NODE_DIR or ".." in pod_uid:
        raise PinError(f"pod uid {pod_uid!r} is not usable as a pin directory name")
    return pod_uid


def open_pinned(path: str | Path) -> int | None:
    try:
        return bpfsys.obj_get(str(path))
    except bpfsys.BpfSysError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def pin(fd: int, path: Path) -> None:
    """Pin fd at path, replacing what is pinned there (one syscall where nothing is)."""
    try:
        bpfsys.obj_pin(fd, str(path))
    except bpfsys.BpfSysError as e:
        if e.errno != errno.EEXIST:
            raise
        unpin(path)
        bpfsys.obj_pin(fd, str(path))


def unpin(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_dir(path: Path) -> None:
    """Unpin everything in a pin directory and remove it (idempotent)."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            remove_dir(child)
        else:
            unpin(child)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass


_PROG_IDS: dict[str, tuple[int, int, int]] = {}  # pin path -> (inode, ctime ns, program id)
_PROG_IDS_MAX = 65536


def pinned_prog_id(path: str | Path) -> int | None:
    """The id of the program pinned at `path` (None: nothing pinned there). Remembered per pin file: a
    pin made again is a new bpffs inode, so one stat tells whether it is still the program read before
    (the drift check asks for every program of every pod each interval; opening the pin and asking the
    kernel for its info costs three bpf/close calls)."""
    key = str(path)
    try:
        st = os.stat(key)
    except FileNotFoundError:
        _PROG_IDS.pop(key, None)
        return None
    known = _PROG_IDS.get(key)
    if known is not None and known[:2] == (st.st_ino, st.st_ctime_ns):
        return known[2]
    fd = open_pinned(key)
    if fd is None:
        return None
    try:
        prog_id = bpfsys.prog_info(fd).prog_id
    finally:
        os.close(fd)
    if len(_PROG_IDS) >= _PROG_IDS_MAX:
        _PROG_IDS.clear()
    _PROG_IDS[key] = (st.st_ino, st.st_ctime_ns, prog_id)  # read after the stat: a newer pin is re-read
    return prog_id


def pinned_ids(paths: Iterable[Path]) -> set[int]:
    """The ids of the programs pinned at `paths` (missing pins skipped)."""
    return {pid for pid in map(pinned_prog_id, paths) if pid is not None}


CLOCK_REALTIME_COARSE = 5  # <linux/time.h>: the clock bpffs takes file times from


def dir_identity(path: str | Path) -> tuple[int, int]:
    """(st_ino, st_mtime_ns) of a bpffs directory: its mtime moves whenever a pin is made, removed or
    renamed in it."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def settled_identity(path: str | Path) -> tuple[int, int] | None:
    """`dir_identity`, or None while that mtime is the coarse clock's current tick (one tick, 1-10 ms: a
    second change in the same tick would leave the same mtime, so it cannot stand for "nothing changed"
    yet)."""
    ino, mtime = dir_identity(path)
    return (ino, mtime) if time.clock_gettime_ns(CLOCK_REALTIME_COARSE) > mtime else None
