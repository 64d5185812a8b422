"""Run small jobs inside other network namespaces on long-lived threads (the agent's periodic reads).

`cni.kernel.netns.run_in_thread` starts a fresh thread per job; the drift check reads several things
inside every pod's netns every second (nf_tables generation, policy routes, tc filters), and a thread
start cost about five times the setns round trip. Here a worker enters the job's netns, runs the job,
goes back to its own netns (the agent's, whichever thread started it: `home_netns`), and waits for the
next job:

    run_in_netns("/var/run/netns/pod", fn, timeout=2.0)

Same contract as run_in_thread: fn's result or its exception; NetnsThreadTimeout when it did not finish
in time (that worker is abandoned: it ends after its job instead of serving another). A worker that
cannot get back to its own netns (NetnsReturnError) ends too; the caller gets that error.

A hand-over to a worker and back costs ~50 µs here, more than the setns round trip (~15 µs). Code that
does several things in one pod netns can enter it on its own thread with `staying_in(netns)`: inside
that block (and inside a worker's job) `run_in_netns` for the same netns runs `fn` inline, so the work
below it (the kernel layer's commands through the agent's runner, generation reads) needs no hand-over.
An inline `fn` has no timeout: it runs on the caller's thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from cni.kernel.netns import NetnsReturnError, NetnsThreadTimeout, entered
from node_agent.kernel.home_netns import go_home

T = TypeVar("T")

_Job = tuple[str, Callable[[], Any], "queue.Queue[tuple[bool, Any]]"]

log = logging.getLogger("headrace.agent.netns")

EXIT_NOT_HOME = 70  # visiting: a thread stuck outside the agent's netns ends the process

_HERE = threading.local()  # .netns: the path the thread entered with staying_in (absent: its own netns)


@contextmanager
def staying_in(netns: str) -> Iterator[None]:
    """The calling thread inside `netns` for the block (`entered`: it goes back afterwards); meanwhile
    `run_in_netns(netns, fn)` from this thread runs fn right here. Inside a block for the same netns
    (a backend that applies through another's apply) the thread is there already: nothing to enter."""
    previous = getattr(_HERE, "netns", None)
    if previous == netns:
        yield
        return
    with entered(netns):
        _HERE.netns = netns
        try:
            yield
        finally:
            _HERE.netns = previous


@contextmanager
def visiting(netns: str) -> Iterator[None]:
    """`staying_in` for one of the agent's long-lived threads that reads in a pod netns itself (the drift
    check, on the reconcile thread: no hand-over to a pooled thread, which costs more CPU than the read of
    a pod's TC filters or x_tables digest; no timeout either, as for an apply). Such a thread must never go
    on in a pod's netns: when it cannot come back it is moved to the agent's own (`go_home`) and the error
    raised as a plain OSError; when even that fails the process ends (exit status 70, logged), for the
    DaemonSet to start it again and adopt its pods, rather than act on the node from a pod's netns."""
    try:
        with staying_in(netns):
            yield
    except NetnsReturnError as exc:
        try:
            go_home()
        except OSError as home:
            log.critical("a thread cannot return to the agent's netns: exiting",
                         extra={"netns": netns, "reason": f"{exc}; {home}", "step": "netns-return"})
            os._exit(EXIT_NOT_HOME)
        raise OSError(exc.errno, f"left {netns} only by the agent's own netns: {exc.strerror}") from exc


class _Worker:
    def __init__(self, pool: NetnsRunner, number: int) -> None:
        self.pool = pool
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.abandoned = False
        self.thread = threading.Thread(target=self._run, name=f"headrace-netns-{number}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            go_home()  # the thread that made this worker may be inside a pod netns (`staying_in`)
        except OSError as exc:
            home_error: NetnsReturnError | None = NetnsReturnError(exc.errno, f"netns worker: {exc.strerror}")
        else:
            home_error = None
        while True:
            job = self.jobs.get()
            if job is None:
                return
            netns, fn, reply = job
            if home_error is not None:  # this thread is not at home: never used
                reply.put((False, home_error))
                return
            try:
                with staying_in(netns):
                    value = fn()
            except NetnsReturnError as exc:  # this thread sits in a foreign netns: never reuse it
                reply.put((False, exc))
                return
            except BaseException as exc:  # handed to the caller
                reply.put((False, exc))
            else:
                reply.put((True, value))
            if not self.pool.release(self):
                return


class NetnsRunner:
    def __init__(self, max_idle: int = 8) -> None:
        self.max_idle = max_idle
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self.started = 0

    def run(self, netns: str, fn: Callable[[], T], *, timeout: float | None = None) -> T:
        if getattr(_HERE, "netns", None) == netns:
            return fn()  # already there (staying_in): no hand-over, no timeout
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self.started += 1
        if worker is None:
            worker = _Worker(self, next(self._numbers))
        reply: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
        worker.jobs.put((netns, fn, reply))
        try:
            ok, value = reply.get(timeout=timeout)
        except queue.Empty:
            worker.abandoned = True  # still busy with the job: it ends when the job does
            raise NetnsThreadTimeout(f"no answer from {netns} within {timeout:.0f}s") from None
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def release(self, worker: _Worker) -> bool:
        """A worker done with its job: back to the idle list (True) or told to end (False)."""
        with self._lock:
            if worker.abandoned or len(self._idle) >= self.max_idle:
                return False
            self._idle.append(worker)
            return True


RUNNER = NetnsRunner()


def run_in_netns(netns: str, fn: Callable[[], T], *, timeout: float | None = None) -> T:
    """fn() inside `netns` on a pooled thread."""
    return RUNNER.run(netns, fn, timeout=timeout)
