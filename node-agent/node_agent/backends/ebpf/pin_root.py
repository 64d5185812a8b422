"""The root of one backend's pins, <state-dir>/bpf: mounted on first use (`pinning.ensure_bpffs`: a bpffs
of the agent's mount namespace, or a bind of the node directory on the node's bpffs), remembered once seen
mounted (a mountinfo read costs ~1 ms), unmounted when the backend closes with no pod pinned."""

from __future__ import annotations

from pathlib import Path

from node_agent.backends.ebpf import pinning


class PinRoot:
    def __init__(self, state_dir: Path, node_dir: Path | None = None) -> None:
        """node_dir: where on the node's bpffs the pins are kept (None: in a bpffs of the agent's own)."""
        self.state_dir = state_dir
        self.node_dir = node_dir
        self.path = state_dir / "bpf"
        self.mounted: Path | None = None  # self.path once seen mounted

    def get(self) -> Path:
        """The root, mounted now if it is not (PinError when it cannot be)."""
        if self.mounted is not None and self.mounted.is_dir():
            return self.mounted
        self.mounted = pinning.ensure_bpffs(self.state_dir, self.node_dir)
        return self.mounted

    def found(self) -> Path | None:
        """Where the pins are, mounting nothing (a node that never ran eBPF has no bpffs: looked for, not
        mounted; `pinning.found_root`)."""
        if self.mounted is not None:
            return self.mounted
        root = pinning.found_root(self.state_dir, self.node_dir)
        if root == self.path:
            self.mounted = root
        return root

    def pod_dirs(self) -> list[str]:
        """The pods with a pin directory (read afresh: for the agent's garbage collection)."""
        return pinning.pinned_pod_dirs(self.state_dir, self.node_dir)

    def release_if_unused(self) -> None:
        """With no pod pinned: the node maps unpinned, the root unmounted (PinError)."""
        if pinning.unmount_if_unused(self.state_dir, self.node_dir):
            self.mounted = None
