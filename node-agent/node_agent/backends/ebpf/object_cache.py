"""The compiled eBPF object on disk, so an agent compiles `redirect.c` once per (sources, kernel, bcc), not
at every start.

The file holds what per-pod loading needs and nothing else: each program's instructions, its map-fd
relocations, and each map's shape (pure data: `encode` / `decode`). It is named for its key, a hash of the
C sources, the kernel release and the bcc version (`cache_key`), so a new agent version, a kernel upgrade or
a bcc upgrade compiles again. The directory is the agent's (`<state-dir>/bpf-cache`, mode 0700): a file
that is not a regular file owned by root (our uid) or that others can write is never loaded, since its
instructions would be loaded into the kernel as they are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from node_agent.backends.ebpf.bpfsys import MapSpec

FORMAT = 1
SUFFIX = ".bpfobj.json"


class CacheError(ValueError):
    """A cache file that cannot be used (unreadable, foreign, malformed, for other programs or maps)."""


def cache_key(sources: list[bytes], kernel_release: str, bcc_version: str) -> str:
    """Pure: the key of a compiled object (hex); any change of the inputs gives another key."""
    h = hashlib.sha256()
    for part in (*sources, kernel_release.encode(), bcc_version.encode(), str(FORMAT).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def encode(
    key: str,
    programs: dict[str, tuple[int, int, bytes, tuple[tuple[int, str], ...]]],
    maps: dict[str, MapSpec],
) -> bytes:
    """Pure: programs (name -> (type, attach type, instructions, relocations)) and maps -> file bytes."""
    doc = {
        "format": FORMAT,
        "key": key,
        "maps": {n: [m.map_type, m.key_size, m.value_size, m.max_entries, m.flags] for n, m in sorted(maps.items())},
        "programs": {
            n: {"type": t, "attach": a, "insns": base64.b64encode(i).decode(), "relocs": [list(r) for r in rel]}
            for n, (t, a, i, rel) in sorted(programs.items())
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CacheError(f"{what} is not a non-negative integer")
    return v


def decode(
    raw: bytes, key: str, want_programs: set[str], want_maps: set[str]
) -> tuple[dict[str, tuple[int, int, bytes, tuple[tuple[int, str], ...]]], dict[str, MapSpec]]:
    """Pure: file bytes -> (programs, maps), checked against the key and the expected names."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CacheError(f"not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("key") != key:
        raise CacheError("another format or key")
    raw_maps, raw_progs = doc.get("maps"), doc.get("programs")
    if not isinstance(raw_maps, dict) or set(raw_maps) != want_maps:
        raise CacheError("maps differ from the expected ones")
    if not isinstance(raw_progs, dict) or set(raw_progs) != want_programs:
        raise CacheError("programs differ from the expected ones")
    maps: dict[str, MapSpec] = {}
    for name, fields in raw_maps.items():
        if not isinstance(fields, list) or len(fields) != 5:
            raise CacheError(f"map {name}: bad shape")
        maps[name] = MapSpec(*(_int(f, f"map {name}") for f in fields))
    programs: dict[str, tuple[int, int, bytes, tuple[tuple[int, str], ...]]] = {}
    for name, p in raw_progs.items():
        if not isinstance(p, dict) or not isinstance(p.get("insns"), str) or not isinstance(p.get("relocs"), list):
            raise CacheError(f"program {name}: bad shape")
        try:
            insns = base64.b64decode(p["insns"], validate=True)
        except ValueError as e:
            raise CacheError(f"program {name}: instructions not base64") from e
        if not insns or len(insns) % 8:
            raise CacheError(f"program {name}: instructions are not whole 8-byte units")
        relocs: list[tuple[int, str]] = []
        for r in p["relocs"]:
            if not isinstance(r, list) or len(r) != 2 or r[1] not in want_maps:
                raise CacheError(f"program {name}: bad relocation {r!r}")
            idx = _int(r[0], f"program {name} relocation")
            if idx * 8 + 8 > len(insns):
                raise CacheError(f"program {name}: relocation {idx} outside the program")
            relocs.append((idx, r[1]))
        programs[name] = (_int(p.get("type"), name), _int(p.get("attach"), name), insns, tuple(relocs))
    return programs, maps


def path_for(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"redirect-{key}{SUFFIX}"


def read(cache_dir: Path, key: str) -> bytes | None:
    """The cache file's bytes, or None when absent; CacheError for a file we must not trust."""
    path = path_for(cache_dir, key)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"{path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise CacheError(f"{path}: not a regular file of ours that only we can write")
        return f.read()


def write(cache_dir: Path, key: str, data: bytes) -> Path:
    """Write the cache file atomically (a temporary file renamed); the directory is made 0700."""
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = path_for(cache_dir, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in cache_dir.glob(f"redirect-*{SUFFIX}"):  # objects of older sources/kernels
        if old != path:
            old.unlink(missing_ok=True)
    return path
