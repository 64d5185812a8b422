"""A minimal Debian 12 root filesystem from Debian packages (mmdebstrap), as a tarball podman imports.

The tarball is cached in the build dir under a name that encodes every mmdebstrap argument, so a second
run (or the second test of one run) reuses it; delete `.build/image/` to start over. The root has no
docs, man pages or locales (dpkg path excludes, which stay in the root for later installs) and no apt
lists.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRRORS: tuple[str, ...] = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
LEAN_DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)


class RootfsBuildError(RuntimeError):
    pass


def build_dir() -> Path:
    """Where cached artefacts live (`HEADRACE_BUILD_DIR`, default `<repo>/.build/image`)."""
    path = Path(os.environ.get("HEADRACE_BUILD_DIR") or REPO / ".build" / "image")
    path.mkdir(parents=True, exist_ok=True)
    return path


def mmdebstrap_argv(output: Path, include: Sequence[str] = ()) -> list[str]:
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=tar", "--quiet"]
    argv += [f"--dpkgopt={opt}" for opt in LEAN_DPKG_OPTIONS]
    argv.append('--aptopt=Acquire::Languages "none"')
    if include:
        argv.append("--include=" + ",".join(include))
    return [*argv, SUITE, str(output), *MIRRORS]


def cache_key(include: Sequence[str] = ()) -> str:
    return hashlib.sha256("\0".join(mmdebstrap_argv(Path("-"), include)).encode()).hexdigest()[:12]


def debian_rootfs_tar(include: Sequence[str] = (), timeout: float = 900) -> tuple[Path, float]:
    """The cached tarball (built when missing) and the seconds this call spent building it (0 if cached)."""
    if shutil.which("mmdebstrap") is None:
        raise RootfsBuildError("mmdebstrap is not installed (scripts/setup.sh installs it)")
    out = build_dir() / f"debian-{SUITE}-minbase-{cache_key(include)}.tar"
    if out.is_file() and out.stat().st_size > 0:
        return out, 0.0
    tmp = out.with_suffix(".tar.part")
    tmp.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        mmdebstrap_argv(tmp, include), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RootfsBuildError(f"mmdebstrap exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    tmp.rename(out)
    return out, time.monotonic() - started
