"""--bpffs-dir: where the eBPF pins are kept (the mounts themselves: tests/kernel/test_ebpf_bpffs_dir.py).
Which filesystem a path is on, read from mountinfo; the node directory or, without a bpffs above it, a
bpffs of the agent's own (warned); the flag validated and handed to the backend."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from node_agent.agent import daemon
from node_agent.agent.config import ConfigError, build_config
from node_agent.backends import select
from node_agent.backends.ebpf import pinning
from node_agent.backends.ebpf.backend import EbpfBackend
from node_agent.commands.agent import agent

MOUNTINFO = (
    "22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n"
    "30 22 0:27 / /sys/fs/bpf rw,nosuid shared:12 - bpf bpf rw,mode=700\n"
    "31 1 0:27 /headrace /var/run/headrace/bpf rw shared:12 - bpf bpf rw,mode=700\n"  # a bind of its subdirectory
    "32 1 0:28 / /run/my\\040state rw shared:13 - tmpfs tmpfs rw\n"
    "33 32 0:29 / /run/my\\040state/bpf rw - bpf bpf rw\n"
)


def table() -> list[tuple[str, str]]:
    return pinning.parse_mounts(MOUNTINFO.splitlines(keepends=True))


def test_mountinfo_lines_are_read_as_mount_point_and_type() -> None:
    assert table() == [("/sys", "sysfs"), ("/sys/fs/bpf", "bpf"), ("/var/run/headrace/bpf", "bpf"),
                       ("/run/my state", "tmpfs"), ("/run/my state/bpf", "bpf")]
    assert pinning.parse_mounts(["24 1 0:22 / /a\\011b\\134c rw - ext4 /dev/x rw\n"]) == [("/a\tb\\c", "ext4")]


@pytest.mark.parametrize(("path", "fstype"), [
    ("/sys/fs/bpf", "bpf"),
    ("/sys/fs/bpf/headrace", "bpf"),
    ("/sys/fs/bpf/headrace/node/hr_pod_cfg", "bpf"),
    ("/sys/fs/bpfx", "sysfs"),  # a mount point's name is no prefix of its sibling's
    ("/sys/fs", "sysfs"),
    ("/var/run/headrace/bpf/pod-1", "bpf"),
    ("/var/run/headrace", None),  # no mount covers it in this table
    ("/run/my state/bpf/node", "bpf"),
    ("/run/my state/x", "tmpfs"),
])
def test_the_mount_a_path_is_on_is_the_longest_covering_one(path: str, fstype: str | None) -> None:
    assert pinning.fstype_under(path, table()) == fstype


def test_the_last_mount_at_a_mount_point_wins() -> None:
    assert pinning.fstype_under("/sys/fs/bpf/x", [("/", "ext4"), ("/sys/fs/bpf", "bpf"), ("/sys/fs/bpf", "tmpfs")]
                                ) == "tmpfs"
    assert pinning.fstype_under("/x", [("/", "ext4")]) == "ext4"


def on(monkeypatch: pytest.MonkeyPatch, fstype_at: dict[Path, str]) -> None:
    """mountinfo as if each of these paths were a mount point of that type (and nothing else mounted)."""
    monkeypatch.setattr(pinning, "mounts", lambda: [(str(p), t) for p, t in fstype_at.items()])


def test_the_node_directory_is_made_on_a_bpffs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on(monkeypatch, {tmp_path: "bpf"})
    node_dir = tmp_path / "headrace"
    assert pinning.node_pins(node_dir) == node_dir
    assert node_dir.stat().st_mode & 0o777 == 0o700
    assert pinning.node_pins(node_dir) == node_dir  # there already (the pins of an agent before)
    (tmp_path / "file").write_text("")
    with pytest.raises(pinning.PinError, match="not a directory"):
        pinning.node_pins(tmp_path / "file")


def test_without_a_bpffs_above_it_the_pins_stay_private_and_it_is_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    on(monkeypatch, {tmp_path: "tmpfs"})
    with caplog.at_level(logging.WARNING, logger="headrace.backend.ebpf"):
        assert pinning.node_pins(tmp_path / "headrace") is None
        assert pinning.node_pins(tmp_path / "missing" / "headrace") is None
    assert not (tmp_path / "headrace").exists()
    assert [r.__dict__.get("event") for r in caplog.records] == ["ebpf_pins_private"] * 2
    assert "lost when its container restarts" in caplog.text


@pytest.mark.parametrize("node_fs", ["bpf", "tmpfs", None])
def test_state_bpf_is_a_bind_of_the_node_directory_or_a_bpffs_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node_fs: str | None) -> None:
    node_bpffs, state = tmp_path / "sys-fs-bpf", tmp_path / "state"
    node_bpffs.mkdir()
    on(monkeypatch, {node_bpffs: "bpf" if node_fs == "bpf" else "tmpfs"})
    mounted: list[list[str]] = []

    def run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        mounted.append(argv)
        monkeypatch.setattr(pinning, "mount_fstype", lambda path: "bpf")  # what either mount reads as
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(pinning, "mount_fstype", lambda path: None)
    monkeypatch.setattr(subprocess, "run", run)
    node_dir = node_bpffs / "headrace" if node_fs is not None else None
    assert pinning.ensure_bpffs(state, node_dir) == state / "bpf"
    bind = ["mount", "--bind", str(node_bpffs / "headrace"), str(state / "bpf")]
    assert mounted == [bind if node_fs == "bpf" else ["mount", "-t", "bpf", "bpf", str(state / "bpf")]]
    assert pinning.ensure_bpffs(state, node_dir) == state / "bpf" and len(mounted) == 1  # mounted: kept


def test_a_mount_that_is_no_bpffs_is_taken_off_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(pinning, "mount_fstype", lambda path: None)  # whatever was mounted: no bpffs
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(pinning.PinError, match="cannot mount a bpffs"):
        pinning.ensure_bpffs(tmp_path / "state")
    assert calls[-1] == ["umount", str(tmp_path / "state" / "bpf")]


def test_the_pins_are_found_in_the_node_directory_before_it_is_mounted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted container's agent: <state-dir>/bpf not mounted (yet), the pins in the node directory."""
    node_dir, state = tmp_path / "headrace", tmp_path / "state"
    (node_dir / "pod-1").mkdir(parents=True)
    (node_dir / pinning.NODE_DIR).mkdir()
    on(monkeypatch, {tmp_path: "bpf"})
    assert pinning.found_root(state, node_dir) == node_dir
    assert pinning.pinned_pod_dirs(state, node_dir) == ["pod-1"]
    assert pinning.pinned_pod_dirs(state) == []  # without the option: nothing mounted, nothing pinned
    assert pinning.found_root(state, tmp_path / "missing") is None
    on(monkeypatch, {tmp_path: "tmpfs"})
    assert pinning.found_root(state, node_dir) is None  # not on a bpffs: not ours to read


