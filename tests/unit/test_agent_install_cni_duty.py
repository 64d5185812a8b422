"""install-cni run by the agent (InstallCniDuty, tmp dirs only): the entry appears at start, a rewrite that
drops it is repaired within a second, stop with cleanup restores the config byte for byte and removes the
plugin files this run installed; without cleanup everything stays; a launcher that was already current
is not removed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from node_agent.agent.duties import DutyOptions, install_options
from node_agent.install_cni import runtime, service
from node_agent.install_cni.duty import InstallCniDuty
from node_agent.install_cni.settings import PluginSettings

DATA = Path(__file__).parent.parent / "data" / "conflists"
CONFLIST = "87-podman-bridge.conflist"  # not in install-cni's own rendering: byte-identity is real work


def has_entry(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(doc["plugins"][-1].get("type") == "headrace-cni")


def wait_for(cond: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def options(tmp_path: Path, plugin: bool) -> service.InstallOptions:
    return service.InstallOptions(
        cni_conf_dir=str(tmp_path / "net.d"), cni_bin_dir=str(tmp_path / "bin"),
        install_dir=str(tmp_path / "opt"), install_plugin=plugin,
        settings=PluginSettings(agent_socket=str(tmp_path / "cni.sock"), objects_dir=str(tmp_path)),
    )


def setup_dir(tmp_path: Path) -> tuple[Path, bytes]:
    conf = tmp_path / "net.d"
    conf.mkdir()
    original = (DATA / CONFLIST).read_bytes()
    (conf / CONFLIST).write_bytes(original)
    (tmp_path / "bin").mkdir()
    return conf / CONFLIST, original


def test_install_repair_and_cleanup_byte_identical(tmp_path: Path) -> None:
    target, original = setup_dir(tmp_path)
    duty = InstallCniDuty(options(tmp_path, plugin=True), cleanup_on_exit=True)
    duty.start()
    try:
        assert has_entry(target) and duty.running
        assert runtime.is_our_launcher(str(tmp_path / "bin" / "headrace-cni"))
        for _ in range(2):  # another agent rewrites the file without our entry
            time.sleep(0.2)
            tmp = target.with_name(".rewrite.tmp")
            tmp.write_bytes(original)
            os.rename(tmp, target)
            assert wait_for(lambda: has_entry(target), 2.0) < 1.0
    finally:
        report = duty.stop()
    assert not duty.running
    assert report is not None and report["bytes_restored"] == [str(target)]
    assert target.read_bytes() == original
    assert sorted(p.name for p in target.parent.iterdir()) == [CONFLIST]
    assert list((tmp_path / "bin").iterdir()) == []
    assert not (tmp_path / "opt").exists() or list((tmp_path / "opt").iterdir()) == []


def test_without_cleanup_everything_stays(tmp_path: Path) -> None:
    target, _ = setup_dir(tmp_path)
    duty = InstallCniDuty(options(tmp_path, plugin=False))
    duty.start()
    assert duty.stop() is None
    assert has_entry(target)


def test_the_daemonset_going_away_cleans_up_without_cleanup_on_exit(tmp_path: Path) -> None:
    target, original = setup_dir(tmp_path)
    duty = InstallCniDuty(options(tmp_path, plugin=True))
    duty.start()
    assert has_entry(target)
    report = duty.stop(cleanup=True)
    assert report is not None and report["bytes_restored"] == [str(target)]
    assert target.read_bytes() == original
    assert list((tmp_path / "bin").iterdir()) == []


def test_late_config_and_preinstalled_plugin(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    opts = options(tmp_path, plugin=True)
    service.install_plugin_files(opts)  # the DaemonSet's init container did this before the agent
    duty = InstallCniDuty(opts, cleanup_on_exit=True)
    duty.start()
    try:
        conf = tmp_path / "net.d"
        conf.mkdir()
        target = conf / CONFLIST
        tmp = conf / ".new.tmp"
        tmp.write_bytes((DATA / CONFLIST).read_bytes())
        os.rename(tmp, target)
        wait_for(lambda: has_entry(target), 5.0)  # timing is proven above; here only the hand-over
    finally:
        report = duty.stop()
    assert report is not None and report["removed"] == []  # not ours to remove
    assert runtime.is_our_launcher(str(tmp_path / "bin" / "headrace-cni"))
    assert json.loads(target.read_text()) == json.loads((DATA / CONFLIST).read_text())


def test_plugin_files_the_watch_put_back_are_removed_on_cleanup(tmp_path: Path) -> None:
    """A launcher that was already current is not this agent's; once it went missing and the agent's
    watch installed it again, it is."""
    setup_dir(tmp_path)
    opts = options(tmp_path, plugin=True)
    service.install_plugin_files(opts)
    duty = InstallCniDuty(opts, cleanup_on_exit=True, plugin_recheck=0.1)
    duty.start()
    launcher = tmp_path / "bin" / "headrace-cni"
    try:
        launcher.unlink()
        wait_for(lambda: runtime.is_our_launcher(str(launcher)), 3.0)
    finally:
        report = duty.stop()
    assert report is not None and str(tmp_path / "bin" / "headrace-cni") in report["removed"]
    assert not launcher.exists()


def test_entry_points_at_this_agent(tmp_path: Path) -> None:
    from node_agent.agent.config import build_config

    objects = tmp_path / "objects"
    objects.mkdir()
    cfg = build_config(objects_dir=objects, state_dir=tmp_path / "state", backend="iptables",
                       iptables="nft", exclude_namespaces="kube-system,infra", log_level="debug")
    opts = install_options(cfg, DutyOptions(install_cni=True, cni_conf_dir="/c", cni_bin_dir="/b",
                                            cni_install_dir="/i", agent_namespace="mesh"))
    entry = opts.settings.entry()
    assert entry["agent_socket"] == str(tmp_path / "state" / "cni.sock")
    assert entry["objects_dir"] == str(objects) and entry["backend"] == "iptables" and entry["iptables"] == "nft"
    assert entry["exclude_namespaces"] == ["kube-system", "infra", "mesh"]
    assert (opts.cni_conf_dir, opts.cni_bin_dir, opts.install_dir, opts.host_root) == ("/c", "/b", "/i", "/")


def test_start_removes_what_a_killed_install_cni_left_half_written(tmp_path: Path) -> None:
    """write_atomic writes `.headrace-*.tmp` and renames it: an install-cni killed in between leaves the file
    in the host's CNI config (or binary, or install) dir. The next start removes those older than a minute;
    a fresh one (a write in progress) and every other file stay."""
    from node_agent.install_cni.atomic import TEMP_PREFIX, TEMP_SUFFIX

    target, _ = setup_dir(tmp_path)
    (tmp_path / "opt").mkdir()
    old = [tmp_path / d / f"{TEMP_PREFIX}x1{TEMP_SUFFIX}" for d in ("net.d", "bin", "opt")]
    fresh = tmp_path / "net.d" / f"{TEMP_PREFIX}x2{TEMP_SUFFIX}"
    others = [tmp_path / "net.d" / f"{TEMP_PREFIX}kept.conf", tmp_path / "net.d" / "other.tmp"]
    for path in [*old, fresh, *others]:
        path.write_text("{")
    for path in old:
        os.utime(path, (time.time() - 120, time.time() - 120))
    duty = InstallCniDuty(options(tmp_path, plugin=False))
    duty.start()
    try:
        assert not any(p.exists() for p in old)
        assert fresh.exists() and all(p.exists() for p in others) and has_entry(target)
    finally:
        duty.stop()
