"""Pure parsing of the node proxy's cgroup: /proc/PID/cgroup text, /proc/self/mountinfo, refusals."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from node_agent.proxy.cgroup import (
    Cgroup2Mount,
    ProxyCgroupError,
    cgroup2_mounts,
    directory_of,
    refusal,
    unified_path,
)

HYBRID_CGROUP = """\
12:pids:/kubepods/besteffort/pod1234/abc
4:memory:/kubepods/besteffort/pod1234/abc
1:name=systemd:/kubepods/besteffort/pod1234/abc
0::/kubepods/besteffort/pod1234/abc
"""

HYBRID_MOUNTINFO = """\
25 31 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 35 0:38 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
42 35 0:39 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
"""

PURE_V2_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""


def test_unified_line_of_a_hybrid_host() -> None:
    assert unified_path(HYBRID_CGROUP) == "/kubepods/besteffort/pod1234/abc"


def test_pure_v2_and_root() -> None:
    assert unified_path("0::/system.slice/ztunnel.service\n") == "/system.slice/ztunnel.service"
    assert unified_path("0::/\n") == "/"


def test_path_with_colons_is_kept_whole() -> None:
    assert unified_path("0::/kubepods.slice/cri-containerd:abc.scope\n") == "/kubepods.slice/cri-containerd:abc.scope"


def test_v1_only_is_an_error() -> None:
    with pytest.raises(ProxyCgroupError, match="v1 hierarchies only"):
        unified_path("4:memory:/x\n1:name=systemd:/x\n")


def test_deleted_cgroup_is_an_error() -> None:
    with pytest.raises(ProxyCgroupError, match="was removed"):
        unified_path("0::/gone (deleted)\n")


def test_relative_path_is_an_error() -> None:
    with pytest.raises(ProxyCgroupError, match="unexpected"):
        unified_path("0::weird\n")


def test_mounts_hybrid_and_pure() -> None:
    assert cgroup2_mounts(HYBRID_MOUNTINFO) == [Cgroup2Mount("/", "/sys/fs/cgroup/unified")]
    assert cgroup2_mounts(PURE_V2_MOUNTINFO) == [Cgroup2Mount("/", "/sys/fs/cgroup")]
    assert cgroup2_mounts("") == []


def test_overmount_keeps_the_visible_one_and_unescapes() -> None:
    text = (
        "30 25 0:26 /kubepods/pod1/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
        "31 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
        "32 25 0:26 / /host/my\\040cg rw - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_mounts(text) == [Cgroup2Mount("/", "/sys/fs/cgroup"), Cgroup2Mount("/", "/host/my cg")]


def test_directory_under_the_mount() -> None:
    mounts = cgroup2_mounts(HYBRID_MOUNTINFO)
    assert directory_of("/kubepods/pod1/c", mounts) == PurePosixPath("/sys/fs/cgroup/unified/kubepods/pod1/c")
    assert directory_of("/", mounts) == PurePosixPath("/sys/fs/cgroup/unified")


def test_directory_under_a_mounted_subtree() -> None:
    mounts = [Cgroup2Mount("/kubepods", "/mnt/kp"), Cgroup2Mount("/", "/sys/fs/cgroup")]
    assert directory_of("/kubepods/pod1/c", mounts) == PurePosixPath("/mnt/kp/pod1/c")
    assert directory_of("/system.slice/x", mounts) == PurePosixPath("/sys/fs/cgroup/system.slice/x")
    assert directory_of("/system.slice/x", mounts[:1]) is None


def test_path_outside_the_cgroup_namespace_has_no_directory() -> None:
    # an agent in a private cgroup namespace sees other containers as /../...
    assert directory_of("/../../kubepods/pod1/c", [Cgroup2Mount("/", "/sys/fs/cgroup")]) is None


def test_refusals() -> None:
    assert refusal("/", "/agent") is not None and "root cgroup" in str(refusal("/", "/agent"))
    assert "agent's own cgroup" in str(refusal("/kubepods/a", "/kubepods/a"))
    assert "contains the agent" in str(refusal("/kubepods", "/kubepods/a/b"))
    # an agent in its own cgroup namespace: `/..` is an ancestor of the agent's cgroup
    assert "contains the agent" in str(refusal("/../..", "/"))
    assert refusal("/kubepods/proxy", "/kubepods/agent") is None
    assert refusal("/kubepods/a-b", "/kubepods/a") is None  # a sibling with a common name prefix
    assert refusal("/x", None) is None
