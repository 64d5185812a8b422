"""The hub's bookkeeping of one proxy session and of the futures waiting for acks (plain data)."""

from __future__ import annotations

import queue
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Literal

OpKind = Literal["add", "delete"]


@dataclass
class Waiter:
    """A caller's future for the latest operation ``op`` on one uid."""

    op: int
    kind: OpKind
    future: futures.Future[None]


@dataclass
class Inflight:
    """A message sent on a session and not acked yet."""

    kind: Literal["add", "delete", "snapshot_complete"]
    uid: str
    op: int
    sent: float = field(default_factory=time.monotonic)


@dataclass
class Session:
    number: int
    proxy_id: str
    wants_netns_fd: bool
    out: queue.Queue[Any] = field(default_factory=queue.Queue)  # AgentMessage or None (end)
    inflight: dict[int, Inflight] = field(default_factory=dict)
    next_seq: int = 1
    snapshot_watermark: int = 0  # op counter value the snapshot reflects
    snapshot_sent: bool = False  # held back until the agent's adoption is complete (SnapshotGate)
    snapshot_acked: bool = False
    closed: bool = False


def settle(fut: futures.Future[None], exc: BaseException | None) -> None:
    """Resolve a waiter's future (unless the caller cancelled it meanwhile)."""
    if fut.done():
        return
    try:
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)
    except futures.InvalidStateError:
        pass  # cancelled by the caller meanwhile


def overdue_ack(s: Session, timeout: float, now: float | None = None) -> str:
    """Why the session must end when its oldest unacked message is older than `timeout`; "" if none is."""
    if not s.inflight:
        return ""
    seq, oldest = min(s.inflight.items(), key=lambda item: item[1].sent)
    if (time.monotonic() if now is None else now) - oldest.sent <= timeout:
        return ""
    return f"no ack for seq {seq} ({oldest.kind} {oldest.uid}) within {timeout:g}s"
