"""Which pin directories changed: one inotify descriptor watching many bpffs directories, each under a key.

    events = PinEvents.open()        # None where inotify cannot be had
    events.watch("pod-uid", path)    # False: not watched (the caller reads that directory itself)
    changed, unknown = events.drain()  # keys whose directory saw a pin made, removed or renamed since the
                                       # last drain, or itself removed or moved; unknown: events were lost
    events.unwatch("pod-uid")

bpffs reports pins and unpins through the VFS like any file system (`bpf_obj_pin` creates the file with
`vfs_mkobj`, an unlink is an unlink), so a watch on a pod's pin directory stands for a stat of it at every
poll. A directory recreated under the same path is another inode: its old watch ends (IN_IGNORED, the key
reported changed) and the new one is not watched until `watch` is called again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

from cni.kernel.netns import libc
from node_agent.install_cni.watcher import (
    IN_CLOEXEC,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_NONBLOCK,
    IN_Q_OVERFLOW,
    parse_events,
)

# what changes the pins in a directory, or the directory itself (an attribute change leaves the pins as
# they were)
MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF


class PinEvents:
    def __init__(self, fd: int, lib: ctypes.CDLL) -> None:
        self._fd = fd
        self._lib = lib
        self._keys: dict[int, str] = {}  # watch descriptor -> key
        self._wds: dict[str, int] = {}  # key -> watch descriptor

    @classmethod
    def open(cls) -> PinEvents | None:
        try:
            lib = libc()
        except OSError:
            return None
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        return cls(fd, lib) if fd >= 0 else None

    def watching(self, key: str) -> bool:
        return key in self._wds

    def watch(self, key: str, path: str) -> bool:
        """Watch the directory at path under key (in place of what key watched); False when it cannot be
        watched (gone, or the watch limit reached)."""
        self.unwatch(key)
        wd = self._lib.inotify_add_watch(self._fd, os.fsencode(path), MASK)
        if wd < 0:
            return False
        if (other := self._keys.get(wd)) is not None:  # the same directory under another key: one key each
            self._wds.pop(other, None)
        self._keys[wd], self._wds[key] = key, wd
        return True

    def unwatch(self, key: str) -> None:
        wd = self._wds.pop(key, None)
        if wd is not None:
            self._keys.pop(wd, None)
            self._lib.inotify_rm_watch(self._fd, wd)

    def drain(self) -> tuple[set[str], bool]:
        """The keys whose directory changed since the last drain (a directory removed or moved is no longer
        watched), and whether events were lost (queue overflow or a failed read: anything may have
        changed)."""
        changed: set[str] = set()
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                return changed, False
            except OSError:
                return changed, True
            for wd, mask, _name in parse_events(buf):
                if mask & IN_Q_OVERFLOW:
                    return changed, True
                key = self._keys.get(wd)
                if key is None:  # a watch removed by unwatch (its IN_IGNORED) or replaced
                    continue
                changed.add(key)
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    self._keys.pop(wd, None)
                    if self._wds.get(key) == wd:
                        del self._wds[key]
                        with contextlib.suppress(OSError):
                            self._lib.inotify_rm_watch(self._fd, wd)

    def close(self) -> None:
        self._keys.clear()
        self._wds.clear()
        with contextlib.suppress(OSError):
            os.close(self._fd)
