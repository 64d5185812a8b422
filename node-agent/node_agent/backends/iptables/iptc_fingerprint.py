"""Fingerprint of headrace's part of a pod's legacy iptables tables, from raw libiptc rule entries (pure).

The drift check reads a pod's tables in-process (`iptc_reader`) and compares this fingerprint with the one
recorded when the rules were last verified exact by the iptables-save compare. What it covers, per
address family and table: every chain whose name starts with the owner prefix (its name and its rules in
order) and every rule elsewhere that jumps (or goes) to such a chain (its chain, 1-based position and
content). A rule's content is everything the kernel stores for it except counters and kernel bookkeeping:
the `ipt_ip`/`ip6t_ip6` header (addresses, masks, interfaces, protocol, flags, inversions), each match
(name, revision, data) and the target (name, revision, data; a standard target by its verdict name, i.e.
the chain jumped to or ACCEPT/RETURN/..., since its data holds a blob offset that moves when unrelated
rules change). Our rules' `headrace: <purpose>` comment is a match like any other (xt_comment's 256-byte
text), so a rule whose comment changed differs. Tables holding nothing of ours are left out, like the
iptables-save compare does.

Kernel ABI used (`LAYOUTS` holds the x86_64 values; the reader takes them from python-iptables' ctypes
structs): `struct ipt_entry` = ipt_ip (84 bytes), nfcache u32, target_offset u16 (@88), next_offset u16
(@90), comefrom u32, counters 2 x u64, then the matches and the target (header 112 bytes);
`struct ip6t_entry` = ip6t_ip6 (136 bytes), nfcache, target_offset (@140), next_offset (@142), comefrom,
counters (header 168).
`struct xt_entry_match`/`xt_entry_target` = size u16, name char[29], revision u8, data. The kernel copies
names to user space only up to their NUL (the rest of the field is whatever the reader's buffer held), so
names are cut at the NUL.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple


class EntryLayout(NamedTuple):
    ip_len: int  # bytes of ipt_ip / ip6t_ip6
    header_len: int  # sizeof(ipt_entry / ip6t_entry): where the first match starts
    offsets_at: int  # offset of target_offset (u16), followed by next_offset (u16)


LAYOUTS: dict[int, EntryLayout] = {
    4: EntryLayout(ip_len=84, header_len=112, offsets_at=88),
    6: EntryLayout(ip_len=136, header_len=168, offsets_at=140),
}
EXT_HEADER = 32  # u16 size + char name[29] + u8 revision
NAME_LEN = 29
STANDARD_TARGET = ""  # the kernel's name of the standard (verdict / jump) target


class RuleKey(NamedTuple):
    """One rule: its target's name (a chain name for jumps) and its content bytes (no counters)."""

    target: str
    key: bytes


# A table as read: its chains in order, each with its rules in order.
Chains = Sequence[tuple[str, Sequence[RuleKey]]]


def _u16(raw: bytes, at: int) -> int:
    value: int = struct.unpack_from("=H", raw, at)[0]
    return value


def _field(out: list[bytes], data: bytes) -> None:
    out.append(struct.pack("=I", len(data)))
    out.append(data)


def _ext(raw: bytes, start: int, end: int, what: str) -> tuple[int, int]:
    """(size, end of name) of the match or target at raw[start:end]; ValueError when it does not fit."""
    if end - start < EXT_HEADER:
        raise ValueError(f"{what} at {start}: {end - start} bytes left, need {EXT_HEADER}")
    size = _u16(raw, start)
    if size < EXT_HEADER or start + size > end:
        raise ValueError(f"{what} at {start}: bad size {size}")
    name_end = raw.find(b"\0", start + 2, start + 2 + NAME_LEN)
    return size, (start + 2 + NAME_LEN if name_end < 0 else name_end)


