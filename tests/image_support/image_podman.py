"""A podman for building and running the headrace image, cut off from this machine's podman state.

Its configuration and storage (overlay) live under the build dir, so image layers are cached between
runs; its run root is a short private dir under /tmp, removed on close. Builds and containers use the
host's network namespace (`--network=host`: apt and pip need the network, and no CNI plugin ever runs,
so no rule, bridge or veth is made anywhere) or none at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.podman_support.isolated import DEFAULT_ULIMITS, toml_list, toml_str

BASE_IMAGE = "localhost/headrace-debian:bookworm"
IMAGE = "localhost/headrace:test"
#: Where a CA bundle given by the host's PIP_CERT is mounted inside builds and containers.
CA_IN_CONTAINER = "/run/headrace-build-ca.pem"


class ImagePodmanError(RuntimeError):
    pass


def short_dir(base: Path) -> Path:
    """The run root's parent: short (podman limits its length) and the same for the same storage on
    every run (podman's database remembers it and refuses another)."""
    return Path("/tmp") / f"hrimg-{hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:10]}"


@dataclass
class ImagePodman:
    base: Path
    short: Path = Path()

    def __post_init__(self) -> None:
        if self.short == Path():
            self.short = short_dir(self.base)
        for d in (self.base / "storage", self.base / "home", self.base / "net.d", self.short / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        (self.base / "containers.conf").write_text("\n".join([
            "[containers]",
            f"default_ulimits = {toml_list(DEFAULT_ULIMITS)}",
            'log_driver = "k8s-file"',
            "[network]",
            'network_backend = "cni"',
            f"network_config_dir = {toml_str(str(self.base / 'net.d'))}",
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f"events_logfile_path = {toml_str(str(self.base / 'events.log'))}",
            'runtime = "runc"',
            'lock_type = "file"',
            "num_locks = 128",
            f"tmp_dir = {toml_str(str(self.short / 'tmp'))}",
            "",
        ]))
        (self.base / "storage.conf").write_text("\n".join([
            "[storage]",
            'driver = "overlay"',
            f"graphroot = {toml_str(str(self.base / 'storage'))}",
            f"runroot = {toml_str(str(self.short / 'run'))}",
            "",
        ]))
        (self.base / "registries.conf").write_text("unqualified-search-registries = []\n")
        # nothing is ever pulled (--pull=never); local images only
        (self.base / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.base / "home"),
            "TMPDIR": str(self.short / "tmp"),
            "CONTAINERS_CONF": str(self.base / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.base / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.base / "registries.conf"),
            "CONTAINERS_POLICY_JSON": str(self.base / "policy.json"),
        }

    def argv(self, args: Sequence[str]) -> list[str]:
        return [
            "podman", "--root", str(self.base / "storage"), "--runroot", str(self.short / "run"),
            "--tmpdir", str(self.short / "tmp"), "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--runtime", "runc", *args,
        ]

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 600, input: str | None = None,
        stream_to: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run podman; with `stream_to`, its output goes to that file as it comes (long builds)."""
        if stream_to is not None:
            with stream_to.open("w") as out:
                proc = subprocess.run(self.argv(args), env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                      text=True, timeout=timeout, check=False, input=input)
            if check and proc.returncode != 0:
                tail = stream_to.read_text(errors="replace")[-4000:]
                raise ImagePodmanError(f"podman {' '.join(args[:2])} exited {proc.returncode}:\n{tail}")
            return proc
        proc = subprocess.run(self.argv(args), env=self.env(), capture_output=True, text=True, timeout=timeout,
                              check=False, input=input)
        if check and proc.returncode != 0:
            raise ImagePodmanError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def has_image(self, name: str) -> bool:
        return self.run(["image", "exists", name], check=False).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self.run(["image", "inspect", "--format", "{{.Size}}", name]).stdout.strip())

    def image_id(self, name: str) -> str:
        return self.run(["image", "inspect", "--format", "{{.Id}}", name]).stdout.strip()

    def close(self) -> None:
        # stop nothing: every container here runs with --rm; only the run root goes
        for args in (["container", "cleanup", "--all"], ["unmount", "--all"]):
            subprocess.run(self.argv(args), env=self.env(), capture_output=True, check=False, timeout=60)
        subprocess.run(["umount", "-R", "-l", str(self.short / "run")], capture_output=True, check=False)
        shutil.rmtree(self.short, ignore_errors=True)


def ca_mount_args(environ: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(`--volume` args, env for the container) that hand the host's PIP_CERT CA bundle to pip inside,
    for machines behind a TLS-inspecting proxy; nothing when the host sets none."""
    env = os.environ if environ is None else environ
    cert = env.get("PIP_CERT", "")
    if not cert or not os.path.isfile(cert):
        return [], {}
    return ["--volume", f"{os.path.realpath(cert)}:{CA_IN_CONTAINER}:ro"], {"PIP_CERT": CA_IN_CONTAINER}


#: Left out when the repository is not a git checkout (a copy, as in the Vagrant VM): what .gitignore lists.
NOT_SOURCE = (".git", ".venv", ".build", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "proto_gen",
              "lab-state", "build", "dist")


def _repo_files(repo: Path) -> list[str]:
    proc = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=False,
    )
    if proc.returncode == 0:
        return proc.stdout.decode().split("\0")
    files = []
    for dirpath, dirs, names in os.walk(repo):
        dirs[:] = [d for d in dirs if d not in NOT_SOURCE and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(dirpath, n), repo) for n in names
                  if n not in NOT_SOURCE and not n.endswith(".pyc")]
    return files


def source_tree(dest: Path) -> Path:
    """A copy of the repository's files as a clean clone would have them (tracked and new, not ignored:
    no .venv, no generated code, no build dir)."""
    repo = Path(__file__).resolve().parents[2]
    files = _repo_files(repo)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in filter(None, files):
        src = repo / rel
        if not src.is_file():
            continue  # deleted in the work tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    return dest
