"""Watch mode: our entry comes back within a second when dropped; a late primary config is picked up."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.install_cni import service
from node_agent.install_cni.repair_throttle import RepairThrottle
from node_agent.install_cni.settings import PluginSettings
from node_agent.install_cni.watcher import IN_CREATE, IN_IGNORED, DirWatcher, parse_events

DATA = Path(__file__).parent.parent / "data" / "conflists"


def has_entry(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(doc["plugins"][-1].get("type") == "headrace-cni")


def wait_for(cond, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(params=[True, False], ids=["inotify", "polling"])
def watching(request, tmp_path) -> Iterator[tuple[Path, threading.Thread]]:
    conf_dir = tmp_path / "etc" / "cni" / "net.d"
    opts = service.InstallOptions(
        cni_conf_dir="/etc/cni/net.d", cni_bin_dir="/opt/cni/bin", install_dir="/opt/headrace",
        host_root=str(tmp_path), install_plugin=False, settings=PluginSettings(),
    )
    stop = threading.Event()
    t = threading.Thread(target=service.watch, args=(opts, stop), kwargs={"use_inotify": request.param})
    t.start()
    try:
        yield conf_dir, t
    finally:
        stop.set()
        t.join(timeout=5)
        assert not t.is_alive(), "watch did not stop within 5 s"


def test_late_config_then_dropped_entry_is_repaired(watching):
    conf_dir, _ = watching
    time.sleep(0.3)  # the node is "booting": no config dir yet
    conf_dir.mkdir(parents=True)
    target = conf_dir / "87-podman-bridge.conflist"
    tmp = conf_dir / ".podman.tmp"
    shutil.copy(DATA / "87-podman-bridge.conflist", tmp)
    os.rename(tmp, target)
    assert wait_for(lambda: has_entry(target), 2.0) < 1.5

    for rewrite in ("rename", "in-place"):
        time.sleep(0.2)
        before = target.stat().st_ino, target.stat().st_mtime_ns
        if rewrite == "rename":  # how a CNI agent replaces its file atomically
            shutil.copy(DATA / "87-podman-bridge.conflist", tmp)
            os.rename(tmp, target)
        else:  # truncate + write
            target.write_bytes((DATA / "87-podman-bridge.conflist").read_bytes())
        # (the watcher may already have put the entry back here: wait for a file newer than ours)
        elapsed = wait_for(
            lambda b=before: has_entry(target) and (target.stat().st_ino, target.stat().st_mtime_ns) != b, 2.0)
        assert elapsed < 1.0, f"re-inserted after {elapsed:.2f}s ({rewrite})"
    doc = json.loads(target.read_text())
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "portmap", "firewall", "tuning", "headrace-cni"]


def test_a_conf_its_owner_writes_again_is_converted_again(watching):
    """Multus, OVN-Kubernetes and older Cilium write their .conf again on restart; it sorts before the
    conflist we made from the old one, so the runtime would use it without our entry."""
    conf_dir, _ = watching
    conf_dir.mkdir(parents=True)
    shutil.copy(DATA / "10-mynet.conf", conf_dir / "10-mynet.conf")
    conflist = conf_dir / "10-mynet.conflist"
    wait_for(lambda: has_entry(conflist) and not (conf_dir / "10-mynet.conf").exists(), 2.0)
    conf = json.loads((DATA / "10-mynet.conf").read_text())
    conf["mtu"] = 1400
    (conf_dir / "10-mynet.conf").write_text(json.dumps(conf))

    def converted_again() -> bool:
        plugins = json.loads(conflist.read_text())["plugins"]
        return not (conf_dir / "10-mynet.conf").exists() and plugins[0].get("mtu") == 1400
    assert wait_for(converted_again, 2.0) < 1.5
    assert has_entry(conflist)


def test_broken_file_is_left_alone_until_fixed(watching):
    conf_dir, t = watching
    conf_dir.mkdir(parents=True)
    bad = conf_dir / "20-bad.conflist"
    shutil.copy(DATA / "20-bad.conflist", bad)
    time.sleep(0.5)
    assert bad.read_bytes() == (DATA / "20-bad.conflist").read_bytes()
    assert t.is_alive()
    shutil.copy(DATA / "10-containerd-net.conflist", conf_dir / "10-containerd-net.conflist")
    wait_for(lambda: has_entry(conf_dir / "10-containerd-net.conflist"), 2.0)


def test_dir_watcher_reports_creation_and_reappearance(tmp_path):
    d = tmp_path / "d"
    with DirWatcher(str(d), poll_interval=0.05) as w:
        assert w.wait(0.1)  # no dir: polling says "look again"
        d.mkdir()
        assert w.wait(0.1) and w.watching == w.using_inotify
        if w.using_inotify:
            assert not w.wait(0.05)
            (d / "x").write_text("1")
            assert w.wait(1.0)
            shutil.rmtree(d)
            deadline = time.monotonic() + 1
            while w.watching and time.monotonic() < deadline:
                w.wait(0.1)
            assert not w.watching


def test_parse_events():
    import struct

    name = b"a.conflist\0\0"
    buf = struct.pack("iIII", 1, IN_CREATE, 0, len(name)) + name + struct.pack("iIII", 1, IN_IGNORED, 0, 0)
    assert parse_events(buf) == [(1, IN_CREATE, "a.conflist"), (1, IN_IGNORED, "")]




def test_a_writer_that_keeps_dropping_the_entry_is_not_fought_flat_out(watching):
    conf_dir, _ = watching
    conf_dir.mkdir(parents=True)
    target = conf_dir / "05-cilium.conflist"
    original = (DATA / "87-podman-bridge.conflist").read_bytes()
    target.write_bytes(original)
    ours = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # an exclusive primary CNI: takes its file back at once
        if has_entry(target):
            ours += 1
            tmp = conf_dir / ".cilium.tmp"
            tmp.write_bytes(original)
            os.rename(tmp, target)
        time.sleep(0.005)
    assert 3 <= ours <= 8, ours  # about two rewrites a second, not hundreds


def test_repair_throttle_spaces_writes_and_warns_once_a_window():
    t = RepairThrottle(min_interval=0.5, window=10.0, warn_after=3)
    assert t.delay(0.0) == 0.0
    t.wrote(1.0)
    assert t.delay(1.2) == pytest.approx(0.3) and t.delay(1.6) == 0.0
    assert t.fighting(1.0) == 0
    t.wrote(2.0)
    t.wrote(3.0)
    assert t.fighting(3.0) == 3 and t.fighting(4.0) == 0  # once a window
    t.wrote(13.5)  # the writes at 1 and 2 s left the window
    assert t.fighting(13.5) == 0
    for now in (14.0, 14.5):
        t.wrote(now)
    assert t.fighting(14.5) == 3  # 13.5, 14 and 14.5 s: a window after the last warning


@pytest.mark.parametrize("uninstall_on_exit", [False, True])
def test_cli_watch_stops_on_sigterm(tmp_path, uninstall_on_exit):
    import signal
    import subprocess
    import sys

    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    target = conf / "10-containerd-net.conflist"
    shutil.copy(DATA / "10-containerd-net.conflist", target)
    headrace = Path(sys.executable).parent / "headrace"
    argv = [str(headrace), "install-cni", "--watch", "--skip-plugin", "--host-root", str(tmp_path),
            "--objects-dir", "/var/lib/headrace/objects"]
    if uninstall_on_exit:
        argv.append("--uninstall-on-exit")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: has_entry(target), 10.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r["msg"] == "conflist inserted" for r in logs)
    assert has_entry(target) is not uninstall_on_exit


def test_wait_for_agent_socket_before_chaining(tmp_path):
    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    target = conf / "10-containerd-net.conflist"
    shutil.copy(DATA / "10-containerd-net.conflist", target)
    opts = service.InstallOptions(host_root=str(tmp_path), install_plugin=False, wait_for_agent=True,
                                  settings=PluginSettings(agent_socket="/run/hr/cni.sock"))
    stop = threading.Event()
    t = threading.Thread(target=service.watch, args=(opts, stop))
    t.start()
    try:
        time.sleep(0.6)
        assert not has_entry(target)  # no agent yet: pods are not sent to a missing agent
        (tmp_path / "run" / "hr").mkdir(parents=True)
        (tmp_path / "run" / "hr" / "cni.sock").touch()
        assert wait_for(lambda: has_entry(target), 2.0) < 1.0
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def plugin_watch(tmp_path: Path, install: bool) -> tuple[service.InstallOptions, threading.Event, threading.Thread]:
    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "10-containerd-net.conflist", conf)
    opts = service.InstallOptions(host_root=str(tmp_path), install_plugin=install,
                                  settings=PluginSettings(objects_dir="/var/lib/headrace/objects"))
    stop = threading.Event()
    t = threading.Thread(target=service.watch, args=(opts, stop), kwargs={"plugin_recheck": 0.1, "recheck": 0.1})
    return opts, stop, t


def test_missing_plugin_files_are_installed_again_by_the_watch(tmp_path):
    """Our entry stays in the chain: without the launcher (or what it runs) every pod ADD fails, so the
    watch that installs the plugin puts back what is missing."""
    from node_agent.install_cni import runtime

    opts, stop, t = plugin_watch(tmp_path, install=True)
    service.install_once(opts)
    launcher = tmp_path / "opt" / "cni" / "bin" / "headrace-cni"
    t.start()
    try:
        assert service.plugin_problem(opts.cni_bin_dir, opts.host_root) == ""
        launcher.unlink()
        wait_for(lambda: runtime.is_our_launcher(str(launcher)), 3.0)
        rt = next((tmp_path / "opt" / "headrace").glob("runtime-*"))
        shutil.rmtree(rt)
        wait_for(lambda: service.plugin_problem(opts.cni_bin_dir, opts.host_root) == "", 60.0)
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive()


def test_with_skip_plugin_a_missing_launcher_is_an_error_logged_once(tmp_path, capfd):
    from node_agent.install_cni import runtime

    _, stop, t = plugin_watch(tmp_path, install=False)
    t.start()
    try:
        time.sleep(0.6)  # several checks
        prog = tmp_path / "rt" / "bin" / "python3.11"
        prog.parent.mkdir(parents=True)
        prog.write_text("")
        prog.chmod(0o755)
        (tmp_path / "opt" / "cni" / "bin").mkdir(parents=True)
        (tmp_path / "opt" / "cni" / "bin" / "headrace-cni").write_bytes(
            runtime.render_launcher("/rt/bin/python3.11", "/rt", "/rt/app", {}))
        time.sleep(0.4)
        prog.unlink()
        time.sleep(0.4)
    finally:
        stop.set()
        t.join(5)
    logs = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    errors = [r for r in logs if r["msg"].startswith("headrace-cni launcher cannot run")]
    assert [r["level"] for r in errors] == ["error", "error"], errors  # once per problem, not every check
    assert errors[0]["launcher"] == "/opt/cni/bin/headrace-cni" and "every pod ADD" in errors[0]["msg"]
    assert errors[0]["problem"] == "no headrace-cni launcher in /opt/cni/bin"
    assert "python3.11" in errors[1]["problem"]
    assert [r["msg"] for r in logs].count("headrace-cni launcher usable again") == 1
    assert not (tmp_path / "opt" / "headrace").exists()  # nothing installed: another container's job


def test_a_failing_reinstall_is_retried_each_interval_and_reported_once(tmp_path, monkeypatch, capfd):
    from node_agent.install_cni.runtime import RuntimeInstallError

    calls: list[float] = []

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(now)
        raise RuntimeInstallError("no space left on device")

    monkeypatch.setattr("node_agent.install_cni.service.install_plugin", failing)
    guard = service.PluginGuard(service.InstallOptions(host_root=str(tmp_path), install_plugin=True), interval=5.0)
    for now in (0.0, 1.0, 4.9, 5.0, 10.0):
        guard.poll(now)
    assert calls == [0.0, 5.0, 10.0]
    logs = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert [(r["level"], r["msg"].split(":")[0]) for r in logs] == [
        ("warning", "headrace-cni launcher cannot run"), ("error", "installing the plugin again failed")]
    assert logs[1]["problem"] == "no space left on device"
