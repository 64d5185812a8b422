"""The maps shared by every pod of the node, pinned under <bpffs>/node: the connection state maps and every
pod's parameters (pod_index.py). A pod's own maps are made fresh for each apply (`create_pod_maps`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from node_agent.backends.ebpf import bpfsys, loader, maps, pinning, pod_index


def close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class NodeMaps:
    """The node maps' fds, opened once and kept while their pins are the ones opened: one stat of the pin
    directory instead of opening every pin for each pod (a pin made or removed there changes its mtime;
    then each map's pin is stat'ed, and the fds are kept while every pin is still the file they came
    from: the node's programs and the proxy's are pinned in the same directory). A directory whose mtime
    is still the coarse clock's current tick is not taken as checked (`pinning.settled_identity`)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._seen: tuple[int, int] | None = None  # the node dir's (inode, mtime ns) the fds were checked at
        self._dir: Path | None = None
        self._pins: dict[str, int] = {}  # map name → inode of the pin its fd was opened from

    def get(self, root: Path, obj: Callable[[], loader.CompiledObject]) -> dict[str, int]:
        """name → fd of each node map (owned here: callers do not close them), made and pinned where
        missing; obj is only called then. OSError (BpfSysError included) when one cannot be made."""
        ndir = root / pinning.NODE_DIR
        if (fds := self.current(root)) is not None:
            return fds
        self.close()
        fds = open_node_maps(ndir, obj)
        try:
            self._pins = {name: os.stat(ndir / name).st_ino for name in fds}
            seen = pinning.settled_identity(ndir)  # after any pin it made
        except BaseException:
            close_all(fds)
            raise
        self._fds, self._seen, self._dir = fds, seen, ndir
        return fds

    def current(self, root: Path) -> dict[str, int] | None:
        """The fds `get` opened, while their pins are the same files; else None (nothing opened or made
        here: a read-only caller then opens the pins itself)."""
        if not self._fds:
            return None
        ndir = root / pinning.NODE_DIR
        try:
            if ndir != self._dir or pinning.dir_identity(ndir) != self._seen:
                if any(os.stat(ndir / name).st_ino != ino for name, ino in self._pins.items()):
                    return None
                self._dir, self._seen = ndir, pinning.settled_identity(ndir)  # something else changed there
        except FileNotFoundError:
            return None
        return self._fds

    def close(self) -> None:
        close_all(self._fds)
        self._seen = self._dir = None
        self._pins = {}


def open_node_maps(ndir: Path, obj: Callable[[], loader.CompiledObject]) -> dict[str, int]:
    """Open the node maps pinned in ndir, making and pinning those missing (the caller closes them)."""
    ndir.mkdir(exist_ok=True)
    fds: dict[str, int] = {}
    try:
        for name in loader.NODE_MAPS:
            fd = pinning.open_pinned(ndir / name)
            if fd is None:
                fd = bpfsys.map_create(obj().maps[name], name)
                pinning.pin(fd, ndir / name)
            fds[name] = fd
    except BaseException:
        close_all(fds)
        raise
    return fds


def create_pod_maps(obj: loader.CompiledObject, pm: maps.PodMaps, *, every: bool) -> dict[str, int]:
    """A pod's own maps, made and filled (the caller closes them). every: each of them, empty sets too (the
    pod's own TC programs read them); else the config and the sets that hold something (the rest would be
    the record of nothing: pod_index.pinned reads a set that is not pinned as empty)."""
    fds: dict[str, int] = {}
    try:
        fds["hr_cfg"] = bpfsys.map_create(obj.maps["hr_cfg"], "hr_cfg")
        bpfsys.map_update(fds["hr_cfg"], b"\0\0\0\0", pm.config)
        for map_name, keys in pod_index.sets_of(pm).items():
            if keys or every:
                fds[map_name] = bpfsys.map_create(obj.maps[map_name], map_name)
            for key in keys:
                bpfsys.map_update(fds[map_name], key, b"\1")
    except BaseException:
        close_all(fds)
        raise
    return fds
