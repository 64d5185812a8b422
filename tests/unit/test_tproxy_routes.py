"""The TPROXY policy-routing helper (pure): batch lines and how ip's -force -batch stderr is judged."""

from __future__ import annotations

from cni.rules import tproxy_routes as tr


def test_lines_per_family() -> None:
    assert tr.add_lines(4) == [
        "rule add pref 32765 from 0.0.0.0/0 fwmark 0x539 lookup 133",
        "route add local 0.0.0.0/0 dev lo table 133",
    ]
    assert tr.add_lines(6) == [
        "addr replace ::6/128 dev lo",
        "rule add pref 32765 from ::/0 fwmark 0x539 lookup 133",
        "route add local ::/0 dev lo table 133",
    ]
    assert tr.del_lines(6) == [
        "rule del pref 32765 from ::/0 fwmark 0x539 lookup 133",
        "route del local ::/0 dev lo table 133",
    ]
    assert tr.argv(6) == ["ip", "-6", "-force", "-batch", "-"]
    assert tr.batch_text(["a", "b"]) == "a\nb\n"


def test_failures_parses_per_line_messages() -> None:
    stderr = (
        "RTNETLINK answers: File exists\nCommand failed -:2\nError: FIB table does not exist.\nCommand failed -:3\n"
    )
    assert tr.failures(stderr) == {2: "RTNETLINK answers: File exists", 3: "Error: FIB table does not exist."}
    assert tr.failures("") == {}


def test_add_outcome_tolerates_existing_entries_only() -> None:
    lines = tr.add_lines(6)
    assert tr.add_error(lines, "", 0) is None
    assert tr.newly_added(lines, "") == lines[1:]
    exists = "RTNETLINK answers: File exists\nCommand failed -:2\nRTNETLINK answers: File exists\nCommand failed -:3\n"
    assert tr.add_error(lines, exists, 1) is None
    assert tr.newly_added(lines, exists) == []
    # only the route was new: a rollback deletes the route, not the rule that was there before
    assert tr.undo_lines(tr.newly_added(lines, "RTNETLINK answers: File exists\nCommand failed -:2\n")) == [
        "route del local ::/0 dev lo table 133"
    ]
    bad = "RTNETLINK answers: Operation not permitted\nCommand failed -:2\n"
    assert "Operation not permitted" in (tr.add_error(lines, bad, 1) or "")
    # the address line may not fail at all, not even with EEXIST
    assert "addr replace" in (tr.add_error(lines, "RTNETLINK answers: File exists\nCommand failed -:1\n", 1) or "")
    # a non-zero exit without per-line failures (e.g. ip could not run) is an error
    assert tr.add_error(lines, "nsenter: cannot open", 1) == "nsenter: cannot open"


def test_del_outcome_tolerates_absent_entries() -> None:
    lines = tr.del_lines(4)
    gone = (
        "RTNETLINK answers: No such file or directory\nCommand failed -:1\n"
        "Error: FIB table does not exist.\nCommand failed -:2\n"
    )
    assert tr.del_error(lines, gone, 1) is None
    assert tr.del_error(lines, "RTNETLINK answers: No such process\nCommand failed -:2\n", 1) is None
    assert tr.del_error(lines, "RTNETLINK answers: Permission denied\nCommand failed -:1\n", 1) is not None


def test_check_problems() -> None:
    good4 = "32765:\tfrom all fwmark 0x539 lookup 133\nlocal default dev lo scope host \n"
    assert tr.check_problems(4, good4) == []
    good6 = "32765:\tfrom all fwmark 0x539 lookup 133\nlocal default dev lo metric 1024 pref medium\n"
    assert tr.check_problems(6, good6) == []
    missing = tr.check_problems(6, "local default dev lo metric 1024 pref medium\n")
    assert missing == ["IPv6 policy routing: ip rule 'pref 32765 fwmark 0x539 lookup 133' is missing"]
    assert len(tr.check_problems(4, "32765:\tfrom all fwmark 0x539 lookup 134\n")) == 2
