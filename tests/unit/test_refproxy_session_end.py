"""The reference proxy survives an agent whose stream ends while a workload is being applied (an agent
SIGKILLed mid-storm): the ack's write then finds the RPC finished (grpc raises InvalidStateError, not an
RpcError), which is a lost session like any other: the proxy dials again instead of exiting."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc.aio
from node_agent.protocol.proto_gen import node_proxy_pb2 as pb
from node_agent.protocol.proto_gen import node_proxy_pb2_grpc as pb_grpc
from node_agent.refproxy.agent_session import AgentSession


class SlowTable:
    """A workload table whose add outlasts the agent's stream."""

    def __init__(self) -> None:
        self.adds = 0

    def begin_snapshot(self) -> None:
        pass

    async def add(self, workload: Any) -> None:
        self.adds += 1
        await asyncio.sleep(0.3)


class EndingAgent:
    """Greets, sends one add, and ends the stream at once; counts the sessions (a duck-typed servicer)."""

    def __init__(self) -> None:
        self.sessions = 0

    async def Session(self, request_iterator: Any, context: Any) -> Any:  # the generated servicer name
        self.sessions += 1
        await request_iterator.__anext__()  # Hello
        yield pb.AgentMessage(seq=0, hello_reply=pb.HelloReply(protocol_version=1, agent_id="a"))
        yield pb.AgentMessage(seq=1, add=pb.WorkloadAdd(workload=pb.Workload(uid="u1", name="p", namespace="n")))


def test_an_ack_after_the_stream_ended_is_a_lost_session_not_an_exit(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"

    async def scenario() -> tuple[int, int, bool]:
        server = grpc.aio.server()
        agent = EndingAgent()
        pb_grpc.add_NodeProxyServicer_to_server(agent, server)
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        table = SlowTable()
        session = AgentSession(str(sock), "proxy-1", table)  # type: ignore[arg-type]
        task = asyncio.create_task(session.run_forever())
        try:
            for _ in range(100):  # a second session: the first one's failed write did not end the proxy
                await asyncio.sleep(0.05)
                if agent.sessions >= 2 or task.done():
                    break
            return agent.sessions, table.adds, task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(None)

    sessions, adds, ended = asyncio.run(scenario())
    assert not ended and sessions >= 2 and adds >= 1
