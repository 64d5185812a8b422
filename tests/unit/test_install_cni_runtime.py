"""Plugin install: self-contained runtime + launcher, idempotent, and the CLI commands end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from node_agent.cli import main as cli
from node_agent.install_cni import runtime

DATA = Path(__file__).parent.parent / "data" / "conflists"
SOURCE = ("--objects-dir", "/var/lib/headrace/objects")  # the plugin's pod source


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, runtime.PluginInstall]:
    base = tmp_path_factory.mktemp("rt")
    bin_dir, inst = base / "bin", base / "headrace"
    result = runtime.install_plugin(str(bin_dir), str(inst))
    return bin_dir, inst, result


def test_layout_and_launcher(installed):
    bin_dir, inst, result = installed
    assert result.changed
    launcher = bin_dir / "headrace-cni"
    text = launcher.read_text()
    rt = Path(result.runtime)
    assert rt.parent == inst and rt.name.startswith("runtime-")
    # the compiled front relays an ADD; it runs the script with the interpreter it finds beside it
    assert text.splitlines()[0] == f"#!{rt}/bin/headrace-cni-front /var/run/headrace/cni.sock"
    assert result.front == f"{rt}/bin/headrace-cni-front"
    assert (rt / "bin" / "headrace-cni-front").read_bytes() == Path(runtime.front_binary()).read_bytes()
    assert os.readlink(rt / "bin" / "python3") == "python3.11"
    assert runtime.is_our_launcher(str(launcher))
    assert text.rstrip().endswith("run_executable('/var/run/headrace/cni.sock')")  # relays ADDs there first
    assert launcher.stat().st_mode & 0o777 == 0o755
    assert (rt / "app" / "cni" / "plugin" / "entry.py").is_file()
    assert list((rt / "app" / "cni" / "plugin").glob("__pycache__/entry.*.pyc"))  # precompiled: fast start
    assert (rt / "lib" / "python3.11" / "json" / "__init__.py").is_file()
    assert not (rt / "lib" / "python3.11" / "site-packages").exists()
    assert not (rt / "lib" / "python3.11" / "test").exists()
    assert "libffi.so.8" in os.listdir(rt / "shlib")  # ctypes' dependency travels along
    host_libs = json.loads((rt / "host-libraries.json").read_text())
    assert "libc.so.6" in host_libs and not any("ffi" in x or "ssl" in x for x in host_libs)


def test_launcher_relays_to_the_configured_agent_socket(installed, tmp_path):
    _, inst, _ = installed
    runtime.install_plugin(str(tmp_path / "bin"), str(inst), agent_socket="/run/other/cni.sock")
    text = (tmp_path / "bin" / "headrace-cni").read_text()
    assert text.rstrip().endswith("run_executable('/run/other/cni.sock')")
    assert text.splitlines()[0].endswith("/bin/headrace-cni-front /run/other/cni.sock")


def test_a_runtime_missing_what_the_launcher_runs_is_built_again(tmp_path):
    bin_dir, inst = tmp_path / "bin", tmp_path / "inst"
    first = runtime.install_plugin(str(bin_dir), str(inst))
    for name in ("headrace-cni-front", "python3", "python3.11"):
        os.unlink(Path(first.runtime) / "bin" / name)
        again = runtime.install_plugin(str(bin_dir), str(inst))
        assert again.changed and again.runtime == first.runtime
        assert os.path.lexists(Path(first.runtime) / "bin" / name), name
    proc = subprocess.run([str(bin_dir / "headrace-cni")], env={"CNI_COMMAND": "VERSION"}, input=b"",
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout


def test_a_build_without_the_front_runs_the_interpreter_from_the_launcher(tmp_path):
    source = runtime.RuntimeSource.current()
    source = runtime.RuntimeSource(source.executable, source.version, source.stdlib, source.dynload,
                                   source.packages, front="")
    result = runtime.install_plugin(str(tmp_path / "bin"), str(tmp_path / "inst"), source=source)
    text = (tmp_path / "bin" / "headrace-cni").read_text()
    assert text.splitlines()[0] == f"#!{result.runtime}/bin/python3.11 -IS" and result.front == ""
    assert not (Path(result.runtime) / "bin" / "headrace-cni-front").exists()
    proc = subprocess.run([str(tmp_path / "bin" / "headrace-cni")], env={"CNI_COMMAND": "VERSION"}, input=b"",
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0 and "1.1.0" in json.loads(proc.stdout)["supportedVersions"]


def fake_runtime(inst: Path, name: str) -> Path:
    """A runtime directory as an earlier install left it (what the launcher runs, the mark of a finished build)."""
    rt = inst / name
    (rt / "bin").mkdir(parents=True)
    for program in ("python3.11", "headrace-cni-front", "python3"):
        (rt / "bin" / program).write_text("")
        os.chmod(rt / "bin" / program, 0o755)
    (rt / runtime.COMPLETE_MARK).write_text("")
    return rt


def test_an_upgrade_keeps_the_runtime_the_launcher_ran_before(tmp_path, monkeypatch):
    """A plugin started from the old runtime just before the launcher switched still imports modules from
    it: the previous runtime stays, only older ones go; it goes itself at the next switch."""
    bin_dir, inst = tmp_path / "bin", tmp_path / "inst"
    monkeypatch.setattr(runtime, "_build_runtime", lambda source, runtime_w, *_: fake_runtime(
        Path(runtime_w).parent, Path(runtime_w).name))  # the layout is tested above: keep this fast
    for name in ("runtime-older1", "runtime-older2", "runtime-before"):
        fake_runtime(inst, name)
    bin_dir.mkdir()
    (bin_dir / "headrace-cni").write_text(runtime.render_launcher(
        f"{inst}/runtime-before/bin/python3.11", f"{inst}/runtime-before", f"{inst}/runtime-before/app", {},
        front=f"{inst}/runtime-before/bin/headrace-cni-front").decode())
    assert runtime.launcher_runtime(str(bin_dir / "headrace-cni"), str(inst)) == "runtime-before"

    result = runtime.install_plugin(str(bin_dir), str(inst))
    current = Path(result.runtime).name
    assert result.changed and runtime.launcher_runtime(str(bin_dir / "headrace-cni"), str(inst)) == current
    assert sorted(os.listdir(inst)) == sorted([current, "runtime-before"])

    again = runtime.install_plugin(str(bin_dir), str(inst))  # no switch: nothing removed
    assert not again.changed and sorted(os.listdir(inst)) == sorted([current, "runtime-before"])

    monkeypatch.setattr(runtime, "fingerprint", lambda source: "next")  # the next image
    runtime.install_plugin(str(bin_dir), str(inst))  # the next switch: the one before the last goes
    assert sorted(os.listdir(inst)) == sorted([current, "runtime-next"])


def test_launcher_runtime_only_names_ours_under_the_install_dir(tmp_path):
    launcher = tmp_path / "headrace-cni"
    assert runtime.launcher_runtime(str(launcher), "/opt/headrace") == ""  # none
    launcher.write_text("#!/opt/headrace/runtime-ab/bin/python3.11 -IS\n")  # not ours: no marker
    assert runtime.launcher_runtime(str(launcher), "/opt/headrace") == ""
    launcher.write_bytes(runtime.render_launcher("/opt/headrace/runtime-ab/bin/python3.11", "/r", "/r/app", {}))
    assert runtime.launcher_runtime(str(launcher), "/opt/headrace/") == "runtime-ab"
    assert runtime.launcher_runtime(str(launcher), "/opt/other") == ""


def test_second_install_changes_nothing(installed):
    bin_dir, inst, result = installed
    launcher = bin_dir / "headrace-cni"
    before = (launcher.stat().st_mtime_ns, sorted(os.listdir(inst)))
    again = runtime.install_plugin(str(bin_dir), str(inst))
    assert not again.changed and again.runtime == result.runtime
    assert (launcher.stat().st_mtime_ns, sorted(os.listdir(inst))) == before


def test_installed_plugin_answers_version(installed):
    bin_dir, _, _ = installed
    proc = subprocess.run([str(bin_dir / "headrace-cni")], env={"CNI_COMMAND": "VERSION"}, input=b"",
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "1.1.0" in json.loads(proc.stdout)["supportedVersions"]


def test_installed_plugin_runs_an_add_no_agent_took_with_its_configuration(installed, tmp_path):
    """No agent at the socket: the front hands the ADD, configuration and all, to the runtime's interpreter."""
    bin_dir, _, _ = installed
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "headrace-cni", "log_file": str(tmp_path / "log"),
            "agent_socket": str(tmp_path / "none.sock")}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/1/ns/net", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/opt/cni/bin"}
    proc = subprocess.run([str(bin_dir / "headrace-cni")], env=env, input=json.dumps(conf).encode(),
                          capture_output=True, timeout=30, check=False)
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and out["code"] == 7 and "pod source" in out["msg"], out  # its own check ran