def rule_key(raw: bytes, family: int, verdict_name: str, layout: EntryLayout | None = None) -> RuleKey:
    """The RuleKey of one raw rule entry (`next_offset` bytes as libiptc holds it). `verdict_name`:
    what libiptc's get_target says (chain name or ACCEPT/DROP/RETURN/QUEUE for a standard target, the
    extension's name otherwise). `layout`: the entry struct's layout (default: LAYOUTS[family]).
    ValueError on a malformed entry.

    The key: the ip header, then per match `M` + size (2 bytes) + name + NUL + revision + data, then
    `T` + the same for the target, or `S` + verdict name + NUL for a standard target. Sizes and NUL
    terminators (names hold no NUL) keep it unambiguous; it is compared, never parsed back."""
    if family not in LAYOUTS:
        raise ValueError(f"address family must be 4 or 6, not {family!r}")
    layout = layout or LAYOUTS[family]
    if len(raw) < layout.header_len:
        raise ValueError(f"rule entry of {len(raw)} bytes is shorter than its header ({layout.header_len})")
    target_offset = _u16(raw, layout.offsets_at)
    next_offset = _u16(raw, layout.offsets_at + 2)
    if not layout.header_len <= target_offset < next_offset <= len(raw):
        raise ValueError(f"rule entry offsets out of range: target {target_offset}, next {next_offset}")
    out = [raw[: layout.ip_len]]
    at = layout.header_len
    rev = 2 + NAME_LEN  # offset of the revision byte in an extension header
    while at < target_offset:
        size, name_end = _ext(raw, at, target_offset, "match")
        out += (b"M", raw[at : at + 2], raw[at + 2 : name_end], b"\0", raw[at + rev : at + size])
        at += size
    at = target_offset
    size, name_end = _ext(raw, at, next_offset, "target")
    name = raw[at + 2 : name_end].decode("ascii", "replace")
    if name == STANDARD_TARGET:  # the verdict by name: its data is an offset into the table blob
        out += (b"S", verdict_name.encode(), b"\0")
        return RuleKey(target=verdict_name, key=b"".join(out))
    out += (b"T", raw[at : at + 2], raw[at + 2 : name_end], b"\0", raw[at + rev : at + size])
    return RuleKey(target=name, key=b"".join(out))


def owned_parts(chains: Chains, prefix: str) -> tuple[list[tuple[str, list[bytes]]], list[tuple[str, int, bytes]]]:
    """Our chains (name, rule keys in order; sorted by name) and the jumps into them from other chains
    (chain, 1-based position, key) of one table."""
    mine: list[tuple[str, list[bytes]]] = []
    jumps: list[tuple[str, int, bytes]] = []
    for chain, rules in chains:
        if chain.startswith(prefix):
            mine.append((chain, [r.key for r in rules]))
            continue
        for pos, rule in enumerate(rules, start=1):
            if rule.target.startswith(prefix):
                jumps.append((chain, pos, rule.key))
    mine.sort(key=lambda c: c[0])
    jumps.sort(key=lambda j: (j[0], j[1]))
    return mine, jumps


def fingerprint(families: Mapping[int, Mapping[str, Chains]], prefix: str) -> bytes:
    """SHA-256 over our part of every table of every family (tables without anything of ours skipped).
    Counters never enter it, so traffic does not change it; any change of ours (or of a jump) does."""
    if not prefix:
        raise ValueError("owner prefix must not be empty")
    h = hashlib.sha256()
    parts: list[bytes] = []
    _field(parts, prefix.encode())
    for family in sorted(families):
        parts.append(b"F" + bytes((family,)))
        tables = families[family]
        for table in sorted(tables):
            mine, jumps = owned_parts(tables[table], prefix)
            if not mine and not jumps:
                continue
            parts.append(b"t")
            _field(parts, table.encode())
            for chain, keys in mine:
                parts.append(b"c")
                _field(parts, chain.encode())
                parts.append(struct.pack("=I", len(keys)))
                for key in keys:
                    _field(parts, key)
            for chain, pos, key in jumps:
                parts.append(b"j")
                _field(parts, chain.encode())
                parts.append(struct.pack("=I", pos))
                _field(parts, key)
    for p in parts:
        h.update(p)
    return h.digest()


def table_names(text: str) -> list[str]:
    """Table names from /proc/net/ip_tables_names (or ip6_tables_names): one a line."""
    return sorted({line.strip() for line in text.splitlines() if line.strip()})

