"""A podman cut off from this machine's global podman state, running inside a simulated node's netns.

    pm = IsolatedPodman.create(tmp_path / "podman", node_netns="/run/netns/hrnode-...",
                               extra_plugin_dirs=[bin_dir_with_headrace_cni])
    pm.write_network(conflist)                      # bridge + host-local + headrace-cni
    pm.run_container("web", rootfs, network="net-x", command=["/bin/sleep", "600"])
    pm.netns_path("web")                            # /proc/<pid>/ns/net of the container
    pm.close()                                      # containers, network, mounts, netns, files: all gone

Everything podman reads or writes lives under `base`: containers.conf (CONTAINERS_CONF, the only config
podman then reads), storage.conf, registries.conf, policy.json, graph root, run root, libpod tmp dir with
file locks (no shared-memory lock segment), events log, volumes, hooks dir, CNI network configs. Podman is
exec'd through `nsenter --net=<node netns>`, so the CNI plugins it runs create the bridge and the host
side of each veth in the node netns, never in the machine's root netns.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CNI_PLUGIN_DIR = "/usr/lib/cni"
# Below this machine's hard limits (nofile 20000): podman's defaults ask for more and runc then fails.
DEFAULT_ULIMITS = ("nofile=4096:4096", "nproc=4096:4096")


class PodmanError(RuntimeError):
    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stderr = proc.stderr
        super().__init__(f"podman {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


def toml_str(value: str) -> str:
    """A TOML basic string (JSON string escaping is valid TOML for these paths)."""
    return json.dumps(value)


def toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(toml_str(v) for v in values) + "]"


@dataclass
class PodmanPaths:
    """base: config, storage, network configs (any length). short: run root and libpod tmp dir, kept
    short because podman refuses a run root longer than 50 characters (socket paths live there)."""

    base: Path
    short: Path

    @property
    def containers_conf(self) -> Path:
        return self.base / "containers.conf"

    @property
    def storage_conf(self) -> Path:
        return self.base / "storage.conf"

    @property
    def registries_conf(self) -> Path:
        return self.base / "registries.conf"

    @property
    def policy_json(self) -> Path:
        return self.base / "policy.json"

    @property
    def graph_root(self) -> Path:
        return self.base / "root"

    @property
    def run_root(self) -> Path:
        return self.short / "run"

    @property
    def tmp_dir(self) -> Path:
        return self.short / "tmp"

    @property
    def net_dir(self) -> Path:
        return self.base / "net.d"

    @property
    def hooks_dir(self) -> Path:
        return self.base / "hooks.d"

    @property
    def volumes(self) -> Path:
        return self.base / "volumes"

    @property
    def events_log(self) -> Path:
        return self.base / "events.log"

    @property
    def home(self) -> Path:
        return self.base / "home"


def containers_conf_text(paths: PodmanPaths, plugin_dirs: Sequence[str], ulimits: Sequence[str]) -> str:
    return "\n".join(
        [
            "[containers]",
            f"default_ulimits = {toml_list(ulimits)}",
            'log_driver = "k8s-file"',
            "",
            "[network]",
            'network_backend = "cni"',
            f"cni_plugin_dirs = {toml_list(plugin_dirs)}",
            f"network_config_dir = {toml_str(str(paths.net_dir))}",
            "",
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f"events_logfile_path = {toml_str(str(paths.events_log))}",
            'runtime = "runc"',
            'lock_type = "file"',
            "num_locks = 128",
            f"tmp_dir = {toml_str(str(paths.tmp_dir))}",
            f"static_dir = {toml_str(str(paths.graph_root / 'libpod'))}",
            f"volume_path = {toml_str(str(paths.volumes))}",
            f"hooks_dir = {toml_list([str(paths.hooks_dir)])}",
            "",
        ]
    )


def storage_conf_text(paths: PodmanPaths) -> str:
    return "\n".join(
        [
            "[storage]",
            'driver = "vfs"',
            f"graphroot = {toml_str(str(paths.graph_root))}",
            f"runroot = {toml_str(str(paths.run_root))}",
            "",
        ]
    )


@dataclass
class IsolatedPodman:
    paths: PodmanPaths
    node_netns: str
    plugin_dirs: list[str]
    containers: list[str] = field(default_factory=list)
    networks: list[Path] = field(default_factory=list)
    sandbox_keys: set[str] = field(default_factory=set)
    extra_env: dict[str, str] = field(default_factory=dict)
    container_netns: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (pid, netns inode)
    cgroup_parent: str = field(default_factory=lambda: f"/hrpm-{secrets.token_hex(4)}")
    closed: bool = False

    @classmethod
    def create(
        cls,
        base: Path,
        *,
        node_netns: str,
        extra_plugin_dirs: Sequence[str] = (),
        ulimits: Sequence[str] = DEFAULT_ULIMITS,
    ) -> IsolatedPodman:
        base.mkdir(parents=True, exist_ok=True)
        paths = PodmanPaths(base, Path(tempfile.mkdtemp(prefix="hrpm-", dir="/tmp")))
        for d in (
            base,
            paths.graph_root,
            paths.run_root,
            paths.tmp_dir,
            paths.net_dir,
            paths.hooks_dir,
            paths.volumes,
            paths.home,
        ):
            d.mkdir(parents=True, exist_ok=True)
        plugin_dirs = [CNI_PLUGIN_DIR, *extra_plugin_dirs]
        paths.containers_conf.write_text(containers_conf_text(paths, plugin_dirs, ulimits))
        paths.storage_conf.write_text(storage_conf_text(paths))
        paths.registries_conf.write_text("unqualified-search-registries = []\n")
        paths.policy_json.write_text(json.dumps({"default": [{"type": "reject"}]}))
        return cls(paths, node_netns, plugin_dirs)

    # -- running podman -----------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """A clean environment: nothing from the caller's podman/XDG settings leaks in."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.paths.home),
            "TMPDIR": str(self.paths.tmp_dir),
            "CONTAINERS_CONF": str(self.paths.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.paths.storage_conf),
            "CONTAINERS_REGISTRIES_CONF": str(self.paths.registries_conf),
            "CONTAINERS_POLICY_JSON": str(self.paths.policy_json),
            **self.extra_env,
        }

    def argv(self, args: Sequence[str]) -> list[str]:
        p = self.paths
        return [
            "nsenter",
            f"--net={self.node_netns}",
            "--",
            "podman",
            "--root",
            str(p.graph_root),
            "--runroot",
            str(p.run_root),
            "--tmpdir",
            str(p.tmp_dir),
            "--storage-driver",
            "vfs",
            "--network-config-dir",
            str(p.net_dir),
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--runtime",
            "runc",
            *args,
        ]

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if not self.paths.containers_conf.exists():
            # Never let podman fall back to the machine's global configuration.
            raise RuntimeError(f"isolated podman config {self.paths.containers_conf} is gone")
        proc = subprocess.run(
            self.argv(args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise PodmanError(args, proc)
        return proc

    # -- networks and containers ----------------------------------------------------------------------------
    def write_network(self, conflist: dict[str, Any]) -> str:
        """Install a CNI conflist as a podman network (the conflist's name); returns the network name."""
        name = str(conflist["name"])
        path = self.paths.net_dir / f"{name}.conflist"
        path.write_text(json.dumps(conflist, indent=1))
        self.networks.append(path)
        return name

    def run_container(
        self,
        name: str,
        rootfs: Path,
        *,
        network: str,
        command: Sequence[str],
        extra: Sequence[str] = (),
    ) -> str:
        """`podman run -d --rootfs` a container; returns its id. Recorded for close() before it starts."""
        self.containers.append(name)
        proc = self.run(
            [
                "run",
                "-d",
                "--name",
                name,
                "--network",
                network,
                "--cgroup-parent",
                self.cgroup_parent,
                *extra,
                "--rootfs",
                str(rootfs),
                *command,
            ]
        )
        self._remember(name)
        return proc.stdout.strip()

    def probe(self, name: str, rootfs: Path) -> subprocess.CompletedProcess[str]:
        """Run a throwaway container without network (`--rm`): can podman run containers here at all?"""
        self.containers.append(name)
        argv = ["run", "--rm", "--name", name, "--network", "none", "--cgroup-parent", self.cgroup_parent]
        return self.run([*argv, "--rootfs", str(rootfs), "/bin/bash", "-c", ":"], check=False)

    def inspect(self, name: str) -> dict[str, Any]:
        data = json.loads(self.run(["container", "inspect", name]).stdout)
        assert isinstance(data, list) and data, f"podman inspect {name}: no data"
        first: dict[str, Any] = data[0]
        return first

    def _remember(self, name: str) -> None:
        """Note the container's netns bind mount and init process, for the sweep in close()."""
        with contextlib.suppress(Exception):
            data = self.inspect(name)
            key = data.get("NetworkSettings", {}).get("SandboxKey") or ""
            if key:
                self.sandbox_keys.add(str(key))
            pid = int(data["State"]["Pid"])
            self.container_netns[name] = (pid, os.stat(f"/proc/{pid}/ns/net").st_ino)

    def pid(self, name: str) -> int:
        pid = int(self.inspect(name)["State"]["Pid"])
        if pid <= 0:
            raise RuntimeError(f"container {name} is not running")
        return pid

    def netns_path(self, name: str) -> str:
        """The container's network namespace, through its init process (valid while it runs)."""
        return f"/proc/{self.pid(name)}/ns/net"

    def exec(
        self, name: str, command: Sequence[str], *, user: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """`podman exec` (user "UID:GID" optional); the result is returned whatever the exit status."""
        opts = ["--user", user] if user else []
        return self.run(["exec", *opts, name, *command], check=False, timeout=timeout)

    # -- teardown -------------------------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Remove everything this podman made; returns a list of problems found (empty when clean)."""
        if self.closed:
            return []
        self.closed = True
        problems: list[str] = []
        for name in self.containers:
            proc = self.run(["rm", "--force", "--time", "0", name], check=False, timeout=60)
            if proc.returncode != 0 and "no such container" not in proc.stderr.lower():
                problems.append(f"podman rm {name}: {proc.stderr.strip()}")
        for path in self.networks:
            path.unlink(missing_ok=True)
        wait_for(lambda: not self._leftover_pids(), timeout=10)  # conmon exits shortly after `podman rm`
        for pid in self._leftover_pids():
            problems.append(f"left-over process {pid}; killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name, (pid, inode) in self.container_netns.items():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                    problems.append(f"container {name} process {pid} still running; killed")
                    os.kill(pid, signal.SIGKILL)
        problems.extend(self._remove_cgroups())
        for mount in self._leftover_mounts():
            problems.append(f"left-over mount {mount}; unmounted")
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        for key in self.sandbox_keys:
            if os.path.exists(key):
                problems.append(f"left-over netns {key}; removed")
                subprocess.run(["umount", "-l", key], check=False, capture_output=True)
                with contextlib.suppress(OSError):
                    os.unlink(key)
        if not self._leftover_mounts():
            shutil.rmtree(self.paths.short, ignore_errors=True)
            shutil.rmtree(self.paths.base, ignore_errors=True)
        else:
            problems.append("mounts remain under the podman dirs; files kept")
        return problems

    def _remove_cgroups(self) -> list[str]:
        """rmdir the per-instance cgroup parent (and what podman left in it) in every hierarchy."""
        problems = []
        for hierarchy in cgroup_hierarchies():
            top = Path(hierarchy) / self.cgroup_parent.lstrip("/")
            if not top.is_dir():
                continue
            # deepest first; cgroup dirs hold only control files, rmdir works once no task is left
            subdirs = sorted((Path(d) for d, _s, _f in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
            for d in subdirs:
                ok = wait_for(lambda d=d: _try_rmdir(d), timeout=5)
                if not ok:
                    problems.append(f"cgroup {d} could not be removed")
        return problems

    def _leftover_pids(self) -> list[int]:
        """Processes (conmon, container init) whose command line mentions our base dir."""
        markers = [str(self.paths.base).encode(), str(self.paths.short).encode()]
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                    if any(m in cmdline for m in markers):
                        found.append(int(entry))
            except OSError:
                continue
        return found

    def _leftover_mounts(self) -> list[str]:
        roots = [str(self.paths.base), str(self.paths.short)]
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mount_point = line.split()[4].replace("\\040", " ")
                if any(mount_point == r or mount_point.startswith(r + "/") for r in roots):
                    mounts.append(mount_point)
        return sorted(mounts, key=len, reverse=True)


def cgroup_hierarchies() -> list[str]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] in ("cgroup", "cgroup2"):
                points.append(left.split()[4])
    return points


def _try_rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
