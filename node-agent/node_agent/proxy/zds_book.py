"""The ZDS server's state machine (pure: no sockets, no threads, no clock; the server holds its lock).

What it keeps: what every transport keeps (`ack_book.AckBook`: the desired set, the futures waiting for
acks), and per ztunnel connection the queue of requests still to send and the one in flight. The rules,
as istio-cni applies them:

- A new connection (after its ZdsHello) gets the whole desired set as adds, then `snapshot_sent`.
- When the newest connection goes, the adds it had not acked go to the one that is the newest now.
- An add goes to the newest connection only (during a ztunnel upgrade the new ztunnel takes over the
  pods); a delete goes to every connection, so an older ztunnel still running lets go of the pod too.
- One request in flight per connection; its ack (from any connection) settles the waiters of that uid's
  latest operation. An error ack fails them (ProxyNack): the pod is not enrolled (fail closed).
- An add whose netns cannot be opened when it is sent: inside a snapshot it becomes a `keep` (ztunnel
  keeps the workload if it has it), outside one it fails its waiters.
- A delete issued while no connection was there is fulfilled when a later snapshot (which omits the
  uid) is acked.
"""

from __future__ import annotations

from collections import deque
from concurrent import futures
from dataclasses import dataclass, field
from typing import Literal

from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.ack_book import AckBook
from node_agent.proxy.hub_session import OpKind, Waiter

Settle = tuple[futures.Future[None], BaseException | None]
OutKind = Literal["add", "keep", "del", "snapshot_sent"]


class ZdsNack(Exception):
    """ztunnel acked with an error (or the request could not be sent); str(exc) says which."""


class ZdsSuperseded(Exception):
    """A later upsert/remove of the same uid replaced this one before ztunnel acked it."""


@dataclass
class Outgoing:
    kind: OutKind
    uid: str
    op: int
    workload: WorkloadInfo | None = None
    snapshot: bool = False


@dataclass
class ZdsConn:
    number: int
    pid: int = 0
    queue: deque[Outgoing] = field(default_factory=deque)
    inflight: Outgoing | None = None
    snapshot_acked: bool = False
    closed: bool = False


class ZdsBook(AckBook):
    def __init__(self) -> None:
        super().__init__()
        self.conns: list[ZdsConn] = []  # greeted connections, oldest first
        self.acks = 0
        self.nacks = 0

    # ---- the agent's operations ------------------------------------------------------------------

    def upsert(self, w: WorkloadInfo, fut: futures.Future[None]) -> list[Settle]:
        op, gone = self.issue(w.uid, "add", fut, w)
        newest = self.newest()
        if newest is not None:
            newest.queue.append(Outgoing("add", w.uid, op, w))
        return self._superseded(w.uid, "add", gone)

    def remove(self, uid: str, fut: futures.Future[None]) -> list[Settle]:
        op, gone = self.issue(uid, "delete", fut)
        for c in self.conns:
            c.queue.append(Outgoing("del", uid, op))
        return self._superseded(uid, "delete", gone)

    # ---- connections -----------------------------------------------------------------------------

    def newest(self) -> ZdsConn | None:
        return self.conns[-1] if self.conns else None

    def greeted(self, conn: ZdsConn) -> None:
        """The connection said hello: it becomes the newest and gets the snapshot."""
        self.conns.append(conn)
        for uid, w in self.desired.items():
            conn.queue.append(Outgoing("add", uid, self.latest_op[uid], w, snapshot=True))
        conn.queue.append(Outgoing("snapshot_sent", "", self.op_now))

    def closed(self, conn: ZdsConn) -> None:
        """The connection is gone. The adds it had not acked go to the connection that is the newest now (an
        older ztunnel still running: an upgrade whose new ztunnel died), or, with none left, wait for the
        next connection's snapshot. Its snapshot's adds and every delete the older one had queued already."""
        heir_owed = conn is self.newest()
        unacked = [out for out in (conn.inflight, *conn.queue)
                   if out is not None and out.kind == "add" and not out.snapshot]
        conn.closed = True
        conn.inflight = None
        conn.queue.clear()
        if conn in self.conns:
            self.conns.remove(conn)
        heir = self.newest()
        if heir_owed and heir is not None:
            heir.queue.extend(out for out in unacked if self.latest_op.get(out.uid) == out.op)

    def next_request(self, conn: ZdsConn) -> Outgoing | None:
        """The next request to send on conn, now in flight; None while one is in flight or none queued."""
        if conn.closed or conn.inflight is not None or not conn.queue:
            return None
        conn.inflight = conn.queue.popleft()
        return conn.inflight

    def as_keep(self, conn: ZdsConn) -> Outgoing:
        """The in-flight snapshot add's netns cannot be opened: send a keep for it instead."""
        out = conn.inflight
        assert out is not None and out.kind == "add" and out.snapshot
        conn.inflight = Outgoing("keep", out.uid, out.op, snapshot=True)
        return conn.inflight

    def send_failed(self, conn: ZdsConn, error: str) -> list[Settle]:
        """The in-flight request could not be sent (its netns is gone): settle it as an error ack."""
        return self.acked(conn, error, counted=False)

    def acked(self, conn: ZdsConn, error: str, *, counted: bool = True) -> list[Settle]:
        """conn's in-flight request was answered; returns the futures to settle (outside the lock)."""
        what, conn.inflight = conn.inflight, None
        if what is None:
            return []
        if counted:
            self.acks += 1
            self.nacks += bool(error)
        if what.kind == "snapshot_sent":
            conn.snapshot_acked = True
            # removals issued before the snapshot was built are fulfilled by their absence from it
            hit = self.snapshot_answered(what.op)
        elif what.kind == "keep":
            return []  # a keep settles nothing
        else:
            hit = self.answered(what.uid, what.op, "add" if what.kind == "add" else "delete")
        return [(w.future, ZdsNack(error) if error else None) for w in hit]

    def stop(self) -> list[futures.Future[None]]:
        """Every waiting future (the server fails them)."""
        failed = self.drain()
        for c in list(self.conns):
            self.closed(c)
        return failed

    @staticmethod
    def _superseded(uid: str, keep: OpKind, gone: list[Waiter]) -> list[Settle]:
        return [(w.future, ZdsSuperseded(f"workload {uid}: a later {keep} replaced this operation")) for w in gone]
