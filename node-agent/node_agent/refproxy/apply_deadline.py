"""A bound on how long the proxy spends applying one message from the agent: a stuck apply becomes an
error ack (the agent fails the pod closed and retries it) instead of a session that never acks again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from node_agent.refproxy.logs import event

APPLY_TIMEOUT = 10.0  # one message's apply; then it is acked with an error (the agent retries the pod)


async def bounded_apply(apply: Awaitable[str], kind: str | None) -> str:
    """The apply's ack text, or an error text when it did not finish within APPLY_TIMEOUT (cancelled: a
    workload half set up closes its listeners)."""
    try:
        return await asyncio.wait_for(apply, APPLY_TIMEOUT)
    except TimeoutError:
        event(logging.ERROR, "apply_timeout", kind=kind, seconds=APPLY_TIMEOUT)
        return f"{kind} not applied within {APPLY_TIMEOUT:g}s"
