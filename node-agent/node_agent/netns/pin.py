"""Pin pod network namespaces at <state-dir>/netns/<pod-uid> (bind mounts) and verify them before use.

A pin keeps the netns alive after its processes exit, so enrolment never races a dying pod. Every use
checks that the pin is still a mounted nsfs file with the inode recorded at pin time: a path that was
released and re-created for another netns ("recycled") is refused, never entered.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

from cni.kernel.netns import libc

MS_BIND = 0x1000
MNT_DETACH = 0x2
_UID_RE = re.compile(r"^[0-9a-zA-Z][0-9a-zA-Z._-]{0,127}$")

_libc = libc()  # the process-wide handle (cni.kernel.netns)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class PinError(OSError):
    """Pinning, verifying or releasing a netns failed."""


class RecycledNetns(PinError):
    """The pin exists but holds another netns than the one recorded: never use it."""


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def _mount_bind(src: str, dst: str) -> None:
    if _libc.mount(src.encode(), dst.encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise PinError(err, f"bind mount {src} -> {dst}: {os.strerror(err)}")


def _umount(path: str) -> None:
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted / gone: nothing to undo
            raise PinError(err, f"umount {path}: {os.strerror(err)}")


def check_uid(uid: str) -> str:
    if not _UID_RE.match(uid) or uid in (".", ".."):
        raise PinError(errno.EINVAL, f"invalid pod uid {uid!r}")
    return uid


class NetnsPins:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, uid: str) -> Path:
        return self.directory / check_uid(uid)

    def ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def inode(self, uid: str) -> int | None:
        """The inode of the netns pinned for uid, or None when nothing (or no netns) is mounted there."""
        try:
            st = os.stat(self.path(uid))
        except OSError:
            return None
        if st.st_dev != _nsfs_dev():
            return None
        return st.st_ino

    def pin(self, uid: str, source: str, expected_inode: int) -> str:
        """Bind-mount `source` (e.g. /proc/PID/ns/net or CNI_NETNS) at the pin path. Idempotent for the
        same netns; refuses when the source is not that inode or the pin already holds another netns."""
        self.ensure_dir()
        target = self.path(uid)
        try:
            src_ino = os.stat(source).st_ino
        except OSError as exc:
            raise PinError(exc.errno or errno.ENOENT, f"netns {source}: {exc.strerror}") from exc
        if src_ino != expected_inode:
            raise RecycledNetns(errno.ESTALE, f"netns {source} is inode {src_ino}, expected {expected_inode}")
        current = self.inode(uid)
        if current == expected_inode:
            return str(target)
        if current is not None:
            raise RecycledNetns(errno.EEXIST, f"pin {target} holds netns {current}, not {expected_inode}")
        if not target.exists():
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o400)
            os.close(fd)
        _mount_bind(source, str(target))
        got = self.inode(uid)
        if got != expected_inode:
            self._unmount_and_unlink(target)
            raise RecycledNetns(errno.ESTALE, f"pinned {source} but found inode {got}, expected {expected_inode}")
        return str(target)

    def verify(self, uid: str, expected_inode: int) -> str:
        """The pin path, after checking it holds the expected netns; raises otherwise."""
        got = self.inode(uid)
        if got is None:
            raise PinError(errno.ENOENT, f"no netns pinned for pod {uid}")
        if got != expected_inode:
            raise RecycledNetns(errno.ESTALE, f"pin of pod {uid} is netns {got}, expected {expected_inode}")
        return str(self.path(uid))

    def release(self, uid: str) -> None:
        self._unmount_and_unlink(self.path(uid))

    @staticmethod
    def _unmount_and_unlink(target: Path) -> None:
        # a pin may have been mounted more than once (never by us, but be thorough)
        for _ in range(8):
            if not target.exists() or os.stat(target).st_dev != _nsfs_dev():
                break
            _umount(str(target))
        try:
            target.unlink()
        except FileNotFoundError:
            pass

    def pinned(self) -> dict[str, int]:
        """Every uid with a mounted netns pin, and its inode (adoption after a restart)."""
        out: dict[str, int] = {}
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return out
        for entry in entries:
            ino = self.inode(entry.name) if _UID_RE.match(entry.name) else None
            if ino is not None:
                out[entry.name] = ino
        return out

    def release_all(self) -> list[str]:
        """Unmount and remove every pin (tear-down of a lab/test node; the agent itself never does this on
        shutdown, since pins must outlive an agent restart)."""
        released: list[str] = []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return released
        for entry in entries:
            if _UID_RE.match(entry.name):
                self._unmount_and_unlink(entry)
                released.append(entry.name)
        return released

    def leftovers(self) -> list[str]:
        """Pin files with nothing mounted (e.g. after a reboot cleared the mounts but not the files)."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        return [e.name for e in entries if _UID_RE.match(e.name) and self.inode(e.name) is None]
