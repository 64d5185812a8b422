"""cni.kernel.netns on real namespaces: a thread enters one and comes back; a fresh thread runs work there."""

from __future__ import annotations

import os
import socket

import pytest

from cni.kernel import netns
from tests.harness.netns import NetNS

pytestmark = pytest.mark.kernel


def _here() -> int:
    return os.stat(netns.THREAD_NETNS).st_ino


def test_entered_by_path_and_by_fd_returns_home(ns: NetNS) -> None:
    home = _here()
    with netns.entered(ns.path):
        assert _here() == ns.inode()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert _here() == home
    sock.close()
    fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(RuntimeError), netns.entered(fd):
            assert _here() == ns.inode()
            raise RuntimeError("body failed")
        assert _here() == home
        os.fstat(fd)  # the caller's fd stays open
    finally:
        os.close(fd)


def test_run_in_thread_does_not_move_the_caller(ns: NetNS) -> None:
    home = _here()
    assert netns.run_in_thread(ns.path, _here) == ns.inode()
    assert _here() == home


def test_a_namespace_of_another_type_is_refused_by_setns() -> None:
    with pytest.raises(OSError) as err:
        netns.run_in_thread("/proc/self/ns/uts", _here)
    assert "setns /proc/self/ns/uts" in str(err.value)
