"""The proxy's workload table: per workload, listeners opened inside the pod's netns.

Listeners (both IPv4 and IPv6 where the pod has it): 15001 outbound, 15006 inbound, 15008 HBONE (accepts
and closes: this reference proxy speaks plaintext L4 only). An add is complete only when every listener
is up; a delete closes the listeners and lets open connections finish.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from cni.kernel.netns import NetnsFileError, NetnsReturnError, entered, pod_netns_inode
from node_agent.protocol.fd_channel import NetnsFdError, fetch_netns_fd, open_verified_netns
from node_agent.protocol.workload import WorkloadInfo
from node_agent.refproxy.forward import Emit, relay
from node_agent.refproxy.logs import event
from node_agent.refproxy.netns_worker import NetnsWorker
from node_agent.refproxy.sockets import (
    HBONE_PORT,
    INBOUND_PORT,
    OUTBOUND_PORT,
    Listeners,
    make_listeners,
    make_upstream,
)

LISTENERS: tuple[tuple[int, str], ...] = (
    (OUTBOUND_PORT, "outbound"),
    (INBOUND_PORT, "inbound"),
    (HBONE_PORT, "hbone"),
)

# uid, WorkloadInfo -> an fd of the workload's netns (already checked against the inode)
NetnsOpener = Callable[[WorkloadInfo], Awaitable[int]]


class WorkloadError(Exception):
    """Why an add failed; its text goes back to the agent in the Ack."""


def check_netns(info: WorkloadInfo) -> None:
    """The pinned netns must exist, be a pod's network namespace (not the proxy's own, not the host's, not
    a plain file) and still be the namespace the agent told us about."""
    if not info.netns_path:
        raise WorkloadError(f"workload {info.uid} has no netns path")
    try:
        ino = pod_netns_inode(info.netns_path, "proxy")
    except NetnsFileError as exc:
        why = "is gone" if exc.gone else "refused"
        raise WorkloadError(f"netns {info.netns_path} {why}: {exc.msg}") from exc
    if info.netns_inode and ino != info.netns_inode:
        raise WorkloadError(f"netns {info.netns_path} has inode {ino}, the agent said {info.netns_inode}")


async def open_by_path(info: WorkloadInfo) -> int:
    check_netns(info)
    try:
        return open_verified_netns(info.netns_path, info.netns_inode)
    except NetnsFdError as exc:
        raise WorkloadError(str(exc)) from exc


def side_channel_opener(get_socket: Callable[[], str]) -> NetnsOpener:
    """Fetch the netns fd over the agent's SCM_RIGHTS side channel (path announced in HelloReply)."""

    async def opener(info: WorkloadInfo) -> int:
        path = get_socket()
        if not path:
            raise WorkloadError("the agent announced no netns fd side channel")
        try:
            fd, inode = await asyncio.to_thread(fetch_netns_fd, path, info.uid)
        except (OSError, NetnsFdError) as exc:
            raise WorkloadError(f"netns fd for {info.uid}: {exc}") from exc
        if info.netns_inode and inode != info.netns_inode:
            os.close(fd)
            raise WorkloadError(f"netns fd for {info.uid} has inode {inode}, the agent said {info.netns_inode}")
        return fd

    return opener


