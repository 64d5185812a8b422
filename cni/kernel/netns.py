"""Network namespaces from Python: the one place that calls setns(2) and holds the C library handle.

- `libc()`: the C library, loaded once per process (errno kept for `ctypes.get_errno()`); every ctypes
  call into libc in the codebase (setns, mount, inotify, bpf) goes through this handle.
- `setns(fd)`: move the calling thread into the network namespace open at `fd` (Python 3.11 has no
  `os.setns`). Only that thread moves; a socket keeps the netns it was created in.
- `enter(netns)`: the calling thread goes into a netns (path or open fd) for good (short-lived threads).
- `entered(netns)`: a context manager; the body runs in that netns, and the thread always goes back to the
  netns it was in (`NetnsReturnError` if even that fails: the thread must then end).
- `run_in_thread(netns, fn)`: `fn()` in a fresh thread that entered the netns; its result or its error.
- `pod_netns_inode(path)`: the CNI plugin's check that a path is a network namespace (nsfs, by
  NS_GET_NSTYPE) other than the caller's own.

Stdlib only, and cheap to import: the CNI plugin runs `pod_netns_inode` on every ADD, so `ctypes` and
`threading` are imported only by the functions that need them.
"""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import ctypes
    from collections.abc import Callable
    from types import TracebackType
    from typing import TypeVar

    T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: the namespace type (a CLONE_NEW* value)
THREAD_NETNS = "/proc/thread-self/ns/net"

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library of this process (dlopen(NULL): the symbols the interpreter was linked with)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def setns(fd: int, what: str = "") -> None:
    """Move the calling thread into the network namespace open at `fd` (EINVAL: not a network namespace).
    `what` names it in the error."""
    if libc().setns(fd, CLONE_NEWNET) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"setns{' ' + what if what else ''}: {os.strerror(err)}")


def enter(netns: str | int) -> None:
    """Move the calling thread into `netns` (a path, or an open fd that stays open) without a way back."""
    if not isinstance(netns, str):
        setns(netns)
        return
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, netns)
    finally:
        os.close(fd)


class NetnsReturnError(OSError):
    """The thread could not go back to the network namespace it was in: it must not be reused."""


class entered:
    """``with entered(netns):`` runs the body with the calling thread in `netns` (path or open fd) and then
    returns it to the netns it was in, also when the body raised."""

    __slots__ = ("home", "netns")

    def __init__(self, netns: str | int) -> None:
        self.netns = netns
        self.home = -1

    def __enter__(self) -> None:
        home = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            enter(self.netns)
        except BaseException:
            os.close(home)
            raise
        self.home = home

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        home, self.home = self.home, -1
        try:
            setns(home)
        except OSError as err:
            raise NetnsReturnError(err.errno, f"cannot go back to the thread's own netns: {err.strerror}") from err
        finally:
            os.close(home)


class NetnsThreadTimeout(TimeoutError):
    """`run_in_thread`: the thread did not finish in time (it goes on, as a daemon thread)."""


def run_in_thread(netns: str, fn: Callable[[], T], *, name: str = "headrace-netns", timeout: float | None = None) -> T:
    """Run `fn` in a fresh thread that has entered `netns`; return its result or raise its error. The
    thread ends afterwards and its netns with it: the caller's threads never move."""
    import threading

    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            enter(netns)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if errors:
        raise errors[0]
    if not result:
        raise NetnsThreadTimeout(f"no answer from {netns} within {timeout:.0f}s")
    return result[0]


class NetnsFileError(Exception):
    """`path` is not a usable network namespace; `gone` when it is no namespace (any more) at all."""

    def __init__(self, msg: str, details: str = "", gone: bool = False) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details
        self.gone = gone


def pod_netns_inode(path: str) -> int:
    """The inode of the network namespace at `path`, which must not be the caller's own (NetnsFileError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsFileError(f"network namespace {path} does not exist", gone=True) from exc
    except OSError as exc:
        raise NetnsFileError(f"cannot open network namespace {path}", exc.strerror or "") from exc
    try:
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            # e.g. the runtime's pin file after the namespace was unmounted: an empty regular file
            raise NetnsFileError(f"{path} is not a namespace file", exc.strerror or "", gone=True) from exc
        if nstype != CLONE_NEWNET:
            raise NetnsFileError(f"{path} is not a network namespace")
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    own = os.stat("/proc/self/ns/net").st_ino
    if inode == own:
        raise NetnsFileError(f"refusing to act on {path}: it is the plugin's own (node) network namespace")
    return inode
