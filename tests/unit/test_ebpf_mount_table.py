"""Parsing the cgroup2 mount points out of mountinfo (the re-read on change: tests/kernel)."""

from __future__ import annotations

from pathlib import Path

from node_agent.backends.ebpf.attach import parse_cgroup2_mounts

MOUNTINFO = (
    "25 1 0:23 / /sys/fs/cgroup rw,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n"
    "26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n"
    "27 25 0:25 / /run/my\\040cgroups rw shared:11 - cgroup2 none rw\n"
)


def test_parse() -> None:
    assert parse_cgroup2_mounts(MOUNTINFO) == [Path("/sys/fs/cgroup/unified"), Path("/run/my cgroups")]
