"""ZDS on the wire (proto/istio/zds/zds.proto): message bytes, and one packet over SOCK_SEQPACKET.

ZDS is the protocol ztunnel speaks to its node agent. One protobuf message per packet; an `add` carries
the pod's netns fd as SCM_RIGHTS, nothing else carries a descriptor. The encoders and decoders are pure
(the golden files pin their bytes); `send_packet` / `recv_packet` are the only socket calls.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass
from typing import Literal

from node_agent.protocol.proto_gen import zds_pb2 as zpb
from node_agent.protocol.workload import WorkloadInfo

ZDS_VERSION = zpb.V1
# ztunnel and istio-cni read every packet into a 1024-byte buffer: a longer one would be truncated
MAX_PACKET = 1024
DEFAULT_ZDS_SOCKET = "/var/run/ztunnel/ztunnel.sock"

RequestKind = Literal["add", "keep", "del", "snapshot_sent"]


class ZdsWireError(Exception):
    """A packet that is not valid ZDS (bad protobuf, wrong message, wrong descriptors, too long)."""


@dataclass(frozen=True)
class Request:
    """A decoded WorkloadRequest (the proxy side)."""

    kind: RequestKind
    uid: str = ""
    name: str = ""
    namespace: str = ""
    service_account: str = ""


# ---- encode ---------------------------------------------------------------------------------------------

def _checked(data: bytes) -> bytes:
    if len(data) > MAX_PACKET:
        raise ZdsWireError(f"ZDS message of {len(data)} bytes exceeds the {MAX_PACKET}-byte packet limit")
    return data


def hello(version: int = ZDS_VERSION) -> bytes:
    return _checked(zpb.ZdsHello(version=version).SerializeToString())  # type: ignore[arg-type,unused-ignore]


def add(w: WorkloadInfo) -> bytes:
    """AddWorkload: uid and the workload's name, namespace and service account (trust_domain is retired)."""
    info = zpb.WorkloadInfo(name=w.name, namespace=w.namespace, service_account=w.service_account)
    msg = zpb.WorkloadRequest(add=zpb.AddWorkload(uid=w.uid, workload_info=info))
    return _checked(msg.SerializeToString())


def keep(uid: str) -> bytes:
    return _checked(zpb.WorkloadRequest(keep=zpb.KeepWorkload(uid=uid)).SerializeToString())


def delete(uid: str) -> bytes:
    msg = zpb.WorkloadRequest()
    getattr(msg, "del").uid = uid  # `del` is a Python keyword
    if not uid:
        getattr(msg, "del").SetInParent()
    return _checked(msg.SerializeToString())


def snapshot_sent() -> bytes:
    return _checked(zpb.WorkloadRequest(snapshot_sent=zpb.SnapshotSent()).SerializeToString())


def ack(error: str = "") -> bytes:
    return _checked(zpb.WorkloadResponse(ack=zpb.Ack(error=error[:900])).SerializeToString())


# ---- decode ---------------------------------------------------------------------------------------------

def parse_hello(data: bytes) -> int:
    """The version a ZdsHello announces."""
    msg = zpb.ZdsHello()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise ZdsWireError(f"not a ZdsHello: {exc}") from exc
    return int(msg.version)


def parse_ack(data: bytes) -> str:
    """The error text of a WorkloadResponse's ack ('' for success)."""
    msg = zpb.WorkloadResponse()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise ZdsWireError(f"not a WorkloadResponse: {exc}") from exc
    if msg.WhichOneof("payload") != "ack":
        raise ZdsWireError("WorkloadResponse without an ack")
    return str(msg.ack.error)


def parse_request(data: bytes, fds: int) -> Request:
    """A WorkloadRequest, checked the way ztunnel checks it: an add has exactly one fd, others none."""
    msg = zpb.WorkloadRequest()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise ZdsWireError(f"not a WorkloadRequest: {exc}") from exc
    kind = msg.WhichOneof("payload")
    if kind is None:
        raise ZdsWireError("WorkloadRequest without a payload")
    if kind == "add":
        if fds != 1:
            raise ZdsWireError(f"an add must carry exactly one netns fd, got {fds}")
        a = msg.add
        return Request("add", a.uid, a.workload_info.name, a.workload_info.namespace,
                       a.workload_info.service_account)
    if fds:
        raise ZdsWireError(f"unexpected file descriptors with {kind}")
    if kind == "keep":
        return Request("keep", msg.keep.uid)
    if kind == "del":
        return Request("del", getattr(msg, "del").uid)
    return Request("snapshot_sent")


# ---- one packet -----------------------------------------------------------------------------------------

def send_packet(sock: socket.socket, data: bytes, fd: int | None = None) -> None:
    """One packet; with `fd`, that descriptor as SCM_RIGHTS."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())] if fd is not None else []
    sent = sock.sendmsg([data], anc)
    if sent != len(data):
        raise ZdsWireError(f"short send ({sent} of {len(data)} bytes)")


def recv_packet(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and the descriptors it carried (the caller owns them). b'' means the peer closed.
    Truncated packets or control data raise ZdsWireError (every received fd is closed first)."""
    data, anc, flags, _ = sock.recvmsg(MAX_PACKET + 1, socket.CMSG_SPACE(16 * 4),
                                       socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, typ, raw in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(raw[: len(raw) - len(raw) % arr.itemsize])
            fds.extend(arr)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_PACKET:
        for fd in fds:
            os.close(fd)
        raise ZdsWireError("truncated ZDS packet")
    return data, fds