def test_the_front_can_be_turned_off_and_a_bad_switch_is_refused(tmp_path, monkeypatch):
    assert runtime.front_binary({"HEADRACE_CNI_FRONT": "off"}) == ""
    assert runtime.front_binary({"HEADRACE_CNI_FRONT": " On "}) == runtime.front_binary({})
    with pytest.raises(runtime.RuntimeInstallError, match="HEADRACE_CNI_FRONT must be on or off"):
        runtime.front_binary({"HEADRACE_CNI_FRONT": "of"})
    monkeypatch.setenv("HEADRACE_CNI_FRONT", "off")  # as the ConfigMap sets it for install-cni
    result = runtime.install_plugin(str(tmp_path / "bin"), str(tmp_path / "inst"))
    assert (tmp_path / "bin" / "headrace-cni").read_text().startswith(f"#!{result.runtime}/bin/python3.11 -IS\n")
    assert result.front == ""


def test_launcher_rejects_unusable_paths():
    with pytest.raises(runtime.RuntimeInstallError):
        runtime.render_launcher("/opt/with space/python", "/r", "/r/app", {})
    with pytest.raises(runtime.RuntimeInstallError):
        runtime.render_launcher("/" + "x" * 300, "/r", "/r/app", {})
    with pytest.raises(runtime.RuntimeInstallError):  # the #! line takes one argument: the socket
        runtime.render_launcher("/r/bin/python3.11", "/r", "/r/app", {}, "/run/a b.sock", front="/r/bin/front")
    with pytest.raises(runtime.RuntimeInstallError):
        runtime.render_launcher("/r/bin/python3.11", "/r", "/r/app", {}, "/run/" + "s" * 250, front="/r/bin/front")


