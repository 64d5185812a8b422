"""The pure fingerprint of our part of legacy tables, from synthetic raw libiptc entries (no root)."""

from __future__ import annotations

import struct

import pytest
from node_agent.backends.iptables.iptc_fingerprint import (
    LAYOUTS,
    RuleKey,
    fingerprint,
    owned_parts,
    rule_key,
    table_names,
)


def ext(name: str, data: bytes, revision: int = 0, junk: bytes = b"") -> bytes:
    """An xt_entry_match/target: size, name (NUL, then `junk` in the rest of the field), revision, data."""
    field = (name.encode() + b"\0" + junk)[:29].ljust(29, b"\0")
    size = (32 + len(data) + 7) // 8 * 8
    return (struct.pack("=H", size) + field + bytes((revision,)) + data).ljust(size, b"\0")


def entry(
    family: int = 4,
    ip: bytes = b"",
    matches: tuple[bytes, ...] = (),
    target: bytes = b"",
    counters: tuple[int, int] = (0, 0),
    comefrom: int = 0,
    nfcache: int = 0,
) -> bytes:
    layout = LAYOUTS[family]
    body = b"".join(matches)
    target = target or ext("", struct.pack("=i", -2) + b"\0" * 4)  # standard target, verdict ACCEPT
    target_offset = layout.header_len + len(body)
    next_offset = target_offset + len(target)
    head = ip.ljust(layout.ip_len, b"\0")[: layout.ip_len]
    head += struct.pack("=IHHI", nfcache, target_offset, next_offset, comefrom)
    head = head.ljust(layout.header_len - 16, b"\0") + struct.pack("=QQ", *counters)
    assert len(head) == layout.header_len
    return head + body + target


REDIRECT = ext("REDIRECT", struct.pack("=IIHH", 1, 0, 15001, 15001))
MARK = ext("mark", struct.pack("=IIB", 0x539, 0xFFF, 1), revision=1)


@pytest.mark.parametrize("family", [4, 6])
def test_rule_key_ignores_counters_bookkeeping_and_name_padding(family: int) -> None:
    base = rule_key(entry(family, matches=(MARK,), target=REDIRECT), family, "REDIRECT")
    assert base.target == "REDIRECT"
    noisy = entry(
        family,
        matches=(ext("mark", struct.pack("=IIB", 0x539, 0xFFF, 1), revision=1, junk=b"garbage"),),
        target=ext("REDIRECT", struct.pack("=IIHH", 1, 0, 15001, 15001), junk=b"libslang.so"),
        counters=(123, 456789),
        comefrom=0x5,
        nfcache=0x1,
    )
    assert rule_key(noisy, family, "REDIRECT") == base


@pytest.mark.parametrize("family", [4, 6])
def test_rule_key_sees_every_part_of_a_rule(family: int) -> None:
    base = rule_key(entry(family, b"\x0a\0\0\x01", (MARK,), REDIRECT), family, "REDIRECT").key
    variants = [
        entry(family, b"\x0a\0\0\x02", (MARK,), REDIRECT),  # address
        entry(family, b"\x0a\0\0\x01", (ext("mark", struct.pack("=IIB", 0x539, 0xFFFF, 1), 1),), REDIRECT),
        entry(family, b"\x0a\0\0\x01", (ext("mark", struct.pack("=IIB", 0x539, 0xFFF, 1), 2),), REDIRECT),
        entry(family, b"\x0a\0\0\x01", (ext("connmark", struct.pack("=IIB", 0x539, 0xFFF, 1), 1),), REDIRECT),
        entry(family, b"\x0a\0\0\x01", (), REDIRECT),  # match removed
        entry(family, b"\x0a\0\0\x01", (MARK, MARK), REDIRECT),  # match added
        entry(family, b"\x0a\0\0\x01", (MARK,), ext("REDIRECT", struct.pack("=IIHH", 1, 0, 15002, 15002))),
        entry(family, b"\x0a\0\0\x01", (MARK,), ext("DNAT", struct.pack("=IIHH", 1, 0, 15001, 15001))),
    ]
    keys = [rule_key(v, family, "X").key for v in variants]
    assert base not in keys
    assert len(set(keys)) == len(keys)


