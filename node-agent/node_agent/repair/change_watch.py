"""One thread that waits (epoll) on the change subscriptions of every watched pod netns (nf_tables and
routing: `nft_events`).

    watcher = ChangeWatcher(on_change)      # on_change(key) from the watcher thread
    watcher.start()
    watcher.watch(uid, netns_path, inode)   # subscribe (nft_events.subscribe): "new", "kept" or "failed"
    watcher.unwatch(uid)                    # sockets closed
    watcher.keys(); watcher.close()

A subscription is keyed by the caller's key (a pod uid) and remembers the netns (path and inode) it was
made for: watching the same key at another netns replaces it. A subscription is one socket or several
(nf_tables and routing). Sockets are registered with the epoll object from any thread (epoll_ctl is
thread-safe); an event whose socket was unwatched meanwhile is dropped. A socket that fails to read is
reported as a change (the caller verifies the pod) and the key's sockets dropped, so the caller's next
`watch` makes fresh ones. Every socket is closed by `unwatch` and `close`.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Sequence

from node_agent.kernel import nft_events
from node_agent.kernel.fd_limit import raise_fd_limit

log = logging.getLogger("headrace.agent.change_watch")


class ChangeWatcher:
    def __init__(self, on_change: Callable[[str], None],
                 subscribe: Callable[[str, bool], socket.socket | Sequence[socket.socket]] = nft_events.subscribe,
                 ) -> None:
        self._on_change = on_change
        self._subscribe = subscribe
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[tuple[str, int], tuple[socket.socket, ...]]] = {}
        self._by_fd: dict[int, str] = {}
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.fd_limit = raise_fd_limit()  # a subscription that hits it fails: that pod is polled
        self.events = 0  # change reports made (for tests and metrics)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nft-change-watch", daemon=True)
        self._thread.start()

    def watch(self, key: str, netns_path: str, inode: int = 0, *, routing: bool = True) -> str:
        """Subscribe to the changes of the netns at netns_path (of that inode) for key (`routing`: its rule,
        route and address changes too): "kept" when it already is, "new", or "failed" (the subscription
        could not be made: the caller polls)."""
        ident = (netns_path, inode)
        with self._lock:
            held = self._by_key.get(key)
            if held is not None and held[0] == ident:
                return "kept"
        try:
            got = self._subscribe(netns_path, routing)
        except (nft_events.NftEventsError, OSError) as exc:
            log.warning("change subscription failed: %s", exc,
                        extra={"uid": key, "netns": netns_path, "step": "nft-watch"})
            return "failed"
        socks = (got,) if isinstance(got, socket.socket) else tuple(got)
        with self._lock:
            if self._stop:
                self._drop_locked(socks)
                return "failed"
            old = self._by_key.pop(key, None)
            if old is not None:
                self._drop_locked(old[1])
            self._by_key[key] = (ident, socks)
            for sock in socks:
                self._by_fd[sock.fileno()] = key
                self._epoll.register(sock.fileno(), select.EPOLLIN)
        return "new"

    def unwatch(self, key: str) -> None:
        with self._lock:
            held = self._by_key.pop(key, None)
            if held is not None:
                self._drop_locked(held[1])

    def watched(self, key: str) -> bool:
        with self._lock:
            return key in self._by_key

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._by_key)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            for _path, socks in self._by_key.values():
                self._drop_locked(socks)
            self._by_key.clear()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5.0)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _drop_locked(self, socks: tuple[socket.socket, ...]) -> None:
        for sock in socks:
            fd = sock.fileno()
            if fd < 0:
                continue
            self._by_fd.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            sock.close()

    def _run(self) -> None:
        while True:
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):  # closed under us
                return
            changed: list[str] = []
            with self._lock:  # reads are non-blocking: draining under the lock keeps unwatch/close apart
                if self._stop:
                    return
                for fd, _ev in ready:
                    key = self._by_fd.get(fd)
                    if key is None:
                        continue
                    socks = self._by_key[key][1]
                    sock = next(s for s in socks if s.fileno() == fd)
                    try:
                        if nft_events.drain(sock) and key not in changed:
                            changed.append(key)
                    except OSError as exc:
                        log.warning("change subscription failed: %s", exc, extra={"uid": key, "step": "nft-watch"})
                        del self._by_key[key]
                        self._drop_locked(socks)
                        if key not in changed:
                            changed.append(key)
            for key in changed:
                self.events += 1
                try:
                    self._on_change(key)
                except Exception:
                    log.exception("change callback failed", extra={"uid": key, "step": "nft-watch"})
