"""Put an IPv6 address on `lo` of the calling thread's network namespace over rtnetlink, in-process (what
`ip -6 addr replace ADDR/128 dev lo` does): one RTM_NEWADDR request, acknowledged. The caller has entered
the pod netns; the socket is made in it, used once and closed. Stdlib only and cheap to import (`_socket`):
the CNI plugin's nftables ADD and the agent both use it."""

from __future__ import annotations

import _socket
import os
import struct

from cni.netlink.netlink_parse import NLMSG_ERROR, NLMSGHDR, messages
from cni.rules.rule_text import PASSTHROUGH_SOURCE

RTM_NEWADDR = 20
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
IFA_LOCAL = 2
NETLINK_ROUTE = 0
LOOPBACK_INDEX = 1  # `lo` is the first interface of every network namespace
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")


def replace_request(address: str, seq: int = 1) -> bytes:
    """The RTM_NEWADDR message (pure): ADDR/128 on ifindex 1, created or replaced, ack requested.
    OSError for a text that is not an IPv6 address."""
    raw = _socket.inet_pton(_socket.AF_INET6, address)
    body = IFADDRMSG.pack(_socket.AF_INET6, 128, 0, 0, LOOPBACK_INDEX) + _RTATTR.pack(4 + len(raw), IFA_LOCAL) + raw
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_NEWADDR, flags, seq, 0) + body


def replace_on_loopback(address: str, timeout: float = 2.0) -> None:
    """ADDR/128 on `lo` of the calling thread's netns; OSError when the kernel refuses."""
    request = replace_request(address)
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(request)
        data = sock.recv(65536)
    finally:
        sock.close()
    for msg_type, _seq, payload in messages(data):
        if msg_type == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", payload)
            if err:
                raise OSError(-err, f"adding {address} to lo: {os.strerror(-err)}")
            return
    raise OSError(f"adding {address} to lo: no acknowledgement from the kernel")


def passthrough_v6_here() -> None:
    """`ip -6 addr replace ::6/128 dev lo` in the calling thread's netns: a dual-stack sidecar's inbound
    passthrough source (`PASSTHROUGH_SOURCE`, as istio-iptables puts it there); OSError when refused."""
    replace_on_loopback(PASSTHROUGH_SOURCE[6].split("/")[0])
