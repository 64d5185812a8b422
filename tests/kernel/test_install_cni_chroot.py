"""The installed plugin runs on a host without Python: a mount namespace whose root holds only the
install dirs and the libraries the interpreter binary links (ldd), nothing of this machine's Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_agent.install_cni import runtime
from node_agent.install_cni.service import InstallOptions, install_once, uninstall
from node_agent.install_cni.settings import PluginSettings

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare")]

DATA = Path(__file__).parent.parent / "data" / "conflists"
LAUNCHER = "/opt/cni/bin/headrace-cni"


def build_root(tmp_path: Path, settings: PluginSettings) -> Path:
    """A fake host: containerd's conflist, headrace installed by install-cni, + the interpreter's libs."""
    root = tmp_path / "root"
    (root / "etc" / "cni" / "net.d").mkdir(parents=True)
    shutil.copy(DATA / "10-containerd-net.conflist", root / "etc" / "cni" / "net.d")
    change = install_once(InstallOptions(host_root=str(root), settings=settings))
    assert change.action == "inserted"
    rt_dirs = list((root / "opt" / "headrace").glob("runtime-*"))
    assert len(rt_dirs) == 1
    for name, path in json.loads((rt_dirs[0] / "host-libraries.json").read_text()).items():
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), dest)
        assert name in path
    for d in ("tmp", "proc", "objects"):
        (root / d).mkdir()
    return root


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    return build_root(tmp_path, PluginSettings(objects_dir="/objects", log_file="/tmp/cni.log"))


def files_outside_install_dirs(root: Path) -> list[str]:
    out: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root)
        if rel.startswith(("/opt/headrace", "/opt/cni/bin", "/etc/cni")):
            continue
        out.extend(os.path.join(rel, f) for f in files)
    return sorted(out)


def run_in_root(
    root: Path, argv: list[str], env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    cmd = ["unshare", "--mount", "--fork", f"--mount-proc={root}/proc", chroot, str(root), *argv]
    return subprocess.run(cmd, input=stdin, env=env, capture_output=True, timeout=60, check=False)


def test_root_has_no_python_of_this_machine(host_root):
    others = files_outside_install_dirs(host_root)
    assert others, "the interpreter's libraries are expected"
    assert all(p.startswith(("/lib", "/usr/lib")) and ".so" in p for p in others), others
    assert not any("python" in p for p in others)
    real_stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert not (host_root / str(real_stdlib).lstrip("/")).exists()


def test_version_in_chroot(host_root):
    proc = run_in_root(host_root, [LAUNCHER], {"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert set(out["supportedVersions"]) >= {"0.4.0", "1.0.0", "1.1.0"}


def test_bundled_libraries_load_in_chroot(host_root):
    """ctypes (libffi), ssl/hashlib (libssl, libcrypto) come from the runtime's shlib/, found by path."""
    launcher = (host_root / LAUNCHER.lstrip("/")).read_text()
    python = str(Path(launcher.splitlines()[0][2:].split()[0]).with_name("python3"))  # beside the front
    prologue = launcher.split("from cni.plugin.launch import run_executable")[0]
    check = prologue + (
        "import ctypes, ssl, hashlib, json, socket, yaml\n"
        "assert ctypes.CDLL(None).getpid() > 0\n"
        "maps = open('/proc/self/maps').read()\n"
        "libs = sorted({l.split()[-1] for l in maps.splitlines() if '.so' in l})\n"
        "print(json.dumps({'prefix': sys.prefix, 'libs': libs, 'ssl': ssl.OPENSSL_VERSION,\n"
        "                  'sha': hashlib.sha256(b'x').hexdigest()[:8], 'yaml': yaml.safe_load('a: 1')}))\n"
    )
    (host_root / "tmp" / "check.py").write_text(check)
    proc = run_in_root(host_root, [python, "-IS", "/tmp/check.py"], {})
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["prefix"].startswith("/opt/headrace/runtime-")
    assert out["sha"] == "2d711642" and out["yaml"] == {"a": 1}
    bundled = [lib for lib in out["libs"] if "/shlib/" in lib]
    assert any("libffi" in lib for lib in bundled) and any("libssl" in lib for lib in bundled)
    assert all(lib.startswith(("/opt/headrace/", "/lib", "/usr/lib")) for lib in out["libs"])


