"""Wait for changes in one directory: inotify through ctypes (stdlib only), polling as a fallback.

`DirWatcher.wait(timeout)` returns True when the directory may have changed (an event arrived, or the
watch could not be set up and a poll interval passed) and False when the timeout passed quietly. A
directory that does not exist yet (node still booting) is polled every `poll_interval` until it
appears; a deleted directory is polled again the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import time

from cni.kernel.netns import libc

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCH_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF
)
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


def _libc() -> ctypes.CDLL | None:
    try:
        return libc()
    except OSError:
        return None


def parse_events(buf: bytes) -> list[tuple[int, int, str]]:
    """Decode a buffer of `struct inotify_event`s into (wd, mask, name)."""
    out = []
    offset = 0
    while offset + _EVENT_HEADER.size <= len(buf):
        wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buf, offset)
        offset += _EVENT_HEADER.size
        raw = buf[offset : offset + length]
        offset += length
        out.append((wd, mask, raw.split(b"\0", 1)[0].decode("utf-8", "replace")))
    return out


class DirWatcher:
    def __init__(self, directory: str, poll_interval: float = 0.2, use_inotify: bool = True) -> None:
        self.directory = directory
        self.poll_interval = poll_interval
        self._libc = _libc() if use_inotify else None
        self._fd = -1
        self._wd = -1
        if self._libc is not None:
            fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd >= 0:
                self._fd = fd

    @property
    def using_inotify(self) -> bool:
        return self._fd >= 0

    @property
    def watching(self) -> bool:
        return self._wd >= 0

    def _add_watch(self) -> bool:
        if self._fd < 0 or self._libc is None:
            return False
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(self.directory), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.ENOTDIR):
                raise OSError(err, f"inotify_add_watch {self.directory}: {os.strerror(err)}")
            return False
        self._wd = wd
        return True

    def wait(self, timeout: float) -> bool:
        if not self.watching:
            try:
                added = self._add_watch()
            except OSError:
                added = False  # e.g. out of inotify watches: keep polling
            if added:
                return True  # the directory (re)appeared: look at it now
            time.sleep(min(self.poll_interval, max(timeout, 0.0)))
            return True
        ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
        if not ready:
            return False
        try:
            buf = os.read(self._fd, 65536)
        except BlockingIOError:
            return False
        for _wd, mask, _name in parse_events(buf):
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                self._wd = -1
        return True

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
            self._wd = -1

    def __enter__(self) -> DirWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