def test_standard_targets_are_named_by_verdict_not_offset() -> None:
    jump_a = entry(target=ext("", struct.pack("=i", 1520) + b"\0" * 4))
    jump_b = entry(target=ext("", struct.pack("=i", 2048) + b"\0" * 4))  # same chain, moved in the blob
    a = rule_key(jump_a, 4, "HEADRACE_AM_PRERT")
    assert a == rule_key(jump_b, 4, "HEADRACE_AM_PRERT")
    assert a.target == "HEADRACE_AM_PRERT"
    assert a != rule_key(jump_a, 4, "HEADRACE_AM_OUTPUT")
    assert rule_key(entry(), 4, "ACCEPT") != rule_key(entry(), 4, "RETURN")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\0" * 50, "shorter than its header"),
        (entry()[:-4], "offsets out of range"),
        (entry()[:88] + struct.pack("=HH", 200, 100) + entry()[92:], "offsets out of range"),
        (entry(matches=(b"\x08\x00" + b"\0" * 30,)), "bad size"),
    ],
)
def test_malformed_entries_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        rule_key(raw, 4, "ACCEPT")
    with pytest.raises(ValueError, match="family"):
        rule_key(entry(), 5, "ACCEPT")


def rk(target: str, tag: str = "") -> RuleKey:
    return RuleKey(target=target, key=f"{target}|{tag}".encode())


NAT = [
    ("PREROUTING", [rk("FOREIGN"), rk("HEADRACE_AM_PRERT")]),
    ("OUTPUT", [rk("HEADRACE_AM_OUTPUT")]),
    ("HEADRACE_AM_PRERT", [rk("ACCEPT", "a"), rk("REDIRECT", "b")]),
    ("HEADRACE_AM_OUTPUT", [rk("ACCEPT", "c")]),
    ("FOREIGN", [rk("RETURN")]),
]


def test_owned_parts_selects_our_chains_and_the_jumps_into_them() -> None:
    mine, jumps = owned_parts(NAT, "HEADRACE_AM_")
    assert [c for c, _ in mine] == ["HEADRACE_AM_OUTPUT", "HEADRACE_AM_PRERT"]
    assert [(c, p) for c, p, _ in jumps] == [("OUTPUT", 1), ("PREROUTING", 2)]


TableT = list[tuple[str, list[RuleKey]]]


def fp(nat: TableT, filt: TableT | None = None, prefix: str = "HEADRACE_AM_") -> bytes:
    tables: dict[str, TableT] = {"nat": nat}
    if filt is not None:
        tables["filter"] = filt
    return fingerprint({4: tables}, prefix)


def test_fingerprint_changes_with_every_change_of_ours_only() -> None:
    base = fp(NAT)
    assert base == fp(list(NAT))
    unchanged: list[TableT] = [
        [*NAT[:4], ("FOREIGN", [rk("RETURN"), rk("DROP")])],  # foreign chain grows
        [*NAT, ("OTHER", [])],  # a foreign chain appears
    ]
    for nat in unchanged:
        assert fp(nat) == base
    assert fp(NAT, [("INPUT", [rk("ACCEPT")])]) == base  # a table with nothing of ours
    changed: list[TableT] = [
        [NAT[0], NAT[1], ("HEADRACE_AM_PRERT", []), NAT[3], NAT[4]],  # flushed
        [NAT[0], ("OUTPUT", []), NAT[2], NAT[3], NAT[4]],  # jump deleted
        [NAT[0], NAT[1], ("HEADRACE_AM_PRERT", [rk("ACCEPT", "a"), rk("RETURN"), rk("REDIRECT", "b")]), *NAT[3:]],
        [NAT[0], NAT[1], ("HEADRACE_AM_PRERT", [rk("REDIRECT", "b"), rk("ACCEPT", "a")]), *NAT[3:]],  # order
        [NAT[0], NAT[1], ("HEADRACE_AM_PRERT", [rk("ACCEPT", "a"), rk("REDIRECT", "x")]), *NAT[3:]],  # altered
        [("PREROUTING", [rk("HEADRACE_AM_PRERT")]), *NAT[1:]],  # jump moved
        [NAT[0], NAT[1], NAT[3], NAT[4]],  # chain deleted (and its rules)
        [*NAT, ("HEADRACE_AM_NEW", [])],  # a new chain of ours
        [NAT[0], ("OUTPUT", [rk("HEADRACE_AM_OUTPUT"), rk("HEADRACE_AM_OUTPUT")]), *NAT[2:]],  # duplicate
    ]
    digests = {fp(nat) for nat in changed}
    assert base not in digests and len(digests) == len(changed)
    assert fp(NAT, [("HEADRACE_AM_X", [])]) != base  # ours in another table
    assert fingerprint({6: {"nat": NAT}}, "HEADRACE_AM_") != base  # other family
    assert fp(NAT, prefix="HEADRACE_SC_") != base
    with pytest.raises(ValueError, match="prefix"):
        fp(NAT, prefix="")


def test_table_names() -> None:
    assert table_names("nat\nmangle\n\n") == ["mangle", "nat"]
    assert table_names("") == []
