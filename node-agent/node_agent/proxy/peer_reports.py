"""Who is connected to the node proxy's sockets: the hub's reports, handed to listeners on one thread.

The hub reports a pid source (a callable, run on the report thread, so the /proc and sock_diag work stays
off the gRPC threads) with how it was learnt: "grpc" (sock_diag on the gRPC socket when a session opens)
or "netns-fd" (SO_PEERCRED of a side-channel client). Listeners are called in report order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("headrace.proxy_hub")

# (pids connected to a proxy socket, via "grpc" | "netns-fd"); called on the report thread
PeerListener = Callable[[set[int], str], None]
PidSource = Callable[[], set[int]]


class PeerReports:
    def __init__(self) -> None:
        self._listeners: list[PeerListener] = []
        self._queue: queue.Queue[tuple[PidSource, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def add_listener(self, listener: PeerListener) -> None:
        self._listeners.append(listener)

    def report(self, pids: PidSource, via: str) -> None:
        if self._listeners:
            self._queue.put((pids, via))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="proxy-hub-peers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            get_pids, via = item
            try:
                pids = get_pids()
            except OSError as exc:
                log.warning("proxy peer unknown", extra={"step": "proxy_peer_unknown", "via": via, "error": str(exc)})
                continue
            log.debug("proxy peer", extra={"step": "proxy_peer", "via": via, "pids": sorted(pids)})
            for listener in list(self._listeners):
                try:
                    listener(pids, via)
                except Exception:
                    log.exception("proxy peer listener failed", extra={"step": "proxy_peer", "via": via})