def test_the_flag_is_validated(tmp_path: Path) -> None:
    assert build_config(objects_dir=tmp_path).bpffs_dir is None  # default: a bpffs of the agent's own
    cfg = build_config(objects_dir=tmp_path, state_dir=tmp_path / "state", bpffs_dir="/sys/fs/bpf/headrace")
    assert cfg.bpffs_dir == Path("/sys/fs/bpf/headrace")
    with pytest.raises(ConfigError, match="--bpffs-dir 'headrace': an absolute path"):
        build_config(objects_dir=tmp_path, bpffs_dir="headrace")
    for inside in (tmp_path / "state", tmp_path / "state" / "bpf", tmp_path / "state" / "x" / "y"):
        with pytest.raises(ConfigError, match="inside --state-dir"):
            build_config(objects_dir=tmp_path, state_dir=tmp_path / "state", bpffs_dir=inside)
    out = CliRunner().invoke(agent, ["--objects-dir", str(tmp_path), "--bpffs-dir", "relative/dir"])
    assert out.exit_code == 2 and "--bpffs-dir 'relative/dir'" in out.output


def test_the_flag_reaches_the_ebpf_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "_iptables", lambda flavour, change_count_dir=None: None)
    chosen = select.select_backend("ebpf", state_dir=tmp_path, problems_fn=list, iptables_present=True,
                                   bpffs_dir="/sys/fs/bpf/hr")
    assert isinstance(chosen.backend, EbpfBackend) and chosen.backend.pins.node_dir == Path("/sys/fs/bpf/hr")
    default = select.select_backend("ebpf", state_dir=tmp_path, problems_fn=list, iptables_present=True)
    assert isinstance(default.backend, EbpfBackend) and default.backend.pins.node_dir is None
    asked: dict[str, Any] = {}

    def choose(setting: str, **kwargs: Any) -> select.BackendChoice:
        asked.update(kwargs)
        return chosen

    monkeypatch.setattr(daemon, "select_backend", choose)
    cfg = build_config(objects_dir=tmp_path, state_dir=tmp_path / "state", bpffs_dir="/sys/fs/bpf/hr")
    assert daemon.make_backend(cfg, "nft") is chosen.backend
    assert asked["bpffs_dir"] == Path("/sys/fs/bpf/hr")
