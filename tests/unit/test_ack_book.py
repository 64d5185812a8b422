"""The bookkeeping every proxy transport keeps between the agent's operations and the proxy's acks."""

from __future__ import annotations

from concurrent import futures

from node_agent.protocol.workload import WorkloadInfo
from node_agent.proxy.ack_book import AckBook


def fut() -> futures.Future[None]:
    return futures.Future()


def test_an_ack_settles_the_latest_operation_and_a_superseded_one_nothing() -> None:
    book = AckBook()
    first, second = fut(), fut()
    op1, gone = book.issue("a", "add", first, WorkloadInfo("a", "n", "ns"))
    op2, gone2 = book.issue("a", "add", second, WorkloadInfo("a", "n", "ns"))
    assert gone == gone2 == [] and op2 > op1
    assert book.answered("a", op1, "add") == []  # an older add: the latest is op2
    assert [w.future for w in book.answered("a", op2, "add")] == [first, second]
    removal = fut()
    op3, gone3 = book.issue("a", "delete", removal)
    assert gone3 == [] and "a" not in book.desired
    assert [w.future for w in book.answered("a", op3, "delete")] == [removal]
    assert book.latest_op == {} and book.waiters == {} and book.pending() == 0


def test_a_removal_supersedes_a_waiting_add() -> None:
    book = AckBook()
    add = fut()
    book.issue("a", "add", add, WorkloadInfo("a", "n", "ns"))
    _, gone = book.issue("a", "delete", fut())
    assert [w.future for w in gone] == [add] and book.pending() == 1


def test_a_snapshot_settles_earlier_removals_and_drops_their_numbers() -> None:
    book = AckBook()
    book.issue("kept", "add", fut(), WorkloadInfo("kept", "n", "ns"))
    early = fut()
    book.issue("gone", "delete", early)
    snapshot_op = book.op_now
    late = fut()
    book.issue("later", "delete", late)  # after the snapshot was built: its own ack settles it
    assert [w.future for w in book.snapshot_answered(snapshot_op)] == [early]
    assert sorted(book.latest_op) == ["kept", "later"] and [w.future for w in book.waiters["later"]] == [late]


def test_a_cancelled_waiter_is_forgotten_with_the_number_of_a_uid_no_longer_wanted() -> None:
    book = AckBook()
    add = fut()
    book.issue("a", "add", add, WorkloadInfo("a", "n", "ns"))
    book.forget("a", add)
    assert book.waiters == {} and "a" in book.latest_op  # still desired: its number is the snapshot's
    removal = fut()
    book.issue("a", "delete", removal)
    book.forget("a", removal)
    assert book.waiters == {} and book.latest_op == {} and book.desired == {}


def test_drain_returns_every_waiting_future() -> None:
    book = AckBook()
    a, b = fut(), fut()
    book.issue("a", "add", a, WorkloadInfo("a", "n", "ns"))
    book.issue("b", "delete", b)
    assert book.drain() == [a, b] and book.pending() == 0