@pytest.fixture
def pod_netns() -> Iterator[int]:
    """A fresh, empty network namespace held by a sleeping process (never the root netns)."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def add(root: Path, netns_pid: int, namespace: str, name: str) -> subprocess.CompletedProcess[bytes]:
    """CNI ADD of the installed entry (as a runtime builds it from the conflist), inside the chroot."""
    conflist = json.loads((root / "etc/cni/net.d/10-containerd-net.conflist").read_text())
    entry = conflist["plugins"][-1]
    assert entry["type"] == "headrace-cni"
    netconf = {
        **entry,
        "cniVersion": conflist["cniVersion"],
        "name": conflist["name"],
        "prevResult": {
            "cniVersion": conflist["cniVersion"],
            "interfaces": [{"name": "eth0", "sandbox": f"/proc/{netns_pid}/ns/net"}],
            "ips": [{"address": "10.88.0.7/16", "interface": 0}],
        },
    }
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": f"/proc/{netns_pid}/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=c0ffee",
    }
    return run_in_root(root, [LAUNCHER], env, json.dumps(netconf).encode())


def test_add_for_a_non_mesh_pod_in_chroot(host_root, pod_netns):
    """ADD through the installed conflist entry: pod found in the objects dir (YAML, so the bundled
    PyYAML runs), mode none, prevResult passed through in the config's version."""
    (host_root / "objects" / "ns-default.yaml").write_text("kind: Namespace\nmetadata:\n  name: default\n")
    (host_root / "objects" / "web.yaml").write_text(
        "kind: Pod\nmetadata:\n  name: web\n  namespace: default\n  uid: 1f6e0a43-7c1e-4a8e-9a77-1d2f3a4b5c6d\n"
    )
    proc = add(host_root, pod_netns, "default", "web")
    assert proc.returncode == 0, (proc.stdout.decode(), proc.stderr.decode())
    result = json.loads(proc.stdout)
    assert result["cniVersion"] == "1.0.0"
    assert result["ips"][0]["address"] == "10.88.0.7/16"
    log = (host_root / "tmp" / "cni.log").read_text()
    assert "mode none" in log


def test_agent_namespace_never_blocked(tmp_path, pod_netns):
    """The entry install-cni writes lets pods of the agent's namespace start with no agent, no agent
    socket and a kubeconfig that does not exist; a pod elsewhere gets a clear CNI error instead."""
    root = build_root(tmp_path, PluginSettings(kubeconfig="/opt/headrace/kubeconfig", log_file="/tmp/cni.log"))
    entry = json.loads((root / "etc/cni/net.d/10-containerd-net.conflist").read_text())["plugins"][-1]
    assert "headrace-system" in entry["exclude_namespaces"]
    assert not (root / "opt/headrace/kubeconfig").exists() and not (root / "var/run/headrace").exists()
    proc = add(root, pod_netns, "headrace-system", "headrace-agent-x7k2p")
    assert proc.returncode == 0, (proc.stdout.decode(), proc.stderr.decode())
    assert json.loads(proc.stdout)["ips"][0]["address"] == "10.88.0.7/16"
    proc = add(root, pod_netns, "default", "web")
    assert proc.returncode != 0
    err = json.loads(proc.stdout)
    assert err["code"] >= 100 and "kubeconfig" in (err["msg"] + err.get("details", ""))


def test_uninstall_leaves_the_root_as_before(host_root):
    opts = InstallOptions(host_root=str(host_root))
    uninstall(opts)
    assert not (host_root / LAUNCHER.lstrip("/")).exists()
    assert not (host_root / "opt" / "headrace").exists()
    doc = json.loads((host_root / "etc/cni/net.d/10-containerd-net.conflist").read_text())
    assert doc == json.loads((DATA / "10-containerd-net.conflist").read_text())
    assert runtime.PLUGIN_BINARY not in os.listdir(host_root / "opt" / "cni" / "bin")
