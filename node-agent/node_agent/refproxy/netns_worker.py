"""A thread parked inside one pod network namespace that runs small jobs (socket creation) there.

The thread enters the netns with cni.kernel.netns.entered (setns(2) moves only the calling thread) and
goes back to its own before it ends.
A socket keeps the netns it was created in for its whole life, so the event loop can use sockets this
thread made while the loop itself stays in the proxy's own namespace.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from cni.kernel.netns import NetnsReturnError, entered

T = TypeVar("T")


class NetnsWorker:
    """Owns `netns_fd` (closed when the worker ends). Jobs run in FIFO order inside that netns; they may be
    submitted at once (they wait for the thread to enter it, and fail with the error when it cannot)."""

    def __init__(self, netns_fd: int, name: str) -> None:
        self._fd = netns_fd
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"netns-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        with self._lock:
            if not self._closed:
                self._jobs.put((fn, fut))
                return fut
        fut.set_exception(RuntimeError("netns worker is closed"))
        return fut

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._jobs.put(None)

    def _run(self) -> None:
        try:
            with entered(self._fd):
                self._serve()
        except NetnsReturnError:
            raise  # could not get back home: the thread ends (and says so)
        except OSError as exc:  # could not enter: nothing ran, every queued job fails with the reason
            self._drain(exc)
        finally:
            self._drain(RuntimeError("netns worker is closed"))
            os.close(self._fd)

    def _serve(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def _drain(self, exc: BaseException) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(exc)