class WorkloadProxy:
    def __init__(self, info: WorkloadInfo, emit: Emit, *, orig_src: bool = False) -> None:
        self.info = info
        self.orig_src = orig_src
        self._emit = emit
        self._netns_fd = -1  # the pod netns, owned until handed to the worker (made at the first upstream dial)
        self._worker: NetnsWorker | None = None
        self._listening: list[tuple[asyncio.Server, socket.socket, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self.closing = False

    @property
    def label(self) -> str:
        return f"{self.info.namespace}/{self.info.name}"

    async def start(self, netns_fd: int) -> None:
        """Every listener up (owns `netns_fd` from here on)."""
        self._netns_fd = netns_fd
        made: Listeners = []
        try:
            made = listeners_in(netns_fd, [port for port, _ in LISTENERS])
            usable = self._usable(made)
            direction_of = dict(LISTENERS)
            for port, lsock in usable:
                handler = functools.partial(self._on_connection, direction_of[port])
                server = await asyncio.start_server(handler, sock=lsock)
                self._listening.append((server, lsock, direction_of[port]))
        except BaseException:
            serving = {id(lsock) for _, lsock, _ in self._listening}
            for _, _, result in made:  # those not serving yet; close() stops the rest
                if isinstance(result, socket.socket) and id(result) not in serving:
                    result.close()
            self.close(grace=0)
            raise

    def _usable(self, made: Listeners) -> list[tuple[int, socket.socket]]:
        """The listeners made; IPv6 missing in the pod is logged and skipped, any other refusal is the add's
        error (WorkloadError naming the port)."""
        for port, family, result in made:
            if not isinstance(result, OSError):
                continue
            if family == socket.AF_INET6 and result.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                event(logging.INFO, "ipv6_unavailable", workload=self.label, port=port)
                continue
            raise WorkloadError(f"listen on port {port} in {self.info.netns_path}: {result.strerror}") from result
        return [(port, result) for port, _, result in made if isinstance(result, socket.socket)]

    async def _upstream(self, family: socket.AddressFamily, source: str | None = None) -> socket.socket:
        """An upstream socket made inside the pod netns by the workload's own thread (started at the first
        dial; it stays there until the workload is closed and its last connection ended)."""
        if self._worker is None:
            if self._netns_fd < 0:
                raise RuntimeError("workload is closed")
            self._worker, self._netns_fd = NetnsWorker(self._netns_fd, self.info.uid[:12]), -1
        return await asyncio.wrap_future(self._worker.submit(functools.partial(make_upstream, family, source)))

    async def _on_connection(self, direction: str, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        # Python 3.11's start_server keeps no strong reference to this handler's task, and a stream's
        # protocol holds its reader only weakly: without this reference a garbage collection can destroy
        # the task mid-relay (closing both sockets; "Task was destroyed but it is pending!").
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.active += 1
        await self._serve(direction, reader, writer)

    async def _serve(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Runs with self.active already counting this connection."""
        try:
            if direction == "hbone":
                writer.close()  # the reference proxy does not terminate HBONE
                return
            await relay(reader, writer, direction=direction, workload=self.label,
                        make_upstream=self._upstream, emit=self._emit, orig_src=self.orig_src)
        finally:
            self.active -= 1
            if self.closing and self.active == 0:
                self._stop_worker()

    async def _serve_drained(self, direction: str, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            self.active -= 1
            return
        await self._serve(direction, reader, writer)

    def close(self, grace: float = 1.0) -> None:
        """Stop accepting; connections already open (or already queued on a listener) finish on their own.

        The netns worker (needed to dial upstream) stays until the last connection ends; with no
        connection it stops after `grace` seconds, covering connections asyncio accepted but whose
        handler has not started yet.
        """
        self.closing = True
        loop = asyncio.get_running_loop()
        for server, lsock, direction in self._listening:
            # the client already completed its handshake for connections in the accept queue: serve them
            # rather than letting close() reset them
            while True:
                try:
                    conn, _ = lsock.accept()
                except OSError:  # BlockingIOError: queue empty
                    break
                conn.setblocking(False)
                self.active += 1
                task = loop.create_task(self._serve_drained(direction, conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            server.close()
        self._listening.clear()
        if self.active == 0:
            if grace > 0:
                loop.call_later(grace, self._stop_if_idle)
            else:
                self._stop_worker()

    def _stop_if_idle(self) -> None:
        if self.active == 0:
            self._stop_worker()

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._netns_fd >= 0:
            os.close(self._netns_fd)
            self._netns_fd = -1


def listeners_in(netns_fd: int, ports: list[int]) -> Listeners:
    """`make_listeners` run by the calling thread (the event loop's) inside the pod netns and back: a few
    syscalls, no hop to another thread. A thread that cannot come back must not go on serving (its next
    sockets would be made in the pod): the process exits and is restarted."""
    try:
        with entered(netns_fd):
            return make_listeners(ports)
    except NetnsReturnError as exc:
        event(logging.CRITICAL, "netns_return_failed", error=str(exc))
        os._exit(70)


class WorkloadTable:
    def __init__(self, emit: Emit, opener: NetnsOpener = open_by_path, *, orig_src: bool = False) -> None:
        self._emit = emit
        self.orig_src = orig_src  # inbound to the app from the client's own address
        self._opener = opener
        self._by_uid: dict[str, WorkloadProxy] = {}
        self._seen: set[str] | None = None

    def __contains__(self, uid: str) -> bool:
        return uid in self._by_uid

    def uids(self) -> list[str]:
        return list(self._by_uid)

    def begin_snapshot(self) -> None:
        self._seen = set()

    def finish_snapshot(self) -> list[str]:
        """Drop every workload the snapshot did not mention; returns their uids."""
        seen, self._seen = self._seen or set(), None
        stale = [uid for uid in self.uids() if uid not in seen]
        for uid in stale:
            self.delete(uid)
        return stale

    def mark_seen(self, uid: str) -> None:
        """Record that the snapshot in progress (if any) mentions uid."""
        if self._seen is not None:
            self._seen.add(uid)

    async def add(self, info: WorkloadInfo) -> None:
        self.mark_seen(info.uid)
        existing = self._by_uid.get(info.uid)
        try:
            if info.netns_path:
                check_netns(info)
        except WorkloadError:
            if existing is not None:
                self.delete(info.uid)
            raise
        if existing is not None:
            if (existing.info.netns_path, existing.info.netns_inode) == (info.netns_path, info.netns_inode):
                existing.info = info  # same netns: keep the listeners, refresh the metadata
                event(logging.INFO, "workload_updated", uid=info.uid, workload=existing.label)
                return
            self.delete(info.uid)
        fd = await self._opener(info)
        wp = WorkloadProxy(info, self._emit, orig_src=self.orig_src)
        try:
            await wp.start(fd)
        except WorkloadError:
            raise
        except OSError as exc:
            raise WorkloadError(f"workload {info.uid}: {exc}") from exc
        self._by_uid[info.uid] = wp
        event(logging.INFO, "workload_added", uid=info.uid, workload=wp.label, netns=info.netns_path,
              inode=info.netns_inode)

    def delete(self, uid: str, grace: float = 1.0) -> bool:
        wp = self._by_uid.pop(uid, None)
        if wp is None:
            return False
        wp.close(grace)
        event(logging.INFO, "workload_deleted", uid=uid, workload=wp.label, open_connections=wp.active)
        return True

    def close_all(self) -> None:
        for uid in list(self._by_uid):
            self.delete(uid, grace=0)

    def status(self) -> dict[str, Any]:
        return {uid: {"workload": wp.label, "active": wp.active} for uid, wp in self._by_uid.items()}
