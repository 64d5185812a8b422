"""Closing, on a thread of its own, what the kernel makes wait: freeing an nf_tables socket (a libnftables
context, a raw netfilter netlink socket) after a transaction that deleted a table waits for an RCU grace
period (~13 ms here, more on a busy node). The transaction is committed by then, so a caller (a CNI DEL,
a repair) need not wait for the free. Until it is closed, the socket keeps its netns alive; the closer
thread itself lives in the agent's own netns, whichever thread started it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from node_agent.kernel.home_netns import go_home

_QUEUE: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_STARTED: list[threading.Thread] = []
_LOCK = threading.Lock()


def later(close: Callable[[], None]) -> None:
    """Run `close` on the closer thread (started at the first call)."""
    with _LOCK:
        if not _STARTED:
            thread = threading.Thread(target=_run, name="nft-close", daemon=True)
            thread.start()
            _STARTED.append(thread)
    _QUEUE.put(close)


def _run() -> None:
    go_home()  # started by a thread that is often inside a pod netns: it must not stay there
    while True:
        close = _QUEUE.get()
        try:
            close()
        except OSError:
            pass  # a close that fails has nothing left to wait for
