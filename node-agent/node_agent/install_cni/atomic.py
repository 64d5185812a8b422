"""Atomic, idempotent file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time

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


def remove_stale_temps(directory: str, older_than: float = 60.0, now: float | None = None) -> list[str]:
    """Remove the temporary files `write_atomic` leaves in `directory` when its process is killed between
    the write and the rename (`.headrace-*.tmp`), those older than `older_than` seconds (a write in progress
    takes milliseconds; another writer's file is left alone); their names. Nothing else is touched."""
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < older_than:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(name)
    return removed


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
