"""Put an IPv6 address on `lo` of the calling thread's network namespace over rtnetlink, in-process (what
`ip -6 addr replace ADDR/128 dev lo` does): one RTM_NEWADDR request, acknowledged. The caller has entered
the pod netns (`cni.kernel.netns.entered`); the socket is made in it, used once and closed."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from node_agent.kernel.netlink_parse import NLMSG_ERROR, NLMSGHDR, messages

RTM_NEWADDR = 20
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
IFA_LOCAL = 2
LOOPBACK_INDEX = 1  # `lo` is the first interface of every network namespace
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")


def replace_request(address: str, seq: int = 1) -> bytes:
    """The RTM_NEWADDR message (pure): ADDR/128 on ifindex 1, created or replaced, ack requested."""
    raw = ipaddress.IPv6Address(address).packed
    body = _IFADDRMSG.pack(socket.AF_INET6, 128, 0, 0, LOOPBACK_INDEX) + _RTATTR.pack(4 + len(raw), IFA_LOCAL) + raw
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_NEWADDR, flags, seq, 0) + body


def replace_on_loopback(address: str, timeout: float = 2.0) -> None:
    """ADDR/128 on `lo` of the calling thread's netns; OSError when the kernel refuses."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(replace_request(address))
        data = sock.recv(65536)
    for msg_type, _seq, payload in messages(data):
        if msg_type == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", payload)
            if err:
                raise OSError(-err, f"adding {address} to lo: {os.strerror(-err)}")
            return
    raise OSError(f"adding {address} to lo: no acknowledgement from the kernel")
