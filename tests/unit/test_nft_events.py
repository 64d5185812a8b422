"""Parsing nf_tables change announcements (pure) and the drift check's choice of pods per pass."""

from __future__ import annotations

import socket
import struct

import pytest
from node_agent.kernel import nft_events
from node_agent.kernel.nft_events import NFT_MSG_NEWGEN, Changes, changes_in

from cni.netlink import netlink_parse
from cni.netlink.nft_messages import NFNL_SUBSYS_NFTABLES

NFT_MSG_NEWTABLE = 0
NFT_MSG_NEWRULE = 6


def message(msg_type: int, payload: bytes = b"", seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0) + payload
    length = netlink_parse.NLMSGHDR.size + len(body)
    raw = netlink_parse.NLMSGHDR.pack(length, msg_type, 0, seq, 0) + body
    return raw + b"\0" * (netlink_parse.align4(length) - length)


def attr(attr_type: int, value: bytes) -> bytes:
    length = netlink_parse.NLATTR.size + len(value)
    return netlink_parse.NLATTR.pack(length, attr_type) + value + b"\0" * (netlink_parse.align4(length) - length)


def nft(kind: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | kind


def test_a_commit_is_its_object_messages_and_a_newgen_with_the_generation() -> None:
    gen = message(nft(NFT_MSG_NEWGEN), attr(1, struct.pack("!I", 4711)) + attr(2, struct.pack("!I", 99)))
    data = message(nft(NFT_MSG_NEWTABLE), attr(1, b"headrace\0")) + message(nft(NFT_MSG_NEWRULE)) + gen
    assert changes_in(data) == Changes(3, 4711)


def test_other_subsystems_and_empty_reads_are_no_change() -> None:
    ctnetlink = (1 << 8) | 0  # NFNL_SUBSYS_CTNETLINK
    assert changes_in(message(ctnetlink)) == Changes(0, None)
    assert changes_in(b"") == Changes(0, None)
    assert changes_in(message(nft(NFT_MSG_NEWGEN))) == Changes(1, None)  # no NFTA_GEN_ID: still a change


def test_a_truncated_message_is_refused() -> None:
    data = message(nft(NFT_MSG_NEWRULE))
    with pytest.raises(netlink_parse.NetlinkParseError):
        changes_in(data[:-2] + b"")
    bad = netlink_parse.NLMSGHDR.pack(400, nft(NFT_MSG_NEWRULE), 0, 0, 0)
    with pytest.raises(netlink_parse.NetlinkParseError):
        changes_in(bad)


class FakeSock:
    def __init__(self, reads: list[bytes | OSError]) -> None:
        self.reads = reads

    def recv(self, _n: int) -> bytes:
        if not self.reads:
            raise BlockingIOError
        item = self.reads.pop(0)
        if isinstance(item, OSError):
            raise item
        return item


def test_drain_reads_all_and_counts_an_overrun_and_garbage_as_a_change() -> None:
    assert nft_events.drain(FakeSock([message(nft(NFT_MSG_NEWRULE)), message(nft(NFT_MSG_NEWGEN))])) is True  # type: ignore[arg-type]
    assert nft_events.drain(FakeSock([])) is False  # type: ignore[arg-type]
    import errno

    assert nft_events.drain(FakeSock([OSError(errno.ENOBUFS, "overrun")])) is True  # type: ignore[arg-type]
    assert nft_events.drain(FakeSock([b"\x50\0\0\0" + b"\0" * 12])) is True  # type: ignore[arg-type]
    sock = FakeSock([OSError(errno.EBADF, "closed")])
    with pytest.raises(OSError):
        nft_events.drain(sock)  # type: ignore[arg-type]


def test_the_watcher_reports_a_change_per_key_and_closes_what_it_unwatches() -> None:
    import threading

    from node_agent.repair.change_watch import ChangeWatcher

    peers: dict[str, socket.socket] = {}
    mine: dict[str, socket.socket] = {}

    def subscribe(path: str, routing: bool = True) -> socket.socket:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.setblocking(False)
        peers[path], mine[path] = b, a
        return a

    seen: list[str] = []
    got = threading.Event()

    def on_change(key: str) -> None:
        seen.append(key)
        got.set()

    w = ChangeWatcher(on_change, subscribe=subscribe)
    w.start()
    try:
        assert w.watch("pod-a", "/a", 1) == "new"
        assert w.watch("pod-a", "/a", 1) == "kept"
        assert w.watch("pod-b", "/b", 2) == "new"
        peers["/b"].send(message(nft(NFT_MSG_NEWRULE)))
        assert got.wait(5) and seen == ["pod-b"]
        old = mine["/a"]
        assert w.watch("pod-a", "/a", 3) == "new"  # a new sandbox at the same path: a new subscription
        assert old.fileno() == -1, "the replaced socket is closed"
        w.unwatch("pod-b")
        assert mine["/b"].fileno() == -1 and w.keys() == {"pod-a"}
    finally:
        w.close()
    assert mine["/a"].fileno() == -1, "close() closes every socket"
