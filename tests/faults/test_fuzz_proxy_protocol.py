"""Property-based fuzzing of the node-proxy protocol (node_agent/protocol/ and the gRPC messages'
conversion):

- `WorkloadInfo` -> protobuf -> bytes -> protobuf -> `WorkloadInfo` is the identity for any workload
  (any text, any IPs, any 64-bit inode);
- arbitrary bytes as an `AgentMessage`: either a DecodeError or a message that the reference proxy's
  session applies without raising, answering an Ack text (its workload table refuses to open netns here);
- the SCM_RIGHTS side channel (`NetnsFdServer`) answers any request line with exactly one JSON object
  and never passes an fd for an unknown workload.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from node_agent.protocol import fd_channel
from node_agent.protocol.convert import workload_from_pb, workload_to_pb
from node_agent.protocol.proto_gen import node_proxy_pb2 as pb
from node_agent.protocol.workload import WorkloadInfo
from node_agent.refproxy.agent_session import AgentSession
from node_agent.refproxy.workloads import WorkloadError, WorkloadTable

from tests.faults.plugin_inputs import FUZZ

pytestmark = pytest.mark.faults

ROUNDTRIP_CASES = 600
MESSAGE_CASES = 600
SIDE_CHANNEL_CASES = 400

text = st.text(max_size=40)
workloads = st.builds(
    WorkloadInfo,
    uid=text, name=text, namespace=text, service_account=text,
    ips=st.lists(st.ip_addresses().map(str) | text, max_size=4).map(tuple),
    netns_path=text, netns_inode=st.integers(0, 2**64 - 1), node=text,
)


def test_fuzz_workload_roundtrip() -> None:
    @settings(FUZZ, max_examples=ROUNDTRIP_CASES)
    @given(w=workloads, snapshot=st.booleans(), seq=st.integers(0, 2**64 - 1))
    def case(w: WorkloadInfo, snapshot: bool, seq: int) -> None:
        msg = pb.AgentMessage(seq=seq, add=pb.WorkloadAdd(workload=workload_to_pb(w), snapshot=snapshot))
        back = pb.AgentMessage.FromString(msg.SerializeToString())
        assert back.seq == seq and back.add.snapshot == snapshot
        assert workload_from_pb(back.add.workload) == w

    case()


async def refuse(info: WorkloadInfo) -> int:
    raise WorkloadError(f"no netns here for {info.uid[:20]!r}")


def agent_message(seq: int, kind: str, w: WorkloadInfo, uid: str, count: int) -> bytes:
    msg = pb.AgentMessage(seq=seq)
    if kind == "add":
        msg.add.workload.CopyFrom(workload_to_pb(w))
    elif kind == "delete":
        msg.delete.uid = uid
    elif kind == "done":
        msg.snapshot_complete.count = count
    elif kind == "hello":
        msg.hello_reply.protocol_version = count
    return msg.SerializeToString()


def agent_messages() -> st.SearchStrategy[bytes]:
    valid = st.builds(agent_message, st.integers(0, 2**64 - 1),
                      st.sampled_from(["add", "delete", "done", "hello", "none"]), workloads, text,
                      st.integers(0, 2**32 - 1))
    return st.one_of(valid, st.binary(max_size=200), valid.flatmap(
        lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda i: b[:i] + bytes([b[i] ^ 0x5A]) + b[i + 1:]
                                                         if b else b)))


def test_fuzz_agent_messages_at_the_proxy() -> None:
    table = WorkloadTable(lambda record: None, opener=refuse)
    session = AgentSession("/nonexistent.sock", "fuzz", table)
    tally = {"cases": 0, "decoded": 0, "acked_ok": 0, "acked_error": 0}

    @settings(FUZZ, max_examples=MESSAGE_CASES)
    @given(raw=agent_messages())
    def case(raw: bytes) -> None:
        tally["cases"] += 1
        try:
            msg = pb.AgentMessage.FromString(raw)
        except DecodeError:
            return
        tally["decoded"] += 1
        table.begin_snapshot()
        error = asyncio.run(session._apply(msg))
        assert isinstance(error, str)
        tally["acked_error" if error else "acked_ok"] += 1
        assert "Error:" not in error or "WorkloadError" in error, error  # never a crash of the proxy

    case()
    assert table.uids() == []  # nothing was ever opened
    print(f"\nproxy protocol messages: {json.dumps(tally)}")


def test_fuzz_netns_fd_side_channel() -> None:
    known = WorkloadInfo("known", "web", "app", netns_path="/nonexistent/netns", netns_inode=1)
    server = fd_channel.NetnsFdServer("/unused", lambda uid: known if uid == "known" else None)
    tally = {"cases": 0, "refused": 0}

    @settings(FUZZ, max_examples=SIDE_CHANNEL_CASES)
    @given(line=st.one_of(
        st.builds(lambda o: json.dumps(o).encode(), st.fixed_dictionaries({}, optional={
            "v": st.sampled_from([1, 2, "1", None]), "uid": st.sampled_from(["known", "x", "", 5, None])})),
        st.binary(max_size=200),
        st.integers(1, 4000).map(lambda n: b"[" * n),
    ))
    def case(line: bytes) -> None:
        a, b = socket.socketpair()
        with a, b:
            server._answer(a, line)
            data, fds, _, _ = socket.recv_fds(b, 65536, 1)
            assert fds == [], "an fd was passed for a request that named no usable workload"
            reply: Any = json.loads(data)
            assert data.endswith(b"\n") and reply["ok"] is False and isinstance(reply["error"], str)
        tally["cases"] += 1
        tally["refused"] += 1

    case()
    assert server.stats.served == 0
    print(f"\nnetns fd side channel: {json.dumps(tally)}")


@pytest.mark.parametrize("path", ["/proc/self/ns/net", "/proc/1/ns/net", "/proc/self/ns/uts", "/etc/hostname", "/"])
def test_the_proxy_never_enters_its_own_or_a_non_pod_netns(path: str) -> None:
    """Found by the message fuzzing: a workload with inode 0 (unchecked) and the proxy's own netns as its
    path made the reference proxy open its listeners there. Refused now, nothing opened."""
    from cni.kernel.netns import NetnsFileError, pod_netns_inode

    with pytest.raises(NetnsFileError):  # guard: the check refuses it before the table is asked
        pod_netns_inode(path, "proxy")
    table = WorkloadTable(lambda record: None)
    with pytest.raises(WorkloadError, match=r"refused|is gone"):
        asyncio.run(table.add(WorkloadInfo("u1", "web", "app", netns_path=path, netns_inode=0)))
    assert table.uids() == []
