"""Entry point of the reference proxy: run the agent session until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from node_agent.refproxy import logs
from node_agent.refproxy.agent_session import AgentSession
from node_agent.refproxy.forward import Emit
from node_agent.refproxy.workloads import WorkloadTable, open_by_path, side_channel_opener
from node_agent.refproxy.zds_session import ReceivedFds, ZdsSession


def stdout_emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def default_proxy_id() -> str:
    return f"refproxy-{socket.gethostname()}-{os.getpid()}"


def build(
    socket_path: str, proxy_id: str, netns_fd: bool, emit: Emit = stdout_emit, *, orig_src: bool = False
) -> AgentSession:
    session: AgentSession
    opener = side_channel_opener(lambda: session.netns_fd_socket) if netns_fd else open_by_path
    table = WorkloadTable(emit, opener, orig_src=orig_src)
    session = AgentSession(socket_path, proxy_id, table, wants_netns_fd=netns_fd)
    return session


def build_zds(
    socket_path: str, proxy_id: str, emit: Emit = stdout_emit, *, orig_src: bool = False
) -> ZdsSession:
    """ztunnel's role over ZDS: every add brings the pod's netns as an fd."""
    fds = ReceivedFds()
    return ZdsSession(socket_path, proxy_id, WorkloadTable(emit, fds.opener, orig_src=orig_src), fds)


async def serve(session: AgentSession | ZdsSession) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    logs.event(logging.INFO, "proxy_started", proxy_id=session.proxy_id, socket=session.socket_path,
               netns_fd=session.wants_netns_fd)
    try:
        await session.run_forever()
    except asyncio.CancelledError:
        logs.event(logging.INFO, "proxy_stopping")
    finally:
        session.table.close_all()


def run(
    socket_path: str,
    proxy_id: str | None,
    netns_fd: bool,
    log_level: str,
    protocol: str = "grpc",
    *,
    orig_src: bool = False,
) -> int:
    logs.setup(log_level)
    pid = proxy_id or default_proxy_id()
    session = (
        build_zds(socket_path, pid, orig_src=orig_src)
        if protocol == "zds"
        else build(socket_path, pid, netns_fd, orig_src=orig_src)
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(session))
    return 0
