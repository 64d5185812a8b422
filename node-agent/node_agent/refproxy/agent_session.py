"""The proxy's side of the node-proxy protocol: dial the agent, say Hello, apply and ack, reconnect."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import grpc.aio

from node_agent.protocol.convert import PROTOCOL_VERSION, workload_from_pb
from node_agent.protocol.proto_gen import node_proxy_pb2 as pb
from node_agent.protocol.proto_gen import node_proxy_pb2_grpc as pb_grpc
from node_agent.refproxy.apply_deadline import bounded_apply
from node_agent.refproxy.logs import event
from node_agent.refproxy.reconnect import BACKOFF_MIN, next_backoff, socket_identity, wait_before_redial
from node_agent.refproxy.workloads import WorkloadError, WorkloadTable


class ProtocolError(Exception):
    pass


class AgentSession:
    def __init__(self, socket_path: str, proxy_id: str, table: WorkloadTable, *, wants_netns_fd: bool = False,
                 protocol_version: int = PROTOCOL_VERSION) -> None:
        self.socket_path = socket_path
        self.proxy_id = proxy_id
        self.table = table
        self.wants_netns_fd = wants_netns_fd
        self.protocol_version = protocol_version
        self.netns_fd_socket = ""  # announced by the agent in HelloReply
        self.sessions = 0
        self.connected = asyncio.Event()
        self.snapshot_done = asyncio.Event()

    async def run_forever(self) -> None:
        """Serve sessions until cancelled; the workloads' listeners survive agent restarts."""
        backoff = BACKOFF_MIN
        while True:
            greeted = False
            lost_at = socket_identity(self.socket_path)  # the agent's socket this attempt dials
            try:
                greeted = await self.run_once()
                reason = "agent closed the stream"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
                greeted = greeted or self.connected.is_set()
            except asyncio.InvalidStateError as exc:  # an ack written after the agent's stream ended (killed)
                reason = f"agent's stream ended before our write: {exc}"
                greeted = greeted or self.connected.is_set()
            except (OSError, ProtocolError) as exc:
                reason = str(exc)
            finally:
                self.connected.clear()
            if greeted:
                backoff = BACKOFF_MIN
            event(logging.WARNING, "agent_session_lost", reason=reason, retry_in=round(backoff, 2),
                  socket=self.socket_path)
            await wait_before_redial(self.socket_path, backoff, lost_at)
            backoff = next_backoff(backoff)

    async def run_once(self) -> bool:
        """One session; returns True when the agent greeted us (then the stream ended normally)."""
        async with grpc.aio.insecure_channel(f"unix:{self.socket_path}") as channel:
            call: Any = pb_grpc.NodeProxyStub(channel).Session()
            try:
                await call.write(pb.ProxyMessage(hello=pb.Hello(
                    protocol_version=self.protocol_version, proxy_id=self.proxy_id,
                    wants_netns_fd=self.wants_netns_fd)))
                first = await call.read()
                if first is grpc.aio.EOF:
                    raise ProtocolError("agent closed the stream before HelloReply")
                if first.WhichOneof("msg") != "hello_reply":
                    raise ProtocolError(f"expected hello_reply, got {first.WhichOneof('msg')}")
                reply = first.hello_reply
                self.netns_fd_socket = reply.netns_fd_socket
                self.sessions += 1
                self.snapshot_done.clear()
                self.connected.set()
                event(logging.INFO, "agent_connected", agent_id=reply.agent_id,
                      protocol_version=reply.protocol_version, netns_fd_socket=reply.netns_fd_socket)
                self.table.begin_snapshot()
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        return True
                    error = await bounded_apply(self._apply(msg), msg.WhichOneof("msg"))
                    await call.write(pb.ProxyMessage(ack=pb.Ack(seq=msg.seq, error=error)))
            finally:
                call.cancel()

    async def _apply(self, msg: Any) -> str:
        kind = msg.WhichOneof("msg")
        try:
            if kind == "add":
                await self.table.add(workload_from_pb(msg.add.workload))
            elif kind == "delete":
                self.table.delete(msg.delete.uid)
            elif kind == "snapshot_complete":
                stale = self.table.finish_snapshot()
                self.snapshot_done.set()
                event(logging.INFO, "snapshot_applied", count=msg.snapshot_complete.count, dropped=stale)
            else:
                return f"unexpected message {kind!r}"
        except WorkloadError as exc:
            event(logging.WARNING, "apply_failed", kind=kind, seq=msg.seq, error=str(exc))
            return str(exc)
        except Exception as exc:  # the agent must hear about any failure
            event(logging.ERROR, "apply_crashed", kind=kind, seq=msg.seq, error=repr(exc))
            return f"{type(exc).__name__}: {exc}"
        return ""
