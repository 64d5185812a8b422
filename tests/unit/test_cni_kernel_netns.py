"""cni.kernel.netns without root: the plugin's netns-file check, the lazy imports, errors of a netns thread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cni.kernel import netns


def test_own_netns_is_refused() -> None:
    with pytest.raises(netns.NetnsFileError) as err:
        netns.pod_netns_inode("/proc/self/ns/net")
    assert "own (node) network namespace" in err.value.msg and not err.value.gone


def test_missing_path_and_plain_file_are_gone(tmp_path: Path) -> None:
    with pytest.raises(netns.NetnsFileError) as err:
        netns.pod_netns_inode(str(tmp_path / "nope"))
    assert err.value.gone and "does not exist" in err.value.msg
    plain = tmp_path / "pin"
    plain.write_bytes(b"")
    with pytest.raises(netns.NetnsFileError) as err:
        netns.pod_netns_inode(str(plain))
    assert err.value.gone and "not a namespace file" in err.value.msg


def test_other_namespace_types_are_not_network_namespaces() -> None:
    with pytest.raises(netns.NetnsFileError) as err:
        netns.pod_netns_inode("/proc/self/ns/uts")
    assert not err.value.gone and "is not a network namespace" in err.value.msg


def test_import_loads_neither_ctypes_nor_threading() -> None:
    """The CNI plugin checks CNI_NETNS with this module on every ADD."""
    repo = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys\nsys.path.insert(0, {repo!r})\nimport cni.kernel.netns\n"
        "print(sorted({'ctypes', 'threading'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_libc_is_loaded_once() -> None:
    assert netns.libc() is netns.libc()
    assert netns.libc().getpid() == os.getpid()


def test_thread_errors_reach_the_caller(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        netns.run_in_thread(str(tmp_path / "nope"), lambda: 1)


def test_entering_a_missing_netns_leaves_the_thread_where_it_was(tmp_path: Path) -> None:
    before = os.stat(netns.THREAD_NETNS).st_ino
    with pytest.raises(FileNotFoundError), netns.entered(str(tmp_path / "nope")):
        pytest.fail("the body must not run")
    assert os.stat(netns.THREAD_NETNS).st_ino == before
