"""Build a tiny container root filesystem from this machine's own binaries (no image registry needed).

Each requested program is copied with the shared libraries `ldd` reports (and the dynamic loader) to the
same paths inside the root, so `podman run --rootfs DIR /bin/bash ...` works. bash is enough for TCP
clients: its `/dev/tcp/HOST/PORT` redirection opens a real connection.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

DEFAULT_PROGRAMS: tuple[str, ...] = ("bash", "sleep", "cat")

# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
_LDD_ARROW = re.compile(r"^\s*\S+\s+=>\s+(/\S+)\s+\(0x[0-9a-fA-F]+\)\s*$")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-fA-F]+\)\s*$")


class RootfsError(RuntimeError):
    """A program or one of its libraries could not be found or copied."""


def parse_ldd(output: str) -> list[str]:
    """Absolute library paths from `ldd` output, in order, without duplicates (vdso and 'not found' lines
    are skipped; 'not found' raises, since the program would not start)."""
    paths: list[str] = []
    for line in output.splitlines():
        if "not found" in line:
            raise RootfsError(f"ldd: missing library: {line.strip()}")
        match = _LDD_ARROW.match(line) or _LDD_PLAIN.match(line)
        if match and match.group(1) not in paths:
            paths.append(match.group(1))
    return paths


def libraries_of(binary: str) -> list[str]:
    """The shared libraries a binary loads (empty for a static binary)."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "not a dynamic executable" in (proc.stdout + proc.stderr):
            return []
        raise RootfsError(f"ldd {binary} failed: {proc.stderr.strip()}")
    return parse_ldd(proc.stdout)


def _copy_into(root: Path, source: str, dest_rel: str) -> None:
    dest = root / dest_rel.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copy2(source, dest, follow_symlinks=True)


def build_rootfs(root: Path, programs: Sequence[str] = DEFAULT_PROGRAMS) -> Path:
    """Create root with /bin/<program> for each program (found on PATH) plus their libraries, and the
    directories and files a container runtime expects (/proc, /sys, /dev, /tmp, /etc/passwd, ...)."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "run", "root"):
        (root / d).mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    for program in programs:
        found = shutil.which(program)
        if found is None:
            raise RootfsError(f"program {program!r} not found on PATH")
        real = os.path.realpath(found)
        _copy_into(root, real, f"/bin/{program}")
        for lib in libraries_of(real):
            _copy_into(root, lib, lib)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nproxy:x:1337:1337::/tmp:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\nproxy:x:1337:\n")
    return root


def bash_tcp_client(host: str, port: int, payload: str) -> list[str]:
    """argv (inside the rootfs) that connects to host:port, sends payload, prints the reply until EOF.

    host, port and payload are passed as positional parameters, never spliced into the script text."""
    if not re.fullmatch(r"[0-9A-Za-z.:]+", host):
        raise ValueError(f"not an IP address: {host!r}")
    if not 0 < port < 65536:
        raise ValueError(f"bad port: {port}")
    script = 'exec 3<>"/dev/tcp/$1/$2" || exit 3; printf %s "$3" >&3; cat <&3'
    return ["/bin/bash", "-c", script, "client", host, str(port), payload]


def files_in(root: Path) -> Iterable[str]:
    """Relative paths of every file under root (for tests of the builder)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield os.path.relpath(os.path.join(dirpath, f), root)
