"""The reference proxy as a ZDS client (ztunnel's role): dial the agent's SOCK_SEQPACKET socket, say
ZdsHello, apply each request and ack it, reconnect with backoff. Each add brings the pod's netns as an
fd (SCM_RIGHTS); the workload's listeners are opened in that netns."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from node_agent.protocol import zds_wire
from node_agent.protocol.workload import WorkloadInfo
from node_agent.refproxy.apply_deadline import bounded_apply
from node_agent.refproxy.logs import event
from node_agent.refproxy.reconnect import BACKOFF_MIN, next_backoff, socket_identity, wait_before_redial
from node_agent.refproxy.workloads import WorkloadError, WorkloadTable


class ReceivedFds:
    """The netns fds of adds being applied, handed to the workload table by uid (its NetnsOpener)."""

    def __init__(self) -> None:
        self.by_uid: dict[str, int] = {}

    async def opener(self, info: WorkloadInfo) -> int:
        fd = self.by_uid.pop(info.uid, None)
        if fd is None:
            raise WorkloadError(f"no netns fd received for {info.uid}")
        return fd

    def discard(self, uid: str) -> None:
        fd = self.by_uid.pop(uid, None)
        if fd is not None:
            os.close(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    loop = asyncio.get_running_loop()
    while True:
        try:
            return zds_wire.recv_packet(sock)
        except BlockingIOError:
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


class ZdsSession:
    def __init__(self, socket_path: str, proxy_id: str, table: WorkloadTable, fds: ReceivedFds) -> None:
        self.socket_path = socket_path
        self.proxy_id = proxy_id
        self.table = table
        self.fds = fds
        self.wants_netns_fd = True
        self.sessions = 0

    async def run_forever(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            greeted = False
            lost_at = socket_identity(self.socket_path)  # the agent's socket this attempt dials
            try:
                greeted = await self.run_once()
                reason = "agent closed the connection"
            except (OSError, zds_wire.ZdsWireError) as exc:
                reason = str(exc)
            if greeted:
                backoff = BACKOFF_MIN
            event(logging.WARNING, "agent_session_lost", reason=reason, retry_in=round(backoff, 2),
                  socket=self.socket_path, protocol="zds")
            await wait_before_redial(self.socket_path, backoff, lost_at)
            backoff = next_backoff(backoff)

    async def run_once(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self.socket_path)
            zds_wire.send_packet(sock, zds_wire.hello())
            self.sessions += 1
            event(logging.INFO, "agent_connected", protocol="zds", socket=self.socket_path)
            self.table.begin_snapshot()
            while True:
                data, fds = await _recv(sock)
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return True
                error = await bounded_apply(self._apply(data, fds), "request")
                zds_wire.send_packet(sock, zds_wire.ack(error))
        finally:
            sock.close()

    async def _apply(self, data: bytes, fds: list[int]) -> str:
        try:
            req = zds_wire.parse_request(data, len(fds))
        except zds_wire.ZdsWireError as exc:
            for fd in fds:
                os.close(fd)
            event(logging.WARNING, "apply_failed", error=str(exc))
            return str(exc)
        try:
            if req.kind == "add":
                await self._add(req, fds[0])
            elif req.kind == "keep":
                if req.uid in self.table:
                    self.table.mark_seen(req.uid)
            elif req.kind == "del":
                self.table.delete(req.uid)
            else:
                stale = self.table.finish_snapshot()
                event(logging.INFO, "snapshot_applied", protocol="zds", dropped=stale)
        except WorkloadError as exc:
            event(logging.WARNING, "apply_failed", kind=req.kind, uid=req.uid, error=str(exc))
            return str(exc)
        except Exception as exc:  # the agent must hear about any failure
            event(logging.ERROR, "apply_crashed", kind=req.kind, uid=req.uid, error=repr(exc))
            return f"{type(exc).__name__}: {exc}"
        return ""

    async def _add(self, req: zds_wire.Request, fd: int) -> None:
        if not req.uid:
            os.close(fd)
            raise WorkloadError("add without a uid")
        info = WorkloadInfo(uid=req.uid, name=req.name, namespace=req.namespace,
                            service_account=req.service_account, netns_inode=os.fstat(fd).st_ino)
        self.fds.discard(req.uid)
        self.fds.by_uid[req.uid] = fd
        try:
            await self.table.add(info)
        finally:
            self.fds.discard(req.uid)  # not taken: the workload kept its listeners (same netns)
