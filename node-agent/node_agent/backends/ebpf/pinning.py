"""The bpffs the backend pins into: <state-dir>/bpf (outside /sys, which `ip netns exec` remounts).

Layout: <state-dir>/bpf/node/<map>  (maps shared by all pods of the node, and the index of the pods' maps)
        <state-dir>/bpf/node/progs-<object digest>/<function>  (the cgroup programs, loaded once per node)
        <state-dir>/bpf/<pod-uid>/<prog or map>  (the programs attached for the pod, its maps)

<state-dir>/bpf is a bpffs of the agent's mount namespace, or (`ensure_bpffs` given a node directory) a
bind mount of a directory on the node's own bpffs: its pins then outlive the agent's container.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from cni.contract.pod_uid import valid_uid
from node_agent.backends.ebpf import bpfsys

log = logging.getLogger("headrace.backend.ebpf")

NODE_DIR = "node"


class PinError(Exception):
    pass


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of each mount of this mount namespace, in mount order."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return parse_mounts(f)


def parse_mounts(mountinfo: Iterable[str]) -> list[tuple[str, str]]:
    """`mounts` of mountinfo's lines (a bind mount reports the type of the filesystem it shows)."""
    out: list[tuple[str, str]] = []
    for line in mountinfo:
        left, _, right = line.partition(" - ")
        fields, fstype = left.split(), right.split()[:1]
        if len(fields) > 4 and fstype:
            out.append((_unescape(fields[4]), fstype[0]))
    return out


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at path (from /proc/self/mountinfo), or None."""
    target = str(path.resolve())
    found: str | None = None
    for point, fstype in mounts():
        if point == target:
            found = fstype  # the last mount at a path wins
    return found


def fstype_under(target: str, table: Iterable[tuple[str, str]]) -> str | None:
    """The filesystem type of the mount an absolute path is on: the last one at the longest mount point
    that is the path or one of its parents (None: no mount covers it)."""
    found: tuple[int, str] | None = None
    for point, fstype in table:
        covers = target == point or target.startswith(point.rstrip("/") + "/")
        if covers and (found is None or len(point) >= found[0]):
            found = (len(point), fstype)
    return found[1] if found is not None else None


def on_bpffs(path: Path) -> bool:
    """Whether path (an existing one) is on a bpffs."""
    return fstype_under(str(path.resolve()), mounts()) == "bpf"


def ensure_bpffs(state_dir: str | Path, node_dir: Path | None = None) -> Path:
    """Make <state-dir>/bpf a bpffs unless it is one already; return the path. node_dir: a directory on the
    node's own bpffs (made when missing) bind-mounted there, so that the pins outlive this mount namespace
    (the agent's container); where it is not on a bpffs, a bpffs of this mount namespace (`node_pins`)."""
    root = Path(state_dir) / "bpf"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if mount_fstype(root) == "bpf":
        return root
    source = node_pins(node_dir) if node_dir is not None else None
    argv = ["mount", "--bind", str(source), str(root)] if source else ["mount", "-t", "bpf", "bpf", str(root)]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0 or mount_fstype(root) != "bpf":
        if res.returncode == 0:  # mounted, but no bpffs: not left over the state dir
            subprocess.run(["umount", str(root)], capture_output=True, check=False)
        raise PinError(
            f"cannot mount {f'{source} (bind)' if source else 'a bpffs'} at {root}: "
            f"{res.stderr.strip() or 'mount failed'} (the agent needs CAP_SYS_ADMIN and a writable state dir)"
        )
    return root


def node_pins(node_dir: Path) -> Path | None:
    """node_dir, made (mode 0700) when missing, if its parent is on a bpffs; else None, with a warning."""
    parent = node_dir.parent
    if not parent.is_dir() or not on_bpffs(parent):
        log.warning("no bpffs at %s: the eBPF pins go to a bpffs of the agent's own mount namespace, lost "
                    "when its container restarts", parent, extra={"event": "ebpf_pins_private"})
        return None
    try:
        node_dir.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise PinError(f"cannot make {node_dir} for the eBPF pins: {e}") from e
    if not node_dir.is_dir():
        raise PinError(f"{node_dir} is not a directory: it cannot hold the eBPF pins")
    return node_dir


def unmount_bpffs(state_dir: str | Path) -> None:
    """Unmount <state-dir>/bpf if it is a bpffs (or a bind of a node directory; tests: a node keeps it)."""
    root = Path(state_dir) / "bpf"
    while mount_fstype(root) == "bpf":
        res = subprocess.run(["umount", str(root)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise PinError(f"cannot unmount {root}: {res.stderr.strip()}")


def found_root(state_dir: Path, node_dir: Path | None = None) -> Path | None:
    """Where the pins are, looked for without mounting anything: <state-dir>/bpf when a bpffs is mounted
    there, else node_dir when it is a directory on a bpffs (what the agent of a restarted container left),
    else None."""
    root = state_dir / "bpf"
    if mount_fstype(root) == "bpf":
        return root
    return node_dir if node_dir is not None and node_dir.is_dir() and on_bpffs(node_dir) else None


def pinned_pod_dirs(state_dir: Path, node_dir: Path | None = None) -> list[str]:
    """The names of the pod directories among the pins (`found_root`; none when there are no pins)."""
    root = found_root(state_dir, node_dir)
    return pod_dirs(root) if root is not None else []


def pod_dirs(root: Path) -> list[str]:
    """The names of the pod directories in a mounted pin root."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != NODE_DIR)


def any_pod_dir(root: Path) -> bool:
    """Whether a mounted pin root holds a pod directory: `pod_dirs` stopping at the first (each pod's
    removal asks, with every other pod's directory there)."""
    with os.scandir(root) as entries:
        return any(e.name != NODE_DIR and e.is_dir() for e in entries)


def unmount_if_unused(state_dir: Path, node_dir: Path | None = None) -> bool:
    """Unpin the node maps and unmount <state-dir>/bpf when it is a bpffs that holds no pod directory any
    more (True: unmounted); node_dir, then empty, is removed (the node's bpffs left as it was found)."""
    root = state_dir / "bpf"
    if mount_fstype(root) != "bpf" or any_pod_dir(root):
        return False
    remove_dir(root / NODE_DIR)
    unmount_bpffs(state_dir)
    if node_dir is not None:
        with contextlib.suppress(OSError):  # gone, or holding what is not ours
            node_dir.rmdir()
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
