"""The legacy table digest's pure part: counters (and, when asked, comefrom) zeroed entry by entry, a broken
entry chain refused."""

from __future__ import annotations

import struct

import pytest
from node_agent.backends.iptables.iptc_fingerprint import LAYOUTS
from node_agent.backends.iptables.xt_digest import COUNTERS, masked


def entry(family: int, body: bytes, packets: int, octets: int) -> bytes:
    layout = LAYOUTS[family]
    size = layout.header_len + len(body)
    raw = bytearray(size)
    raw[0] = 0xAA  # something in the ip header
    struct.pack_into("=HH", raw, layout.offsets_at, layout.header_len, size)
    struct.pack_into("=QQ", raw, layout.header_len - COUNTERS, packets, octets)
    raw[layout.header_len:] = body
    return bytes(raw)


@pytest.mark.parametrize("family", [4, 6])
def test_counters_are_zeroed_and_nothing_else(family: int) -> None:
    table = entry(family, b"T" * 40, 5, 300) + entry(family, b"U" * 48, 0, 0)
    quiet = entry(family, b"T" * 40, 0, 0) + entry(family, b"U" * 48, 0, 0)
    busy = entry(family, b"T" * 40, 9_000_000, 1 << 40) + entry(family, b"U" * 48, 7, 7)
    assert masked(table, LAYOUTS[family]) == masked(busy, LAYOUTS[family]) == quiet
    other = entry(family, b"V" * 40, 5, 300) + entry(family, b"U" * 48, 0, 0)
    assert masked(other, LAYOUTS[family]) != quiet


@pytest.mark.parametrize("family", [4, 6])
def test_comefrom_is_zeroed_only_when_asked(family: int) -> None:
    """The kernel's bookkeeping u32 after the offsets: kept for the digest, zeroed to compare a table the
    kernel holds with one laid out here."""
    table = bytearray(entry(family, b"T" * 40, 5, 300))
    struct.pack_into("=I", table, LAYOUTS[family].offsets_at + 4, 0x1B)
    quiet = entry(family, b"T" * 40, 0, 0)
    assert masked(bytes(table), LAYOUTS[family], comefrom=True) == quiet
    assert masked(bytes(table), LAYOUTS[family]) != quiet


def test_a_broken_entry_chain_is_refused() -> None:
    good = entry(4, b"T" * 40, 1, 1)
    with pytest.raises(ValueError, match="bytes left"):
        masked(good + b"\0" * 10, LAYOUTS[4])
    bad = bytearray(good)
    struct.pack_into("=H", bad, LAYOUTS[4].offsets_at + 2, 8)  # next_offset inside its own header
    with pytest.raises(ValueError, match="bad next_offset"):
        masked(bytes(bad), LAYOUTS[4])
    struct.pack_into("=H", bad, LAYOUTS[4].offsets_at + 2, 4000)  # beyond the table
    with pytest.raises(ValueError, match="bad next_offset"):
        masked(bytes(bad), LAYOUTS[4])
