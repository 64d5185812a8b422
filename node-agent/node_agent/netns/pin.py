"""Pin pod network namespaces at <state-dir>/netns/<pod-uid> (bind mounts) and verify them before use.

A pin keeps the netns alive after its processes exit, so enrolment never races a dying pod. Every use
checks that the pin is still a mounted nsfs file with the inode recorded at pin time: a path that was
released and re-created for another netns ("recycled") is refused, never entered.

Nothing but a pod's network namespace is ever mounted: the source is opened and checked first
(`cni.kernel.netns.open_pod_netns`: nsfs, a network namespace, neither the agent's own nor the host's,
the expected inode), and the bind mount is made from that open descriptor (/proc/self/fd/N), so the path
cannot be swapped in between. Releasing unmounts everything stacked at the pin, whatever it is, before
the file is removed; a pin that fails its check after mounting is released at once.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from pathlib import Path

from cni.contract.pod_uid import InvalidUid, valid_uid
from cni.contract.pod_uid import check_uid as _check_uid
from cni.kernel.netns import NetnsFileError, libc, open_pod_netns

MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
MAX_STACKED = 64  # unmounts tried on one pin path before giving up (EBUSY on the unlink then)

_libc = libc()  # the process-wide handle (cni.kernel.netns)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class PinError(OSError):
    """Pinning, verifying or releasing a netns failed."""


class RecycledNetns(PinError):
    """The pin exists but holds another netns than the one recorded: never use it."""


class NotPodNetns(PinError):
    """The source is no pod network namespace (not nsfs, another namespace type, the agent's own, the
    host's): nothing was mounted."""


@functools.cache
def _nsfs_dev() -> int:
    """The device of the kernel's one nsfs (every namespace file is on it): read once."""
    return os.stat("/proc/self/ns/net").st_dev


def _mount_bind(src: str, dst: str) -> None:
    if _libc.mount(src.encode(), dst.encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise PinError(err, f"bind mount {src} -> {dst}: {os.strerror(err)}")


def _umount(path: str) -> bool:
    """Detach the top mount at `path`; False when nothing is mounted there (EINVAL) or it is gone."""
    if _libc.umount2(path.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not a mount point / gone: nothing (more) to undo
            return False
        raise PinError(err, f"umount {path}: {os.strerror(err)}")
    return True


def check_uid(uid: str) -> str:
    """The uid, when it follows the pod uid rule (`cni.contract.pod_uid`); PinError otherwise."""
    try:
        return _check_uid(uid)
    except InvalidUid as exc:
        raise PinError(errno.EINVAL, str(exc)) from exc


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
        """Bind-mount the netns at `source` (e.g. /proc/PID/ns/net or CNI_NETNS) at the pin path.
        Idempotent for the same netns; refuses (NotPodNetns, nothing mounted) a source that is no pod
        network namespace, and (RecycledNetns) a source that is not that inode or a pin that already
        holds another netns."""
        target = self.path(uid)
        try:
            fd = open_pod_netns(source, "agent")
        except NetnsFileError as exc:
            detail = f" ({exc.details})" if exc.details else ""
            raise NotPodNetns(errno.EINVAL, f"{exc.msg}{detail}") from exc
        try:
            src_ino = os.fstat(fd).st_ino
            if src_ino != expected_inode:
                raise RecycledNetns(errno.ESTALE, f"netns {source} is inode {src_ino}, expected {expected_inode}")
            current = self.inode(uid)
            if current == expected_inode:
                return str(target)
            if current is not None:
                raise RecycledNetns(errno.EEXIST, f"pin {target} holds netns {current}, not {expected_inode}")
            self._bare_file(target)
            try:
                _mount_bind(f"/proc/self/fd/{fd}", str(target))
                got = self.inode(uid)
                if got != expected_inode:
                    raise RecycledNetns(errno.ESTALE,
                                        f"pinned {source} but found inode {got}, expected {expected_inode}")
            except BaseException:
                self._unmount_and_unlink(target)
                raise
            return str(target)
        finally:
            os.close(fd)

    def _bare_file(self, target: Path) -> None:
        """The pin file with nothing mounted on it: a file made now cannot hold a mount; one that was
        already there (a crash's leftover) has everything stacked on it unmounted (never stack on it)."""
        flags = os.O_CREAT | os.O_EXCL | os.O_RDONLY | os.O_CLOEXEC
        try:
            os.close(os.open(target, flags, 0o400))
        except FileExistsError:
            self._unmount_all(target)
        except FileNotFoundError:  # no directory yet (or it was removed)
            self.ensure_dir()
            os.close(os.open(target, flags, 0o400))

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
    def _unmount_all(target: Path) -> None:
        """Unmount everything stacked at `target` (nsfs or not: an older agent's leftovers)."""
        for _ in range(MAX_STACKED):
            if not _umount(str(target)):
                return
        raise PinError(errno.EBUSY, f"{target}: more than {MAX_STACKED} mounts stacked")

    @classmethod
    def _unmount_and_unlink(cls, target: Path) -> None:
        cls._unmount_all(target)
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
            ino = self.inode(entry.name) if valid_uid(entry.name) else None
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
            if valid_uid(entry.name):
                self._unmount_and_unlink(entry)
                released.append(entry.name)
        return released

    def leftovers(self) -> list[str]:
        """Pin files with nothing mounted (e.g. after a reboot cleared the mounts but not the files)."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        return [e.name for e in entries if valid_uid(e.name) and self.inode(e.name) is None]
