"""Lay out a legacy iptables table the way the kernel takes it (`IPT_SO_SET_REPLACE`): pure.

A table is one blob of entries; each entry is the rule's header (`struct ipt_entry`, or `ip6t_entry`:
addresses, masks, interfaces, protocol, inversion flags, then the offsets of its target and of the
next entry), its matches and its target, each 8-byte aligned. Chains follow one another: the built-in
chains of the table's hooks in hook order, each ending in its policy entry; then the user chains sorted
by name (as libiptc keeps them), each opened by an `ERROR` entry naming it and closed by a `RETURN`
entry; one last `ERROR` entry ends the table. A jump's verdict is the byte offset of the chain's first
entry after its head. `hook_entry[h]`/`underflow[h]` are the offsets of hook h's first entry and of its
policy. This is the layout iptables-restore (libiptc) produces; the kernel test compares the two blobs
byte for byte for every REDIRECT-mode sidecar and ambient scenario.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from cni.rules.xt_fresh_rules import (
    BUILTIN_CHAINS,
    IFNAMSIZ,
    VERDICTS,
    Extension,
    FreshTable,
    Unsupported,
    XtRule,
)
from node_agent.backends.iptables.iptc_fingerprint import EXT_HEADER, LAYOUTS

HEADER = {family: entry.header_len for family, entry in LAYOUTS.items()}  # sizeof(ipt_entry / ip6t_entry)
ERROR_NAME_LEN = 30  # struct xt_error_target's errorname
INV_VIA_OUT, INV_DST = 0x02, 0x10  # IPT_INV_VIA_OUT == IP6T_INV_VIA_OUT, IPT_INV_DSTIP == IP6T_INV_DSTIP
IP6T_F_PROTO = 0x01


class Blob(NamedTuple):
    entries: bytes
    num_entries: int
    hook_entry: tuple[int, ...]  # 5 offsets (0 for hooks the table does not have)
    underflow: tuple[int, ...]
    policies: tuple[int, ...]  # entry indexes of the built-in chains' policy entries, in hook order


def align(n: int) -> int:
    return (n + 7) & ~7


def _ext(ext: Extension) -> bytes:
    name = ext.name.encode()
    size = align(EXT_HEADER + len(ext.data))
    return struct.pack("=H29sB", size, name, ext.revision) + ext.data.ljust(size - EXT_HEADER, b"\0")


def _standard(verdict: int) -> bytes:
    return _ext(Extension("", 0, struct.pack("=i", verdict)))


def _error(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= ERROR_NAME_LEN:
        raise Unsupported(f"chain name {name!r} too long")
    return _ext(Extension("ERROR", 0, raw.ljust(ERROR_NAME_LEN, b"\0")))


def _iface(name: str | None) -> tuple[bytes, bytes]:
    if name is None:
        return bytes(IFNAMSIZ), bytes(IFNAMSIZ)
    raw = name.encode()
    return raw.ljust(IFNAMSIZ, b"\0"), (b"\xff" * (len(raw) + 1)).ljust(IFNAMSIZ, b"\0")


def _ip(rule: XtRule | None, family: int) -> bytes:
    size = 4 if family == 4 else 16
    zero = bytes(size)
    src = rule.src if rule is not None else None
    dst = rule.dst if rule is not None else None
    in_if, in_mask = _iface(rule.in_if if rule is not None else None)
    out_if, out_mask = _iface(rule.out_if if rule is not None else None)
    proto = rule.proto if rule is not None else 0
    inv = 0
    if rule is not None:
        inv = (INV_DST if rule.not_dst else 0) | (INV_VIA_OUT if rule.not_out_if else 0)
    addrs = (src.address if src else zero, dst.address if dst else zero, src.mask if src else zero,
             dst.mask if dst else zero)
    if family == 4:  # ipt_ip: src, dst, smsk, dmsk, iniface, outiface, masks, proto u16, flags, invflags
        return struct.pack("=4s4s4s4s16s16s16s16sHBB", *addrs, in_if, out_if, in_mask, out_mask, proto, 0, inv)
    flags = IP6T_F_PROTO if proto else 0  # ip6t_ip6: ... proto u16, tos, flags, invflags, padding
    return struct.pack("=16s16s16s16s16s16s16s16sHBBBxxx", *addrs, in_if, out_if, in_mask, out_mask, proto, 0,
                       flags, inv)


def _entry(family: int, ip: bytes, matches: bytes, target: bytes) -> bytes:
    target_offset = HEADER[family] + len(matches)
    next_offset = target_offset + len(target)
    if next_offset > 0xFFFF:
        raise Unsupported("rule too large")
    if family == 4:  # nfcache, target_offset, next_offset, comefrom, counters
        head = struct.pack("=IHHI16x", 0, target_offset, next_offset, 0)
    else:
        head = struct.pack("=IHHI4x16x", 0, target_offset, next_offset, 0)
    return ip + head + matches + target


def layout(table: FreshTable, valid_hooks: int) -> Blob:
    """The blob of `table` (its rules in a table that held nothing else) for a table with these hooks."""
    family = table.family
    hooks = [h for h in range(len(BUILTIN_CHAINS)) if valid_hooks & (1 << h)]
    builtins = [BUILTIN_CHAINS[h] for h in hooks]
    for r in table.rules:
        if r.chain in BUILTIN_CHAINS and r.chain not in builtins:
            raise Unsupported(f"table {table.name} has no chain {r.chain}")
    user = sorted(table.chains)
    order = [*builtins, *user]
    by_chain: dict[str, list[tuple[XtRule, bytes, bytes]]] = {c: [] for c in order}
    for r in table.rules:  # each rule's header and matches; a jump's target waits for the chain offsets
        by_chain[r.chain].append((r, _ip(r, family), b"".join(_ext(m) for m in r.matches)))
    std = HEADER[family] + len(_standard(0))  # an entry with only a standard target (policy, RETURN, jump)
    head = HEADER[family] + len(_error("ERROR"))
    starts: dict[str, int] = {}  # a user chain's first entry after its head: where jumps land
    at = 0
    for chain in order:
        if chain in user:
            at += head
            starts[chain] = at
        for r, _, matches in by_chain[chain]:
            target_len = len(_ext(r.target)) if isinstance(r.target, Extension) else std - HEADER[family]
            at += HEADER[family] + len(matches) + target_len
        at += std
    out: list[bytes] = []
    hook_entry = [0] * len(BUILTIN_CHAINS)
    underflow = [0] * len(BUILTIN_CHAINS)
    policies: list[int] = []
    offset = 0
    empty_ip = _ip(None, family)

    def put(entry: bytes) -> None:
        nonlocal offset
        out.append(entry)
        offset += len(entry)

    for chain in order:
        if chain in user:
            put(_entry(family, empty_ip, b"", _error(chain)))
        else:
            hook_entry[BUILTIN_CHAINS.index(chain)] = offset
        for r, ip, matches in by_chain[chain]:
            target = r.target
            if isinstance(target, Extension):
                put(_entry(family, ip, matches, _ext(target)))
            else:
                put(_entry(family, ip, matches, _standard(VERDICTS[target] if target in VERDICTS else starts[target])))
        if chain not in user:
            underflow[BUILTIN_CHAINS.index(chain)] = offset
            policies.append(len(out))
        put(_entry(family, empty_ip, b"", _standard(VERDICTS["RETURN" if chain in user else "ACCEPT"])))
    put(_entry(family, empty_ip, b"", _error("ERROR")))
    if offset != at + head:
        raise AssertionError("xt blob: the laid out size differs from the computed one")
    return Blob(b"".join(out), len(out), tuple(hook_entry), tuple(underflow), tuple(policies))


def pristine(family: int, valid_hooks: int) -> Blob:
    """A table with every hook's chain empty and accepting, nothing else: what a new netns holds."""
    return layout(FreshTable(family=family, name="", chains=(), rules=()), valid_hooks)

