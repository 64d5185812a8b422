"""The cgroup and TC programs, loaded once per node and pod mode.

They reference only the node's maps: a pod's parameters are entries there (hr_pod_cfg, hr_pod_ports,
hr_pod_nets, keyed by the netns cookie; for TC, hr_pod_tc by the pod's TC slot: pod_index.py), so every pod
of a mode gets the same programs attached to its cgroup (and its TC filters) and the kernel verifies each
program once per node instead of once per pod. They
are pinned under <bpffs>/node/progs-<object digest>/<function>, so a restarted agent attaches the same
programs; a directory of another digest (an older build's programs) is unpinned when this one is made,
which leaves the programs attached to pods alone (an attachment holds its program).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from node_agent.backends.ebpf import bpfsys, pinning
from node_agent.backends.ebpf.loader import CompiledObject, function_of
from node_agent.backends.ebpf.program_loads import load_programs

PREFIX = "progs-"


class NodePrograms:
    """Opens (loading and pinning on first use) the node's programs; remembers which pins it has checked
    against the node maps in this process, and keeps the programs it opened while their pin directory and
    the node maps are unchanged (a pin made or removed there changes the directory's mtime)."""

    def __init__(self) -> None:
        # pin path -> (program id, the node maps' ids) found to match: checked once per program and maps
        self._checked: dict[str, tuple[int, frozenset[int]]] = {}
        self._ids: tuple[dict[str, int], frozenset[int]] | None = None  # the last node maps dict, their ids
        self._kept: dict[str, int] = {}  # pin path -> fd of the program, valid while _kept_for holds
        self._kept_for: tuple[Path, int, int, frozenset[int]] | None = None  # (dir, inode, mtime ns, node map ids)

    def open(
        self, root: Path, obj: CompiledObject, node_fds: dict[str, int], names: Sequence[str], *, ambient: bool
    ) -> dict[str, int]:
        """program name → fd of the node's program for a pod of that mode (the caller closes them), using the
        node maps node_fds (their ids are remembered per dict: the caller keeps one dict per opening)."""
        node_ids = self._ids_of(node_fds)
        pdir = self._dir(root, obj)
        self._keep_for(pdir, node_ids)
        out: dict[str, int] = {}
        missing: list[str] = []
        try:
            for name in names:
                path = pdir / function_of(name, ambient, node=True)
                kept = self._kept.get(str(path))
                if kept is None:
                    kept = self._usable(path, node_ids)
                    if kept is None:
                        missing.append(name)
                        continue
                    self._kept[str(path)] = kept
                out[name] = os.dup(kept)
            if missing:
                loaded = load_programs(obj, node_fds, missing, ambient=ambient, node=True)
                out.update(loaded)
                for name, fd in loaded.items():
                    path = pdir / function_of(name, ambient, node=True)
                    pinning.pin(fd, path)
                    self._checked[str(path)] = (bpfsys.prog_info(fd).prog_id, node_ids)
        except BaseException:
            for fd in out.values():
                os.close(fd)
            raise
        return out

    def _keep_for(self, pdir: Path, node_ids: frozenset[int]) -> None:
        st = os.stat(pdir)
        key = (pdir, st.st_ino, st.st_mtime_ns, node_ids)
        if key != self._kept_for:
            self.close()
            self._kept_for = key

    def close(self) -> None:
        """Let go of the programs kept open."""
        for fd in self._kept.values():
            os.close(fd)
        self._kept.clear()
        self._kept_for = None

    def _dir(self, root: Path, obj: CompiledObject) -> Path:
        node = root / pinning.NODE_DIR
        pdir = node / f"{PREFIX}{obj.digest}"
        if not pdir.is_dir():
            for old in node.glob(f"{PREFIX}*"):
                pinning.remove_dir(old)
            pdir.mkdir()
        return pdir

    def _ids_of(self, node_fds: dict[str, int]) -> frozenset[int]:
        if self._ids is None or self._ids[0] is not node_fds:
            self._ids = (node_fds, frozenset(bpfsys.map_info(fd).map_id for fd in node_fds.values()))
        return self._ids[1]

    def _usable(self, path: Path, node_ids: frozenset[int]) -> int | None:
        """The pinned program's fd when it uses the node maps open now (maps made again after an unpin
        leave older programs pointing at the old ones); else it is unpinned and None."""
        fd = pinning.open_pinned(path)
        if fd is None:
            return None
        info = bpfsys.prog_info(fd)
        if self._checked.get(str(path)) == (info.prog_id, node_ids):
            return fd
        if set(info.map_ids) <= node_ids:
            self._checked[str(path)] = (info.prog_id, node_ids)
            return fd
        os.close(fd)
        pinning.unpin(path)
        return None
