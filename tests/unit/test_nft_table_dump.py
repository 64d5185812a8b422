"""The NFT_MSG_GETTABLE dump request and the parsing of its answer (no kernel: crafted messages)."""

from __future__ import annotations

import socket
import struct

import pytest
from node_agent.backends import nft_table_dump as d

from cni.netlink import nft_messages as nm
from cni.netlink.netlink_parse import NLMSG_DONE, NLMSG_ERROR


def message(msg_type: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0x2, seq, 0) + body


def newtable(seq: int, family: int, name: bytes) -> bytes:
    value = name + b"\0"
    attr = struct.pack("=HH", 4 + len(value), d.NFTA_TABLE_NAME) + value + b"\0" * (-len(value) % 4)
    use = struct.pack("=HH", 8, 3) + struct.pack("!I", 2)  # NFTA_TABLE_USE: skipped
    return message((nm.NFNL_SUBSYS_NFTABLES << 8) | nm.NFT_MSG_NEWTABLE, seq,
                   struct.pack("=BBH", family, 0, 0) + use + attr)


def done(seq: int) -> bytes:
    return message(NLMSG_DONE, seq, struct.pack("=i", 0))


def test_request_is_a_table_dump_of_every_family() -> None:
    req = d.dump_request(7)
    length, msg_type, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert length == len(req) == 20
    assert msg_type == (10 << 8) | 1 and flags == nm.NLM_F_REQUEST | d.NLM_F_DUMP and seq == 7 and pid == 0
    assert req[16:] == bytes([socket.AF_UNSPEC, 0, 0, 0])


def test_tables_are_named_with_their_family_until_done() -> None:
    first = newtable(1, socket.AF_INET, b"nat") + newtable(1, 1, b"headrace")
    assert d.parse_reply(first, 1) == ([("ip", "nat"), ("inet", "headrace")], False)
    assert d.parse_reply(newtable(1, socket.AF_INET6, b"mangle") + done(1), 1) == ([("ip6", "mangle")], True)
    assert d.parse_reply(done(1), 1) == ([], True)  # an empty ruleset


def test_answers_to_other_requests_are_ignored() -> None:
    assert d.parse_reply(newtable(9, socket.AF_INET, b"x") + done(9), 2) == ([], False)


def test_errors_and_truncation_are_reported() -> None:
    with pytest.raises(d.NftTableDumpError, match="netlink error"):
        d.parse_reply(message(NLMSG_ERROR, 1, struct.pack("=i", -1) + b"\0" * 16), 1)
    with pytest.raises(d.NftTableDumpError, match="truncated"):
        d.parse_reply(newtable(1, socket.AF_INET, b"nat")[:-4], 1)
