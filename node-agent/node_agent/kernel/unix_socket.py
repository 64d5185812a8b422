"""The agent's unix sockets: mode 0600 from the first moment, stale files of a previous agent replaced."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
from collections.abc import Iterator

#: after a failed accept (out of fds...): the pause before the next try, so an accept loop never spins
ACCEPT_RETRY = 0.05


def wake_blocked(sock: socket.socket) -> None:
    """Shut `sock` down so a thread blocked in its accept() or recv() returns at once (how a server's
    `stop` ends a loop that has no timeout to poll with); errors ignored (closed already)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def remove_stale_socket(path: str, error: type[Exception] = FileExistsError) -> None:
    """Unlink a socket file left by a previous process; anything that is not a socket raises `error`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise error(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


def unlink_if_ours(path: str, inode: int) -> None:
    """Remove the socket file at `path` only if it is still the one we bound (inode `inode`, 0: never
    bound); a newer agent's socket that replaced it stays."""
    with contextlib.suppress(FileNotFoundError):
        if inode and os.lstat(path).st_ino == inode:
            os.unlink(path)


@contextlib.contextmanager
def private_bind_path(path: str, error: type[Exception] = FileExistsError) -> Iterator[str]:
    """Yield a temporary path to bind a socket at, inside a private 0700 directory next to `path`; after
    the body has bound it, set mode 0600 and rename it to `path`. So the socket is never reachable with a
    looser mode, and `path` switches from a previous agent's socket to ours atomically."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    remove_stale_socket(path, error)
    tmpdir = tempfile.mkdtemp(prefix=".sock-", dir=directory)
    tmp = os.path.join(tmpdir, "s")
    try:
        yield tmp
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        os.rmdir(tmpdir)


_early: dict[str, tuple[socket.socket, int, list[str]]] = {}  # path -> (socket, its file's inode, dirs made)


def listen_early(path: str, backlog: int) -> None:
    """Listen at `path` at once, before the server that serves it is built (the agent's start-up imports
    take a second or more): clients connecting meanwhile wait in the backlog instead of finding no socket.
    The server's listen_private(path) takes this socket over. Failures are left for that call to report."""
    made: list[str] = []  # the directories listening creates (removed again if start-up fails)
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        sock = listen_private(path, backlog)
    except (OSError, FileExistsError):
        return
    _early[os.path.abspath(path)] = (sock, os.lstat(path).st_ino, made)


def drop_early(path: str) -> None:
    """Close the socket listen_early opened for `path` (start-up failed before a server took it over) and
    remove its file if it is still that socket's."""
    found = _early.pop(os.path.abspath(path), None)
    if found is None:
        return
    sock, inode, made = found
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    sock.close()
    for directory in made:  # deepest first; only if still empty
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _take_early(path: str, backlog: int) -> socket.socket | None:
    found = _early.pop(os.path.abspath(path), None)
    if found is None:
        return None
    sock, inode, _made = found
    try:
        if os.lstat(path).st_ino == inode:
            sock.listen(backlog)
            return sock
    except OSError:
        pass
    sock.close()  # the file was replaced meanwhile: start over
    return None


def listen_private(path: str, backlog: int, error: type[Exception] = FileExistsError) -> socket.socket:
    """A listening unix stream socket at `path`, mode 0600 (see private_bind_path); the one listen_early
    opened for `path`, if any, with the connections waiting on it."""
    early = _take_early(path, backlog)
    if early is not None:
        return early
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with private_bind_path(path, error) as tmp:
            sock.bind(tmp)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
