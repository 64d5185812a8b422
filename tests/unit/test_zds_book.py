"""The ZDS state machine (pure): snapshot then snapshot_sent on each connection, one request in flight,
adds to the newest connection only, deletes to all, error acks fail the waiters, keep in snapshots."""

from __future__ import annotations

from concurrent import futures

import pytest
from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.zds_book import Outgoing, Settle, ZdsBook, ZdsConn, ZdsNack, ZdsSuperseded


def wl(uid: str) -> WorkloadInfo:
    return WorkloadInfo(uid=uid, name=f"pod-{uid}", namespace="ns", netns_path=f"/pins/{uid}", netns_inode=7)


def fut() -> futures.Future[None]:
    return futures.Future()


def apply(done: list[Settle]) -> None:
    for f, exc in done:
        if exc is None:
            f.set_result(None)
        else:
            f.set_exception(exc)


def drain(book: ZdsBook, conn: ZdsConn, error: str = "") -> list[tuple[str, str]]:
    """Send and ack everything queued on conn; returns (kind, uid) in send order."""
    sent: list[tuple[str, str]] = []
    while (out := book.next_request(conn)) is not None:
        sent.append((out.kind, out.uid))
        apply(book.acked(conn, error))
    return sent


def test_snapshot_then_snapshot_sent_and_acks_settle() -> None:
    book = ZdsBook()
    fa, fb = fut(), fut()
    book.upsert(wl("a"), fa)
    book.upsert(wl("b"), fb)
    c = ZdsConn(1)
    book.greeted(c)
    assert book.next_request(c) == Outgoing("add", "a", 1, wl("a"), snapshot=True)
    assert book.next_request(c) is None  # one in flight at a time
    apply(book.acked(c, ""))
    assert fa.done() and fa.result() is None and not fb.done()
    assert drain(book, c) == [("add", "b"), ("snapshot_sent", "")]
    assert fb.result() is None and c.snapshot_acked


def test_error_ack_fails_the_pod() -> None:
    book = ZdsBook()
    c = ZdsConn(1)
    book.greeted(c)
    drain(book, c)
    f = fut()
    book.upsert(wl("a"), f)
    assert drain(book, c, error="no room") == [("add", "a")]
    with pytest.raises(ZdsNack, match="no room"):
        f.result(0)
    assert book.nacks == 1


def test_adds_go_to_the_newest_connection_deletes_to_all() -> None:
    book = ZdsBook()
    old, new = ZdsConn(1), ZdsConn(2)
    book.greeted(old)
    drain(book, old)
    book.upsert(wl("a"), fut())
    book.greeted(new)  # a ztunnel upgrade: the new one connects while the old one still runs
    assert drain(book, new) == [("add", "a"), ("snapshot_sent", "")]
    assert drain(book, old) == [("add", "a")]  # queued before the new one came
    book.upsert(wl("b"), fut())
    assert drain(book, old) == [] and drain(book, new) == [("add", "b")]
    fd = fut()
    book.remove("a", fd)
    assert drain(book, old) == [("del", "a")]
    assert fd.done()  # the first ack settles it
    assert drain(book, new) == [("del", "a")]


def test_the_newest_gone_its_unacked_adds_go_to_the_older_one() -> None:
    book = ZdsBook()
    old, new = ZdsConn(1), ZdsConn(2)
    book.greeted(old)
    drain(book, old)
    book.upsert(wl("a"), fut())
    book.greeted(new)
    drain(book, new)
    assert drain(book, old) == [("add", "a")]
    fb, fc, fd, fe = fut(), fut(), fut(), fut()
    book.upsert(wl("b"), fb)
    book.upsert(wl("c"), fc)
    book.upsert(wl("d"), fd)
    book.upsert(wl("e"), fe)
    apply(book.remove("d", fut()))  # superseded: the delete went to both
    assert book.next_request(new) == Outgoing("add", "b", 2, wl("b"))
    apply(book.acked(new, ""))
    assert book.next_request(new) == Outgoing("add", "c", 3, wl("c"))  # in flight when the new ztunnel dies
    book.closed(new)
    assert drain(book, old) == [("del", "d"), ("add", "c"), ("add", "e")]
    assert fb.result(0) is None and fc.result(0) is None and fe.result(0) is None
    book.closed(old)
    assert book.newest() is None


def test_an_older_connection_gone_hands_nothing_on() -> None:
    book = ZdsBook()
    old, new = ZdsConn(1), ZdsConn(2)
    book.greeted(old)
    drain(book, old)
    book.upsert(wl("a"), fut())  # queued on the old one, then in the new one's snapshot
    book.greeted(new)
    book.closed(old)
    assert drain(book, new) == [("add", "a"), ("snapshot_sent", "")]


def test_add_and_delete_in_order_and_superseded() -> None:
    book = ZdsBook()
    c = ZdsConn(1)
    book.greeted(c)
    drain(book, c)
    f1 = fut()
    book.upsert(wl("a"), f1)
    f2 = fut()
    apply(book.remove("a", f2))
    with pytest.raises(ZdsSuperseded):
        f1.result(0)
    assert drain(book, c) == [("add", "a"), ("del", "a")]
    assert f2.result(0) is None
    assert "a" not in book.latest_op and not book.waiters


def test_remove_without_connection_fulfilled_by_next_snapshot() -> None:
    book = ZdsBook()
    book.upsert(wl("a"), fut())
    f = fut()
    apply(book.remove("a", f))
    c = ZdsConn(1)
    book.greeted(c)
    assert drain(book, c) == [("snapshot_sent", "")]
    assert f.result(0) is None


def test_lost_connection_then_reconnect_resends_the_snapshot() -> None:
    book = ZdsBook()
    c = ZdsConn(1)
    book.greeted(c)
    drain(book, c)
    f = fut()
    book.upsert(wl("a"), f)
    assert book.next_request(c) is not None  # in flight when ztunnel dies
    book.closed(c)
    assert not f.done() and book.newest() is None
    c2 = ZdsConn(2)
    book.greeted(c2)
    assert drain(book, c2) == [("add", "a"), ("snapshot_sent", "")]
    assert f.result(0) is None


def test_snapshot_add_becomes_keep_and_settles_nothing() -> None:
    book = ZdsBook()
    f = fut()
    book.upsert(wl("a"), f)
    c = ZdsConn(1)
    book.greeted(c)
    assert book.next_request(c) is not None
    assert book.as_keep(c) == Outgoing("keep", "a", 1, snapshot=True)
    apply(book.acked(c, ""))
    assert not f.done()


def test_live_add_that_cannot_be_sent_fails_closed() -> None:
    book = ZdsBook()
    c = ZdsConn(1)
    book.greeted(c)
    drain(book, c)
    f = fut()
    book.upsert(wl("a"), f)
    book.next_request(c)
    apply(book.send_failed(c, "netns gone"))
    with pytest.raises(ZdsNack, match="netns gone"):
        f.result(0)
    assert (book.acks, book.nacks) == (1, 0)  # only snapshot_sent was answered by ztunnel


def test_stop_returns_every_waiter() -> None:
    book = ZdsBook()
    f1, f2 = fut(), fut()
    book.upsert(wl("a"), f1)
    book.remove("b", f2)
    assert set(book.stop()) == {f1, f2} and book.pending() == 0
