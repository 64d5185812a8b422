"""What a node-proxy transport keeps between the agent's operations and the proxy's acks (pure: no
sockets, threads or clock; the gRPC hub and the ZDS server each hold one under their lock).

- The desired workload set, each uid's latest operation (numbered in issue order) and the futures waiting
  for an ack (`Waiter`s).
- An upsert or remove of a uid supersedes that uid's waiters of the other kind (returned: the transport
  fails them as superseded).
- An ack of a uid's latest operation settles its waiters of that kind issued up to it; an ack of an older
  one settles nothing (it was superseded).
- A snapshot's ack settles the removals issued before the snapshot was built (it omits those uids).
- A waiter whose future its caller cancelled is forgotten (`forget`). A fan-out over transports cancels
  the others' futures once one has answered: a transport no proxy ever connects to (ZDS on a node whose
  proxy speaks gRPC, or the other way round) keeps no waiter, and no operation number, for every pod ever
  enrolled and removed.
"""

from __future__ import annotations

import itertools
import threading
from concurrent import futures

from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.hub_session import OpKind, Waiter


class AckBook:
    def __init__(self) -> None:
        self.desired: dict[str, WorkloadInfo] = {}
        self.latest_op: dict[str, int] = {}
        self.waiters: dict[str, list[Waiter]] = {}
        self._ops = itertools.count(1)
        self.op_now = 0  # the latest operation's number (a snapshot built now reflects every one up to it)

    def issue(self, uid: str, kind: OpKind, fut: futures.Future[None],
              workload: WorkloadInfo | None = None) -> tuple[int, list[Waiter]]:
        """An upsert ("add", with its workload) or a removal ("delete") of uid: its operation number, and the
        waiters it superseded."""
        self.op_now = op = next(self._ops)
        if kind == "add":
            assert workload is not None
            self.desired[uid] = workload
        else:
            self.desired.pop(uid, None)
        self.latest_op[uid] = op
        ws = self.waiters.get(uid, [])
        gone = [w for w in ws if w.kind != kind]
        self.waiters[uid] = [*(w for w in ws if w.kind == kind), Waiter(op, kind, fut)]
        return op, gone

    def answered(self, uid: str, op: int, kind: OpKind) -> list[Waiter]:
        """The proxy acked operation `op` of uid: the waiters it settles (dropped here)."""
        if self.latest_op.get(uid) != op:
            return []
        hit = [w for w in self.waiters.get(uid, []) if w.kind == kind and w.op <= op]
        self._drop(uid, hit)
        if kind == "delete" and uid not in self.desired:
            self.latest_op.pop(uid, None)
        return hit

    def snapshot_answered(self, op: int) -> list[Waiter]:
        """The proxy acked a snapshot built at operation `op`: the removals it settles (dropped here)."""
        out: list[Waiter] = []
        for uid, ws in list(self.waiters.items()):
            if uid in self.desired:
                continue
            covered = [w for w in ws if w.kind == "delete" and w.op <= op]
            out += covered
            self._drop(uid, covered)
        for uid in [u for u, last in self.latest_op.items()
                    if last <= op and u not in self.desired and u not in self.waiters]:
            del self.latest_op[uid]
        return out

    def forget(self, uid: str, fut: futures.Future[None]) -> None:
        """Its caller no longer waits for `fut` (cancelled it): drop its waiter, and uid's operation number
        once the uid is neither desired nor waited for."""
        self._drop(uid, [w for w in self.waiters.get(uid, []) if w.future is fut])
        if uid not in self.desired and uid not in self.waiters:
            self.latest_op.pop(uid, None)

    def pending(self) -> int:
        return sum(len(ws) for ws in self.waiters.values())

    def drain(self) -> list[futures.Future[None]]:
        """Every waiting future, the waiters cleared (the transport stops and fails them)."""
        out = [w.future for ws in self.waiters.values() for w in ws]
        self.waiters.clear()
        return out

    def _drop(self, uid: str, gone: list[Waiter]) -> None:
        if not gone:
            return
        rest = [w for w in self.waiters.get(uid, []) if w not in gone]
        if rest:
            self.waiters[uid] = rest
        else:
            self.waiters.pop(uid, None)


def forget_when_cancelled(fut: futures.Future[None], uid: str, book: AckBook,
                          lock: threading.Lock | threading.RLock) -> None:
    """`book.forget(uid, fut)`, under the transport's lock, once fut's caller cancels it."""
    def done(f: futures.Future[None]) -> None:
        if f.cancelled():
            with lock:
                book.forget(uid, f)

    fut.add_done_callback(done)
