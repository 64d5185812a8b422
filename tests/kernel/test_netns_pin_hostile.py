"""Pins never mount anything that is not a pod's network namespace, and release every mount on every
path: hostile sources (a regular file, a directory, a FIFO, the agent's own netns, a symlink to it,
another namespace type) are refused before mounting, repeatedly, leaving nothing in /proc/self/mountinfo;
leftovers stacked at a pin path by an older agent are all unmounted on release and before a new pin."""

from __future__ import annotations

import ctypes
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.netns.pin import NetnsPins, NotPodNetns, PinError

from cni.kernel.netns import libc

pytestmark = pytest.mark.kernel

MS_BIND = 0x1000


def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


@pytest.fixture
def pins(tmp_path: Path) -> Iterator[NetnsPins]:
    pn = NetnsPins(tmp_path / "netns")
    try:
        yield pn
    finally:
        for mount in reversed(mounts_under(tmp_path)):  # whatever a failing test left
            libc().umount2(mount.encode(), 2)


@pytest.fixture
def pod_ns() -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        path = f"/proc/{proc.pid}/ns/net"
        for _ in range(200):
            if os.path.exists(path) and os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            subprocess.run(["sleep", "0.01"], check=True)
        yield path, os.stat(path).st_ino
    finally:
        proc.kill()
        proc.wait()


def hostile_sources(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "regular").write_text("")
    (tmp_path / "dir").mkdir(exist_ok=True)
    if not (tmp_path / "fifo").exists():
        os.mkfifo(tmp_path / "fifo")
    if not (tmp_path / "link-own").exists():
        os.symlink("/proc/self/ns/net", tmp_path / "link-own")
    return {
        "regular": str(tmp_path / "regular"),
        "directory": str(tmp_path / "dir"),
        "fifo": str(tmp_path / "fifo"),
        "own": "/proc/self/ns/net",
        "own-symlink": str(tmp_path / "link-own"),
        "uts": "/proc/self/ns/uts",
    }


def test_hostile_sources_are_refused_before_mounting(pins: NetnsPins, tmp_path: Path) -> None:
    sources = hostile_sources(tmp_path)
    for _ in range(20):  # repeated hostile ADDs: nothing accumulates
        for kind, source in sources.items():
            uid = str(uuid.uuid4())
            with pytest.raises(NotPodNetns) as err:
                pins.pin(uid, source, os.stat(source).st_ino)
            assert source in str(err.value) or kind in ("own-symlink",), str(err.value)
            assert not pins.path(uid).exists(), kind
    assert mounts_under(tmp_path) == []
    assert pins.pinned() == {} and pins.leftovers() == []


def test_refusal_messages_say_why(pins: NetnsPins, tmp_path: Path) -> None:
    sources = hostile_sources(tmp_path)
    why: dict[str, str] = {}
    for kind, src in sources.items():
        with pytest.raises(NotPodNetns) as err:
            pins.pin("u1", src, os.stat(src).st_ino)
        why[kind] = str(err.value)
    assert "not a namespace file" in why["regular"] and "is a directory" in why["directory"]
    assert "not a namespace file" in why["fifo"]
    assert "agent's own (node) network namespace" in why["own"] and "own" in why["own-symlink"]
    assert "not a network namespace" in why["uts"]


def test_pod_netns_pins_and_releases_cleanly(pins: NetnsPins, tmp_path: Path, pod_ns: tuple[str, int]) -> None:
    path, ino = pod_ns
    for _ in range(10):
        uid = str(uuid.uuid4())
        pinned = pins.pin(uid, path, ino)
        assert pins.verify(uid, ino) == pinned and mounts_under(tmp_path) == [pinned]
        with pytest.raises(PinError):
            pins.pin(uid, path, ino + 1)  # the expected inode is checked on the open fd
        pins.release(uid)
        assert mounts_under(tmp_path) == [] and not Path(pinned).exists()


def test_stacked_leftovers_are_all_unmounted(pins: NetnsPins, tmp_path: Path, pod_ns: tuple[str, int]) -> None:
    """What an older agent left (a regular file bind-mounted three times over the pin path, then a real
    netns on top) is unmounted completely: release unlinks the file, and a new pin starts clean."""
    path, ino = pod_ns
    uid = str(uuid.uuid4())
    pins.ensure_dir()
    target = pins.path(uid)
    target.touch()
    junk = tmp_path / "junk"
    junk.write_text("")
    mount = libc().mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    for _ in range(3):
        assert mount(str(junk).encode(), str(target).encode(), None, MS_BIND, None) == 0
    assert mount(path.encode(), str(target).encode(), None, MS_BIND, None) == 0
    assert len(mounts_under(tmp_path)) == 4
    pins.release(uid)
    assert mounts_under(tmp_path) == [] and not target.exists()

    target.touch()
    for _ in range(3):
        assert mount(str(junk).encode(), str(target).encode(), None, MS_BIND, None) == 0
    pinned = pins.pin(uid, path, ino)  # nothing stacked under the new pin
    assert mounts_under(tmp_path) == [pinned] and pins.verify(uid, ino) == pinned
    pins.release(uid)
    assert mounts_under(tmp_path) == []
