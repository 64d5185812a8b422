"""Walking netlink messages and their attributes (pure; used by the sock_diag, rtnetlink and nf_tables
readers and writers). Stdlib only and cheap to import: the CNI plugin's nftables ADD reads answers."""

from __future__ import annotations

import os
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterator

NLMSG_ERROR = 2
NLMSG_DONE = 3
NETLINK_NETFILTER = 12  # the netlink protocol of nf_tables (and the rest of netfilter)
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type


class NetlinkParseError(ValueError):
    """A message runs past the end of what was read."""


def align4(n: int) -> int:
    return (n + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) of each message in one read."""
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, msg_type, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            raise NetlinkParseError(f"truncated netlink message ({length} bytes at {off})")
        yield msg_type, seq, data[off + NLMSGHDR.size : off + length]
        off += align4(length)


def error_code(payload: bytes) -> int:
    """The errno of an NLMSG_ERROR payload (0: an acknowledgement)."""
    return -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0


def attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without the nested/byte-order flags, payload) of each attribute."""
    pos = 0
    while pos + NLATTR.size <= len(data):
        attr_len, attr_type = NLATTR.unpack_from(data, pos)
        if attr_len < NLATTR.size:
            return
        yield attr_type & 0x3FFF, data[pos + NLATTR.size : pos + attr_len]
        pos += align4(attr_len)


class NetlinkAnswerError(Exception):
    """The kernel answered a request with an error (errno in `code`)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"netlink error: {os.strerror(code) if code > 0 else code}")
        self.code = code


def dump_answers(data: bytes, seq: int) -> tuple[list[tuple[int, bytes]], bool]:
    """((type, payload) of each message answering dump `seq` in one read, whether NLMSG_DONE was seen).
    NetlinkAnswerError on an error answer, NetlinkParseError on a truncated message."""
    out: list[tuple[int, bytes]] = []
    for msg_type, msg_seq, payload in messages(data):
        if msg_seq != seq:
            continue
        if msg_type == NLMSG_DONE:
            return out, True
        if msg_type == NLMSG_ERROR:
            code = error_code(payload)
            if code:
                raise NetlinkAnswerError(code)
            continue
        out.append((msg_type, payload))
    return out, False
