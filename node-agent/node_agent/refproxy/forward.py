"""One proxied TCP connection: find the original destination, dial it, pump bytes, emit one JSON line.

Byte counts are from the client's point of view: `bytes_sent` is what the client sent (client -> upstream),
`bytes_received` is what the client received (upstream -> client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from node_agent.refproxy.logs import event
from node_agent.refproxy.sockets import format_addr, original_dst

Emit = Callable[[dict[str, Any]], None]
# (family, source address to bind transparently or None) -> an unconnected upstream socket in the pod netns
UpstreamFactory = Callable[[socket.AddressFamily, str | None], Awaitable[socket.socket]]

CHUNK = 65536


@dataclass
class _Count:
    n: int = 0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: _Count) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        count.n += len(data)
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()  # half-close: the other side sees EOF, the reverse direction keeps flowing


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2)


async def relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    *,
    direction: str,
    workload: str,
    make_upstream: UpstreamFactory,
    emit: Emit,
    connect_timeout: float = 10.0,
    orig_src: bool = False,
) -> None:
    """Serve one accepted client connection to its original destination; emit its JSON line at the end.
    `orig_src`: inbound connections dial the app from the client's own address (ztunnel's ENABLE_ORIG_SRC)."""
    sock = client_writer.get_extra_info("socket")
    peer = client_writer.get_extra_info("peername")
    src = format_addr(str(peer[0]), int(peer[1])) if peer else "?"
    try:
        ip, port = original_dst(sock)
    except (OSError, ValueError) as exc:
        # not a redirected connection (someone dialled the proxy port directly): nothing to forward to
        event(logging.WARNING, "no_original_dst", direction=direction, workload=workload, src=src, error=str(exc))
        await _close(client_writer)
        return
    local = sock.getsockname()
    if (ip, port) == (str(local[0]), int(local[1])):
        # the original destination is this listener (conntrack gave the connection another source port, so
        # the eBPF lookup missed): dialling it would loop back here, one connection after another
        event(logging.WARNING, "original_dst_is_the_proxy", direction=direction, workload=workload, src=src,
              dst=format_addr(ip, port))
        await _close(client_writer)
        return
    record: dict[str, Any] = {
        "direction": direction,
        "workload": workload,
        "src": src,
        "dst": format_addr(ip, port),
        "bytes_sent": 0,
        "bytes_received": 0,
    }
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    up_sock: socket.socket | None = None
    try:
        source = str(peer[0]) if orig_src and direction == "inbound" and peer else None
        up_sock = await make_upstream(family, source)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(up_sock, (ip, port)), connect_timeout)
        up_reader, up_writer = await asyncio.open_connection(sock=up_sock)
    except (TimeoutError, OSError, RuntimeError) as exc:
        if up_sock is not None:
            up_sock.close()
        record["error"] = f"connect {record['dst']}: {exc or type(exc).__name__}"
        event(logging.WARNING, "upstream_connect_failed", **record)
        await _close(client_writer)
        emit(record)
        return
    sent, received = _Count(), _Count()

    async def guarded(coro: Awaitable[None]) -> None:
        try:
            await coro
        except (OSError, RuntimeError) as exc:
            # a reset on one side ends both: abort the transports so the other pump wakes up
            record.setdefault("error", str(exc) or type(exc).__name__)
            for w in (client_writer, up_writer):
                w.transport.abort()

    await asyncio.gather(
        guarded(_pump(client_reader, up_writer, sent)),
        guarded(_pump(up_reader, client_writer, received)),
    )
    await _close(up_writer)
    await _close(client_writer)
    record["bytes_sent"] = sent.n
    record["bytes_received"] = received.n
    event(logging.DEBUG, "connection_finished", **record)
    emit(record)
