"""The NFT_MSG_GETGEN request and the parsing of its answer (no kernel: crafted messages)."""

from __future__ import annotations

import socket
import struct

import pytest
from node_agent.backends.iptables import nft_generation as g

from cni.netlink import nft_messages as nm
from cni.netlink.netlink_parse import NLMSG_ERROR


def newgen(seq: int, gen: int, *, extra_attrs: bytes = b"") -> bytes:
    attr = struct.pack("=HH", 8, g.NFTA_GEN_ID) + struct.pack("!I", gen)
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0) + extra_attrs + attr
    msg_type = (nm.NFNL_SUBSYS_NFTABLES << 8) | g.NFT_MSG_NEWGEN
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, seq, 0) + body


def test_request_is_a_getgen_for_any_family() -> None:
    req = g.getgen_request(7)
    length, msg_type, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert length == len(req) == 20
    assert msg_type == (10 << 8) | 16 and flags == nm.NLM_F_REQUEST and seq == 7 and pid == 0
    assert req[16:] == bytes([socket.AF_UNSPEC, 0, 0, 0])


def test_reply_gives_the_generation() -> None:
    assert g.parse_getgen_reply(newgen(1, 0xDEADBEEF), 1) == 0xDEADBEEF
    # other attributes first (NFTA_GEN_PROC_PID, padded NFTA_GEN_PROC_NAME) are skipped
    other = struct.pack("=HH", 8, 2) + struct.pack("!I", 42) + struct.pack("=HH", 9, 3) + b"nft\x00\x00" + b"\x00" * 3
    assert g.parse_getgen_reply(newgen(1, 5, extra_attrs=other), 1) == 5


def test_answers_to_other_requests_are_ignored() -> None:
    assert g.parse_getgen_reply(newgen(9, 1) + newgen(2, 3), 2) == 3
    with pytest.raises(g.NftGenerationError, match="no NEWGEN"):
        g.parse_getgen_reply(newgen(9, 1), 2)


def test_errors_and_garbage_are_refused() -> None:
    err = struct.pack("=IHHII", 36, NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + b"\x00" * 16
    with pytest.raises(g.NftGenerationError, match="netlink error"):
        g.parse_getgen_reply(err, 1)
    with pytest.raises(g.NftGenerationError, match="truncated"):
        g.parse_getgen_reply(newgen(1, 1)[:-2], 1)
    without_id = struct.pack("=IHHII", 20, (10 << 8) | 15, 0, 1, 0) + b"\x00" * 4
    with pytest.raises(g.NftGenerationError, match="without NFTA_GEN_ID"):
        g.parse_getgen_reply(without_id, 1)
