"""The names changed in one directory, from inotify (through ctypes): what the objects-dir source reads.

    events = DirEvents(directory)    # None from .open() when inotify is unavailable: the caller polls
    names = events.wait(timeout)     # set of file names changed; empty: quiet; None: unknown, look at all
    events.wake()                    # (another thread) ends a wait at once

A burst of writes (an editor's temp file + rename, a tool writing many files) is gathered: after the first
event, `wait` keeps reading while more arrive within `settle` seconds (at most `max_batch`). A lost watch
(the directory deleted or moved away), a queue overflow or a failed read answer None; the watch is
re-added on the next `wait` once the directory is back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import time

from cni.kernel.netns import libc
from node_agent.install_cni.watcher import (
    IN_CLOEXEC,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_NONBLOCK,
    IN_Q_OVERFLOW,
    WATCH_MASK,
    parse_events,
)

LOST = IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_Q_OVERFLOW
RETRY_WATCH = 0.5  # while the directory is gone: how often the watch is tried again


class DirEvents:
    def __init__(self, directory: str, fd: int, lib: ctypes.CDLL, settle: float = 0.02,
                 max_batch: float = 0.2) -> None:
        self.directory = directory
        self._fd = fd
        self._lib = lib
        self._wd = -1
        self.settle = settle
        self.max_batch = max_batch
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # `wake` ends a `wait` early

    @classmethod
    def open(cls, directory: str, **kw: float) -> DirEvents | None:
        try:
            lib = libc()
        except OSError:
            return None
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        events = cls(directory, fd, lib, **kw)
        events._add_watch()
        return events

    @property
    def watching(self) -> bool:
        return self._wd >= 0

    def _add_watch(self) -> bool:
        wd = self._lib.inotify_add_watch(self._fd, os.fsencode(self.directory), WATCH_MASK)
        if wd < 0:
            return False
        self._wd = wd
        return True

    def _read(self) -> list[tuple[int, int, str]] | None:
        try:
            return parse_events(os.read(self._fd, 65536))
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return []
            return None

    def wake(self) -> None:
        """End a `wait` in another thread now (it answers an empty set)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"w")

    def _events_ready(self, timeout: float) -> bool:
        """Wait up to `timeout`: True when inotify has events; False on the timeout or a `wake` (drained)."""
        ready, _, _ = select.select([self._fd, self._wake_r], [], [], max(0.0, timeout))
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
            return False
        return self._fd in ready

    def wait(self, timeout: float) -> set[str] | None:
        """The names changed within `timeout` (no polling in between: the thread sleeps until an event,
        the timeout or `wake`)."""
        if not self.watching:
            if self._add_watch():
                return None  # the directory is back: look at everything
            ready, _, _ = select.select([self._wake_r], [], [], min(max(0.0, timeout), RETRY_WATCH))
            return set() if ready else None
        if not self._events_ready(timeout):
            return set()
        names: set[str] = set()
        lost = False
        end = time.monotonic() + self.max_batch
        while True:
            got = self._read()
            if got is None:
                return None
            for _wd, mask, name in got:
                if mask & LOST:
                    lost = True
                    if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                        self._wd = -1
                elif name:
                    names.add(name)
            left = min(self.settle, end - time.monotonic())
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                break
        return None if lost else names

    def close(self) -> None:
        if self._fd >= 0:
            for fd in (self._fd, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fd = -1
            self._wd = -1
