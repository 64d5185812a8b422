"""Network namespaces from Python: the one place that calls setns(2) and holds the C library handle.

- `libc()`: the C library, loaded once per process (errno kept for `ctypes.get_errno()`); every ctypes
  call into libc in the codebase (setns, mount, inotify, bpf) goes through this handle.
- `setns(fd)`: move the calling thread into the network namespace open at `fd` (Python 3.11 has no
  `os.setns`; the C library's is called through `_ctypes`, see `_setns_call`). Only that thread moves;
  a socket keeps the netns it was created in.
- `enter(netns)`: the calling thread goes into a netns (path or open fd) for good (short-lived threads).
- `entered(netns)`: a context manager; the body runs in that netns, and the thread always goes back to the
  netns it was in (`NetnsReturnError` if even that fails: the thread must then end).
- `run_in_thread(netns, fn)`: `fn()` in a fresh thread that entered the netns; its result or its error.
- `open_pod_netns(path)` / `pod_netns_inode(path)`: the check the plugin (CNI_NETNS) and the agent (an
  ADD's netns, every pin) make before acting on a path: a network namespace (on nsfs, by NS_GET_NSTYPE)
  that is neither the caller's own nor the host's (/proc/1/ns/net).

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


_setns: Callable[[int, int], int] | None = None


def _setns_call() -> Callable[[int, int], int]:
    """setns(2) of the C library as a function returning its result, errno kept for `_ctypes.get_errno`.
    Made with `_ctypes` as `ctypes.CDLL` makes its functions, without importing `ctypes` (~3 ms of the
    CNI plugin's start-up; `_ctypes` alone ~0.5 ms): the plugin's nftables ADD enters the pod netns."""
    global _setns
    if _setns is None:
        import _ctypes

        class Int(_ctypes._SimpleCData):  # type: ignore[type-arg]  # what ctypes.c_int is
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):  # what CDLL(use_errno=True)'s functions are
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = Int
            _argtypes_ = (Int, Int)

        class Process:  # dlopen(NULL): the symbols the interpreter was linked with
            _handle = _ctypes.dlopen(None, os.RTLD_NOW)  # type: ignore[arg-type]

        _setns = Function(("setns", Process))  # type: ignore[arg-type]
    return _setns


def setns(fd: int, what: str = "") -> None:
    """Move the calling thread into the network namespace open at `fd` (EINVAL: not a network namespace).
    `what` names it in the error."""
    if hasattr(os, "setns"):  # Python 3.12+
        try:
            os.setns(fd, CLONE_NEWNET)
            return
        except OSError as exc:
            err = exc.errno or 0
    elif _setns_call()(fd, CLONE_NEWNET) != 0:
        import _ctypes

        err = _ctypes.get_errno()
    else:
        return
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


HOST_NETNS = "/proc/1/ns/net"  # the host's network namespace (where the node's pid 1 lives)
OWN_NETNS = "/proc/self/ns/net"


def stat_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what `path` leads to, None when it cannot be read (e.g. the namespace at /proc/1
    in a container without the host's pid namespace, or without ptrace access to pid 1)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def open_pod_netns(path: str, owner: str = "plugin", host: str = HOST_NETNS) -> int:
    """Open the network namespace at `path` (read-only, close-on-exec) after checking that it is one and
    that it belongs to a pod; returns the fd (the caller closes it). NetnsFileError when:

    - it does not exist (``gone``), cannot be opened, or is no nsfs file at all: a regular file, a
      directory, a FIFO (never opened blocking), a device (``gone`` for anything that is not nsfs);
    - it is a namespace of another type;
    - it is the caller's own network namespace (the node's, for the plugin and the agent) or the host's
      (`host`, /proc/1/ns/net; skipped when that cannot be read). Symlinks are followed first, so a link
      to either is refused too.

    `owner` names the caller in the message. Acting on the returned fd (not on `path` again) leaves no
    window for the path to be swapped after the check.
    """
    import stat as stat_mod

    if not path or "\0" in path:
        raise NetnsFileError(f"network namespace path {path!r} is not a usable path", gone=True)
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise NetnsFileError(f"network namespace {path} does not exist", gone=True) from exc
    except OSError as exc:
        raise NetnsFileError(f"cannot open network namespace {path}", exc.strerror or "") from exc
    own = os.stat(OWN_NETNS)
    if not stat_mod.S_ISREG(st.st_mode) or st.st_dev != own.st_dev:
        kind = "a directory" if stat_mod.S_ISDIR(st.st_mode) else "not a namespace file"
        raise NetnsFileError(f"{path} is {kind}", "not on nsfs: no network namespace is mounted there", gone=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError as exc:
        raise NetnsFileError(f"network namespace {path} does not exist", gone=True) from exc
    except OSError as exc:
        raise NetnsFileError(f"cannot open network namespace {path}", exc.strerror or "") from exc
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise NetnsFileError(f"{path} changed while it was being opened")
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            raise NetnsFileError(f"{path} is not a namespace file", exc.strerror or "", gone=True) from exc
        if nstype != CLONE_NEWNET:
            raise NetnsFileError(f"{path} is not a network namespace")
        ident = (fst.st_dev, fst.st_ino)
        if ident == (own.st_dev, own.st_ino):
            raise NetnsFileError(f"refusing to act on {path}: it is the {owner}'s own (node) network namespace")
        if ident == stat_identity(host):
            raise NetnsFileError(f"refusing to act on {path}: it is the host's network namespace ({host})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def pod_netns_inode(path: str, owner: str = "plugin", host: str = HOST_NETNS) -> int:
    """The inode of the pod network namespace at `path`, checked as `open_pod_netns` does."""
    fd = open_pod_netns(path, owner, host)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)