def test_uninstall_keeps_foreign_binary(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "headrace-cni").write_text("#!/bin/sh\necho someone else's\n")
    assert runtime.uninstall_plugin(str(bin_dir), str(tmp_path / "inst")) == []
    assert (bin_dir / "headrace-cni").exists()


def test_cli_install_and_uninstall_round_trip(tmp_path):
    root = tmp_path / "host"
    conf = root / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "10-mynet.conf", conf)
    shutil.copy(DATA / "99-loopback.conf", conf)
    before = {p.name: p.read_bytes() for p in conf.iterdir()}
    runner = CliRunner()
    args = ["install-cni", "--host-root", str(root), "--objects-dir", "/var/lib/headrace/objects",
            "--exclude-namespaces", "kube-system,istio-system", "--agent-namespace", "mesh-agent",
            "--backend", "iptables"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["action"] == "converted"
    doc = json.loads((conf / "10-mynet.conflist").read_text())
    assert doc["plugins"][-1] == {
        "type": "headrace-cni", "objects_dir": "/var/lib/headrace/objects",
        "agent_socket": "/var/run/headrace/cni.sock", "backend": "iptables", "iptables": "auto",
        "exclude_namespaces": ["kube-system", "istio-system", "mesh-agent"],
        "log_file": "/var/run/headrace/cni.log", "log_level": "info",
    }
    launcher = root / "opt" / "cni" / "bin" / "headrace-cni"
    assert launcher.read_text().startswith("#!/opt/headrace/runtime-")  # host paths, not ours
    assert json.loads(runner.invoke(cli, args).stdout.strip().splitlines()[-1])["action"] == "unchanged"

    res = runner.invoke(cli, ["uninstall-cni", "--host-root", str(root)])
    assert res.exit_code == 0, res.output
    assert {p.name: p.read_bytes() for p in conf.iterdir()} == before
    assert not launcher.exists()
    assert not (root / "opt" / "headrace").exists()


def test_cli_refuses_broken_config(tmp_path):
    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "20-comments.conflist", conf)
    res = CliRunner().invoke(cli, ["install-cni", "--host-root", str(tmp_path), "--skip-plugin", *SOURCE])
    assert res.exit_code == 1
    assert "20-comments.conflist" in res.output and "comments" in res.output
    assert (conf / "20-comments.conflist").read_bytes() == (DATA / "20-comments.conflist").read_bytes()


