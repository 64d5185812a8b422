"""Atomic, idempotent file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import tempfile

TEMP_PREFIX = ".headrace-"
TEMP_SUFFIX = ".tmp"


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> bool:
    """Write `data` to `path` via a temp file in the same dir + fsync + rename.

    Returns False (and touches nothing, not even mtime) when the file already holds exactly `data`
    with `mode`.
    """
    current = read_bytes(path)
    if current == data and (os.stat(path).st_mode & 0o7777) == mode:
        return False
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return True


def replace_file(path: str, data: bytes, tmp: str, mode: int) -> None:
    """Write `data` to `tmp` and rename it over `path`: a reader sees the old file or the new one. No
    fsync (unlike `write_atomic`): for state rewritten often on a hot path, where a crash may lose the
    latest writes. `tmp` is removed when anything fails; FileNotFoundError when the directory is missing."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_file(path: str) -> bool:
    """Remove `path` and sync its directory; False when it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return True
