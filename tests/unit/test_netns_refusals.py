"""cni.kernel.netns.open_pod_netns: the check the plugin (CNI_NETNS) and the agent (an ADD's netns, every
pin) make. A pod netns passes; the caller's own and the host's netns (also through a symlink), files that
are not nsfs (regular, directory, FIFO — not opened blocking) and other namespace types are refused."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cni.kernel import netns
from tests.unit.test_cni_plugin_process import pod_netns

__all__ = ["pod_netns"]  # a fixture


def test_a_pod_netns_passes(pod_netns: str) -> None:
    assert netns.pod_netns_inode(pod_netns) == os.stat(pod_netns).st_ino


def test_the_host_netns_is_refused_also_through_a_symlink(pod_netns: str, tmp_path: Path) -> None:
    """`host` stands for /proc/1/ns/net (unreadable in some sandboxes): any netns named as the host's."""
    with pytest.raises(netns.NetnsFileError, match="host's network namespace"):
        netns.pod_netns_inode(pod_netns, host=pod_netns)
    os.symlink(pod_netns, tmp_path / "link")
    with pytest.raises(netns.NetnsFileError, match="host's network namespace"):
        netns.pod_netns_inode(str(tmp_path / "link"), "agent", host=pod_netns)


def test_own_netns_through_a_symlink_is_refused(tmp_path: Path) -> None:
    os.symlink(f"/proc/{os.getpid()}/ns/net", tmp_path / "own")
    with pytest.raises(netns.NetnsFileError, match="agent's own"):
        netns.pod_netns_inode(str(tmp_path / "own"), "agent")


def test_files_that_are_not_nsfs_are_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    started = time.monotonic()
    for path, why in ((tmp_path / "fifo", "not a namespace file"), (tmp_path, "is a directory")):
        with pytest.raises(netns.NetnsFileError, match=why) as err:
            netns.pod_netns_inode(str(path))
        assert err.value.gone
    assert time.monotonic() - started < 1.0


def test_an_unreadable_host_reference_is_skipped(pod_netns: str, tmp_path: Path) -> None:
    assert netns.pod_netns_inode(pod_netns, host=str(tmp_path / "nope")) == os.stat(pod_netns).st_ino
