"""Reading back a netlink batch the agent builds (shared by the batch builders' unit tests)."""

from __future__ import annotations

from cni.netlink import netlink_parse


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, seq, body after nfgenmsg) of each message."""
    out = []
    off = 0
    while off < len(data):
        length, msg_type, flags, seq, _ = netlink_parse.NLMSGHDR.unpack_from(data, off)
        out.append((msg_type, flags, seq, data[off + 20 : off + length]))
        off += netlink_parse.align4(length)
    return out


def families(data: bytes) -> list[int]:
    """The nfgenmsg family of each message."""
    out = []
    off = 0
    while off < len(data):
        length = netlink_parse.NLMSGHDR.unpack_from(data, off)[0]
        out.append(data[off + 16])
        off += netlink_parse.align4(length)
    return out
