"""The cgroup2 mount table is read again only after a mount or unmount (the kernel flags mountinfo)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from node_agent.backends.ebpf.attach import MountTable


def test_read_again_only_after_a_mount_change(tmp_path: Path) -> None:
    table = MountTable()
    first = table.cgroup2()
    for _ in range(20):
        assert table.cgroup2() == first
    assert table.reads == 1
    point = tmp_path / "cg"
    point.mkdir()
    subprocess.run(["mount", "-t", "cgroup2", "none", str(point)], check=True)
    try:
        assert point in table.cgroup2()
        assert table.reads == 2
        assert point in table.cgroup2()
        assert table.reads == 2
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert point not in table.cgroup2()