@pytest.mark.parametrize("front", ["on", "off"])
def test_cli_check_says_not_ready_when_the_launchers_program_is_gone(tmp_path, front):
    """The readiness probe: our entry, our launcher, and what its #! line runs (the front and the
    interpreter beside it, or the interpreter)."""
    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "10-mynet.conf", conf)
    env = {"HEADRACE_CNI_FRONT": front}
    runner = CliRunner()
    assert runner.invoke(cli, ["install-cni", "--host-root", str(tmp_path), *SOURCE], env=env).exit_code == 0
    check = ["install-cni", "--check", "--host-root", str(tmp_path)]
    res = runner.invoke(cli, check, env=env)
    assert res.exit_code == 0 and "ready: headrace-cni chained and installed" in res.output, res.output
    rt = next((tmp_path / "opt" / "headrace").glob("runtime-*"))
    for name in (["headrace-cni-front", "python3"] if front == "on" else ["python3.11"]):
        moved = rt / "bin" / f"{name}.away"
        os.rename(rt / "bin" / name, moved)
        res = runner.invoke(cli, check, env=env)
        assert res.exit_code == 1 and f"not ready: the launcher's {name} " in res.output, res.output
        os.rename(moved, rt / "bin" / name)
    assert runner.invoke(cli, check, env=env).exit_code == 0


def test_cli_refuses_a_bad_front_switch(tmp_path):
    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "10-mynet.conf", conf)
    res = CliRunner().invoke(cli, ["install-cni", "--host-root", str(tmp_path), *SOURCE],
                             env={"HEADRACE_CNI_FRONT": "maybe"})
    assert res.exit_code == 1 and "HEADRACE_CNI_FRONT must be on or off" in res.output
    assert not (tmp_path / "opt" / "cni" / "bin" / "headrace-cni").exists()


def test_cli_refuses_an_entry_without_a_pod_source(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["install-cni", "--host-root", str(tmp_path), "--skip-plugin"])
    assert res.exit_code == 2 and "the plugin needs a pod source" in res.output
    assert not any(tmp_path.rglob("*.conflist"))


def test_cli_without_config_fails_clearly(tmp_path):
    res = CliRunner().invoke(cli, ["install-cni", "--host-root", str(tmp_path), "--skip-plugin", *SOURCE])
    assert res.exit_code == 1 and "no CNI config found" in res.output
    res = CliRunner().invoke(cli, ["install-cni", "--skip-plugin", "--backend", "bogus"])
    assert res.exit_code == 2


def test_cli_removes_a_killed_runs_half_written_file(tmp_path):
    """`headrace install-cni` (the init container) removes the `.headrace-*.tmp` a killed run left in the
    host's CNI config dir, leaving a fresh one (a write in progress) and every other file."""
    conf = tmp_path / "etc" / "cni" / "net.d"
    conf.mkdir(parents=True)
    shutil.copy(DATA / "10-mynet.conf", conf)
    stale, fresh = conf / ".headrace-a1.tmp", conf / ".headrace-b2.tmp"
    stale.write_text("{")
    fresh.write_text("{")
    os.utime(stale, (time.time() - 300, time.time() - 300))
    res = CliRunner().invoke(cli, ["install-cni", "--host-root", str(tmp_path), "--skip-plugin", *SOURCE])
    assert res.exit_code == 0, res.output
    assert not stale.exists() and fresh.exists() and (conf / "10-mynet.conflist").exists()
    assert "unfinished write of a previous install-cni removed" in res.output
