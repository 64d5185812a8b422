"""When the reference proxy dials the agent again after losing it: backoff, cut short by a new socket.

An agent that restarts binds a new socket file at the same path (a new inode). Waiting out a doubling
backoff would leave the proxy without a session for up to the backoff after the agent is back (and
restart convergence waits for the proxy's acks): so the wait also watches the socket path (a stat every
`POLL` seconds, nothing else) and ends as soon as the file there is a different one than when the
session was lost (or appears). The backoff still doubles for an agent that keeps refusing or failing.
"""

from __future__ import annotations

import asyncio
import os
import time

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
POLL = 0.05


def socket_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at path; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def wait_before_redial(path: str, backoff: float, lost_at: tuple[int, int] | None) -> None:
    """Sleep `backoff` seconds, or less when the socket file at path changed since `lost_at`."""
    end = time.monotonic() + backoff
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(POLL, left))
        now = socket_identity(path)
        if now is not None and now != lost_at:
            return


def next_backoff(backoff: float) -> float:
    return min(backoff * 2, BACKOFF_MAX)
