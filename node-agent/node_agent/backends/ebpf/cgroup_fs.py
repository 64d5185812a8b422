"""What an open directory is on, asked of the kernel for that one directory: its filesystem's magic number
(fstatfs) and whether it is the root of a mount (statx, STATX_ATTR_MOUNT_ROOT, Linux 5.8+). Cheaper than
reading the mount table, which grows by one line for every pod netns pinned on the node and is read whole.
"""

from __future__ import annotations

import ctypes
import errno
import os

from cni.kernel.netns import libc

CGROUP2_MAGIC = 0x63677270  # CGROUP2_SUPER_MAGIC
AT_EMPTY_PATH = 0x1000
STATX_INO = 0x100
STATX_ATTR_MOUNT_ROOT = 0x2000
_ATTRIBUTES = 8  # offsetof(struct statx, stx_attributes)
_ATTRIBUTES_MASK = 56  # offsetof(struct statx, stx_attributes_mask)
_STATX_SIZE = 256
_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux; f_type (a long) comes first


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def fs_magic(fd: int) -> int:
    """The f_type of the filesystem `fd` (an O_PATH fd will do) is on. Raises OSError."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if libc().fstatfs(fd, buf) != 0:
        _raise_errno("fstatfs")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def mount_root(fd: int) -> bool | None:
    """Whether `fd` is the root directory of a mount; None when the kernel does not say (before 5.8, or a C
    library without statx). Raises OSError."""
    statx = getattr(libc(), "statx", None)
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(fd, b"", AT_EMPTY_PATH, STATX_INO, buf) != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            return None
        _raise_errno("statx")
    supported = ctypes.c_uint64.from_buffer(buf, _ATTRIBUTES_MASK).value
    if not supported & STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(ctypes.c_uint64.from_buffer(buf, _ATTRIBUTES).value & STATX_ATTR_MOUNT_ROOT)
