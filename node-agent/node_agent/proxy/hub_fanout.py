"""One proxy interface over several transports: the gRPC hub and the ZDS server side by side.

Every upsert and remove goes to each transport; the caller's future settles with the first transport
that answers: the ack of the proxy connected there, or its error (fail closed). A node runs one proxy,
so in practice one transport answers and the others keep the workload for a proxy that connects later;
their futures are then cancelled, so they keep no waiter for it (`ack_book.AckBook.forget`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.hub_session import settle
from node_agent.reconcile.state import Hub, PeerListener


def first_answer(parts: Sequence[futures.Future[None]]) -> futures.Future[None]:
    """A future settled like the first of `parts` to settle."""
    out: futures.Future[None] = futures.Future()
    lock = threading.Lock()

    def done(f: futures.Future[None]) -> None:
        with lock:
            if out.done():
                return
            exc = f.exception() if not f.cancelled() else futures.CancelledError()
            settle(out, exc)
        for other in parts:  # answered: the other transports need not wait for their proxies any more
            other.cancel()

    for f in parts:
        f.add_done_callback(done)
    return out


class HubFanout:
    def __init__(self, primary: Hub, *others: Hub, names: Sequence[str] = ()) -> None:
        self.hubs: tuple[Hub, ...] = (primary, *others)
        self.names = tuple(names) or tuple(f"hub{i}" for i in range(len(self.hubs)))

    def start(self) -> None:
        started: list[Hub] = []
        try:
            for h in self.hubs:
                h.start()
                started.append(h)
        except BaseException:
            for h in reversed(started):
                h.stop()
            raise

    def stop(self) -> None:
        for h in self.hubs:
            h.stop()

    def upsert(self, w: WorkloadInfo) -> futures.Future[None]:
        return first_answer([h.upsert(w) for h in self.hubs])

    def remove(self, uid: str) -> futures.Future[None]:
        return first_answer([h.remove(uid) for h in self.hubs])

    @property
    def connected(self) -> bool:
        return any(h.connected for h in self.hubs)

    def status(self) -> dict[str, Any]:
        """The primary's status, the others' under their names, `connected` over all of them."""
        out = dict(self.hubs[0].status())
        for name, h in zip(self.names[1:], self.hubs[1:], strict=True):
            out[name] = h.status()
        out["connected"] = self.connected
        return out

    def add_peer_listener(self, listener: PeerListener) -> None:
        for h in self.hubs:
            h.add_peer_listener(listener)
