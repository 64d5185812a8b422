"""The cgroup2 mount table is read again only after a mount or unmount (the kernel flags mountinfo); a pod
cgroup is validated without it (the directory's filesystem and mount-root flag), and a validated path is
remembered until it leads elsewhere."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from node_agent.backends.ebpf import attach, cgroup_fs
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


def test_a_valid_cgroup_path_is_remembered_until_it_leads_elsewhere(tmp_path: Path) -> None:
    """validate_cgroup remembers a valid path with the directory it led to: the same path pointing at
    another directory (a swapped symlink) is judged again, and refused when that is no pod cgroup."""
    root = attach.cgroup2_mounts()[0]
    cg = root / f"hrtest-valid-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        link = tmp_path / "pod-cgroup"
        link.symlink_to(cg)
        assert attach.validate_cgroup(str(link)) == cg
        assert attach.validate_cgroup(str(link)) == cg  # remembered
        link.unlink()
        link.symlink_to(tmp_path)  # not a cgroup2 directory
        with pytest.raises(attach.CgroupError, match="not inside a cgroup2 mount"):
            attach.validate_cgroup(str(link))
        link.unlink()
        link.symlink_to(root)  # the host's cgroup root
        with pytest.raises(attach.CgroupError, match="cgroup2 root"):
            attach.validate_cgroup(str(link))
        link.unlink()
        link.symlink_to(cg)
        assert attach.validate_cgroup(str(link)) == cg
    finally:
        cg.rmdir()
    with pytest.raises(attach.CgroupError, match="does not exist"):
        attach.validate_cgroup(str(link))


def test_validation_reads_no_mount_table_and_refuses_any_cgroup2_mount_root(tmp_path: Path) -> None:
    """Each pod netns pinned is a mount: validation asks the directory, never the (changed) table. The
    root of any cgroup2 mount is refused, a bind mount of a pod cgroup too; kernels that cannot tell a
    mount root compare with the table's mount points."""
    root = attach.cgroup2_mounts()[0]
    cg = root / f"hrtest-valid-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    point = tmp_path / "bound"
    point.mkdir()
    reads = attach.MOUNTS.reads
    subprocess.run(["mount", "--bind", str(cg), str(point)], check=True)
    try:
        assert attach.validate_cgroup(str(cg)) == cg
        with pytest.raises(attach.CgroupError, match="cgroup2 root"):
            attach.validate_cgroup(str(point))
        with pytest.raises(attach.CgroupError, match="not inside a cgroup2 mount"):
            attach.validate_cgroup(str(tmp_path))
        assert attach.MOUNTS.reads == reads
        with pytest.MonkeyPatch.context() as mp:  # a kernel before 5.8
            mp.setattr(cgroup_fs, "mount_root", lambda fd: None)
            with pytest.raises(attach.CgroupError, match="cgroup2 root"):
                attach.validate_cgroup(str(root))
            assert attach.validate_cgroup(f"{cg}/.") == cg
    finally:
        subprocess.run(["umount", str(point)], check=True)
        cg.rmdir()
