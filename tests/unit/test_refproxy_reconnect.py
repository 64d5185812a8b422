"""The reference proxy redials as soon as the agent's socket file is a new one, not after its backoff."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from node_agent.refproxy.reconnect import BACKOFF_MAX, next_backoff, socket_identity, wait_before_redial


def bind(path: Path) -> socket.socket:
    tmp = path.with_name(path.name + ".tmp")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp))
    os.replace(tmp, path)  # as the agent does: a new inode at the same path
    return s


def test_a_new_socket_ends_the_wait(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    old = bind(path)
    lost_at = socket_identity(str(path))

    async def scenario() -> float:
        async def restart() -> socket.socket:
            await asyncio.sleep(0.2)
            return bind(path)

        t0 = time.monotonic()
        new_task = asyncio.create_task(restart())
        await wait_before_redial(str(path), 5.0, lost_at)
        took = time.monotonic() - t0
        (await new_task).close()
        return took

    try:
        took = asyncio.run(scenario())
    finally:
        old.close()
    assert 0.15 < took < 1.0, took


def test_no_change_waits_the_backoff_and_it_doubles_to_a_cap(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    t0 = time.monotonic()
    asyncio.run(wait_before_redial(str(path), 0.3, socket_identity(str(path))))
    assert time.monotonic() - t0 >= 0.29
    b = 0.1
    for _ in range(20):
        b = next_backoff(b)
    assert b == BACKOFF_MAX
