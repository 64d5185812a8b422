"""Run a few short commands at once and collect their output: ``os.posix_spawnp`` + ``select.poll``.

The CNI plugin runs iptables-save/-restore (under ``nsenter``) on its ADD path; ``import subprocess`` alone
costs it about 10 ms of start-up (signal, threading, selectors, contextlib, ...), more than running the
commands. ``posix_spawnp`` (vfork + exec in glibc) starts them cheaply; stdin is fed and stdout/stderr are
drained together in one poll loop, so no pipe can fill up and block a child. Like ``subprocess`` with its
defaults: the environment is inherited, SIGPIPE/SIGXFSZ are reset to their defaults in the child, output
is decoded as UTF-8 with universal newlines.

Every command the kernel layer (tables.py) starts goes through ``run_many``, which hands the batch to the
installed ``Runner``: ``Spawner`` (the real thing) unless a test installed another one with
``install_runner``, e.g. a recorder that captures the exact argv and stdin texts of a CNI ADD (a dry run).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C half of `signal` (which imports enum)
import os
import select
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Protocol

    class Runner(Protocol):
        """Runs one batch of commands at once: ``(argv, stdin text or None)`` each, a result each, in order.
        Raises OSError when a command cannot be started (as ``posix_spawnp`` does)."""

        def run_many(self, jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[Result]: ...


_CHUNK = 65536
_DEFAULT_SIGNALS: tuple[int, int] = (_signal.SIGPIPE, _signal.SIGXFSZ)  # what subprocess's restore_signals resets


class Result:
    """The outcome of one command: ``returncode`` None means it timed out (it was killed)."""

    __slots__ = ("returncode", "stderr", "stdout")

    def __init__(self, returncode: int | None, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def _text(data: bytearray) -> str:
    return data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


class _Child:
    __slots__ = ("err", "err_fd", "in_data", "in_fd", "out", "out_fd", "pid", "status")

    def __init__(self, argv: Sequence[str], stdin: str | None) -> None:
        self.pid = 0
        self.status: int | None = None
        self.in_data = memoryview(stdin.encode("utf-8")) if stdin is not None else memoryview(b"")
        self.out = bytearray()
        self.err = bytearray()
        fds: list[int] = []
        try:
            if stdin is not None:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                fds += [in_r, in_w]
            else:
                in_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                in_w = -1
                fds.append(in_r)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds += [out_r, out_w, err_r, err_w]
            actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
            self.pid = os.posix_spawnp(
                argv[0], list(argv), os.environ, file_actions=actions, setsigdef=_DEFAULT_SIGNALS
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in (in_r, out_w, err_w):  # the child's ends
            os.close(fd)
        self.in_fd, self.out_fd, self.err_fd = in_w, out_r, err_r
        if in_w >= 0:
            os.set_blocking(in_w, False)
            if not self.in_data:
                self._close_in()

    def _close_in(self) -> None:
        if self.in_fd >= 0:
            os.close(self.in_fd)
            self.in_fd = -1

    def close(self) -> None:
        self._close_in()
        for fd in (self.out_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        self.out_fd = self.err_fd = -1

    def kill(self) -> None:
        if self.status is None and self.pid:
            try:
                os.kill(self.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.status = -1


class Spawner:
    """The real runner: ``spawn_many``."""

    __slots__ = ()

    def run_many(self, jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[Result]:
        return spawn_many(jobs, timeout)


_runner: Runner = Spawner()


def install_runner(runner: Runner | None) -> Runner:
    """Make ``runner`` run every batch from now on (None: the real ``Spawner``); returns the one it
    replaces, so a test can put it back."""
    global _runner
    previous = _runner
    _runner = runner if runner is not None else Spawner()
    return previous


def run_many(jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[Result]:
    """Run one batch through the installed runner (see ``spawn_many`` for what the real one does)."""
    return _runner.run_many(jobs, timeout)


def spawn_many(jobs: Sequence[tuple[Sequence[str], str | None]], timeout: float) -> list[Result]:
    """Start every ``(argv, stdin text or None)`` at once, wait for all (at most ``timeout`` seconds in
    total). OSError from starting a command (e.g. FileNotFoundError) is raised after the ones already
    started have been killed and reaped."""
    children: list[_Child] = []
    try:
        for argv, stdin in jobs:
            children.append(_Child(argv, stdin))
        deadline = time.monotonic() + timeout
        _pump(children, deadline)
        results: list[Result] = []
        for child in children:
            if child.status is None:
                _reap(child, deadline)
            status = child.status
            code = None if status is None or status == -1 else os.waitstatus_to_exitcode(status)  # -1: killed
            results.append(Result(code, _text(child.out), _text(child.err)))
        return results
    finally:
        for child in children:
            child.close()
            child.kill()


def _reap(child: _Child, deadline: float) -> None:
    """Wait for a child whose output is closed; kill it at the deadline (like communicate(timeout))."""
    delay = 0.0001
    while True:
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            child.status = status
            return
        if time.monotonic() >= deadline:
            child.kill()
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _pump(children: list[_Child], deadline: float) -> None:
    """Feed stdins and drain stdout/stderr until every output pipe is at EOF; kill all at the deadline."""
    poller = select.poll()
    owner: dict[int, tuple[_Child, str]] = {}
    for child in children:
        if child.in_fd >= 0:
            poller.register(child.in_fd, select.POLLOUT)
            owner[child.in_fd] = (child, "in")
        poller.register(child.out_fd, select.POLLIN)
        owner[child.out_fd] = (child, "out")
        poller.register(child.err_fd, select.POLLIN)
        owner[child.err_fd] = (child, "err")
    while owner:
        left = deadline - time.monotonic()
        if left <= 0:
            for child in children:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
                if pid:
                    child.status = status  # finished in time: keep its real status
                else:
                    child.kill()
            return
        for fd, event in poller.poll(left * 1000):
            child, what = owner[fd]
            if what == "in":
                try:
                    written = os.write(fd, child.in_data[:_CHUNK]) if event & select.POLLOUT else 0
                except BlockingIOError:
                    written = 0
                except BrokenPipeError:
                    written = -1  # the child stopped reading: its exit status and stderr tell why
                if written < 0 or event & (select.POLLERR | select.POLLHUP) or written == len(child.in_data):
                    poller.unregister(fd)
                    del owner[fd]
                    child._close_in()
                else:
                    child.in_data = child.in_data[written:]
                continue
            data = os.read(fd, _CHUNK)
            if data:
                (child.out if what == "out" else child.err).extend(data)
            else:
                poller.unregister(fd)
                del owner[fd]
