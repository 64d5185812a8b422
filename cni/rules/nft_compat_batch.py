"""The nf_tables batch iptables-nft sends for a fresh restore text into a new netns, built here (pure).

iptables-nft keeps an iptables table as an nf_tables table of the same name (`ip nat`, `ip6 nat`): the
built-in chains it uses are base chains (`type nat hook prerouting priority -100; policy accept`), user
chains are regular chains, and each rule is a list of expressions. What iptables-nft 1.8 writes natively
is written natively here, in its order: `-i`/`-o` (meta iifname/oifname, compared with the name and its
NUL), `-p` (meta l4proto), `-s`/`-d` (payload of the address bytes the prefix covers, through a bitwise
mask when the prefix ends inside a byte), `-m tcp|udp --dport` (transport payload at offset 2), `-m mark`
(meta mark through a bitwise mask); the other
matches and REDIRECT are `match`/`target` expressions carrying the same x_tables data as the legacy table
(`xt_fresh_rules`); every rule has a counter, and a standard target is an `immediate` verdict. Every
rule also gets the compat attribute (protocol and its inversion) nft_compat hands to the x_tables checks.

The batch: BATCH_BEGIN; per table NEWTABLE with NLM_F_EXCL (so the whole batch fails with EEXIST,
changing nothing, when a table is already there: the caller then starts iptables-nft-restore), the
chains, the rules in their final order; BATCH_END. iptables-nft-restore also commits all the tables of
a text in one transaction. Only the last change message asks for an acknowledgement: the kernel sends
its answers after the commit, a failed message's error (and a failed commit's, on BATCH_BEGIN) always,
the acknowledgement of a message only when asked, so one answer means "all applied" and the caller
reads one datagram instead of one per message (iptables-nft asks for every one). The kernel test
compares the result with iptables-nft-restore's (`nft --debug=netlink list ruleset`, iptables-nft-save).
"""

from __future__ import annotations

import struct

from cni.netlink.nft_messages import (
    BASE_TRANSPORT,
    CMP_EQ,
    CMP_NEQ,
    META_IIFNAME,
    META_L4PROTO,
    META_MARK,
    META_OIFNAME,
    NF_ACCEPT,
    NFT_JUMP,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    NFT_RETURN,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    Change,
    address,
    attr,
    bitwise,
    cmp,
    expr,
    frame,
    meta,
    nest,
    payload,
    string,
    u32,
    verdict,
)
from cni.rules.xt_fresh_rules import (
    BUILTIN_CHAINS,
    Address,
    Extension,
    FreshTable,
    Unsupported,
    XtRule,
)

FAMILIES = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
# Built-in chains per table: hook number, priority (NF_IP_PRI_NAT_DST / _SRC, NF_IP_PRI_MANGLE), chain type
BASE_CHAINS = {
    "nat": {"PREROUTING": (0, -100, "nat"), "INPUT": (1, 100, "nat"), "OUTPUT": (3, -100, "nat"),
            "POSTROUTING": (4, 100, "nat")},
    "mangle": {"PREROUTING": (0, -150, "filter"), "INPUT": (1, -150, "filter"), "FORWARD": (2, -150, "filter"),
               "OUTPUT": (3, -150, "route"), "POSTROUTING": (4, -150, "filter")},
}
VERDICT_CODES = {"ACCEPT": NF_ACCEPT, "DROP": 0, "RETURN": NFT_RETURN}


def _xt(kind: str, ext: Extension) -> bytes:
    size = (len(ext.data) + 7) & ~7  # the data as x_tables pads it
    return expr(kind, string(1, ext.name), u32(2, ext.revision), attr(3, ext.data.ljust(size, b"\0")))


def _address(family: int, which: int, addr: Address, negate: bool) -> list[bytes]:
    try:
        return address(family, which, addr.address, addr.mask, negate)
    except ValueError as exc:
        raise Unsupported(str(exc)) from exc


def rule_expressions(rule: XtRule, family: int, chains: tuple[str, ...]) -> bytes:
    exprs: list[bytes] = []
    if rule.in_if is not None:
        exprs += [meta(META_IIFNAME), cmp(CMP_EQ, rule.in_if.encode() + b"\0")]
    if rule.out_if is not None:
        exprs += [meta(META_OIFNAME), cmp(CMP_NEQ if rule.not_out_if else CMP_EQ, rule.out_if.encode() + b"\0")]
    if rule.proto:
        exprs += [meta(META_L4PROTO), cmp(CMP_EQ, bytes((rule.proto,)))]
    if rule.src is not None:
        exprs += _address(family, 0, rule.src, False)
    if rule.dst is not None:
        exprs += _address(family, 1, rule.dst, rule.not_dst)
    for m in rule.matches:
        if m.name in ("tcp", "udp"):  # xt_tcp / xt_udp: dpts[0] at offset 4, invflags at 11 / 8
            (port,) = struct.unpack_from("=H", m.data, 4)
            negate = m.data[11 if m.name == "tcp" else 8]
            exprs += [payload(BASE_TRANSPORT, 2, 2), cmp(CMP_NEQ if negate else CMP_EQ, struct.pack("!H", port))]
        elif m.name == "mark":  # xt_mark_mtinfo1: mark, mask, invert
            mark, mask, negate = struct.unpack("=IIB", m.data)
            if mask == 0xFFFFFFFF:
                raise Unsupported("a mark match without a mask")
            exprs += [meta(META_MARK), bitwise(struct.pack("=I", mask)),
                      cmp(CMP_NEQ if negate else CMP_EQ, struct.pack("=I", mark))]
        else:
            exprs.append(_xt("match", m))
    exprs.append(expr("counter", attr(1, bytes(8)), attr(2, bytes(8))))  # NFTA_COUNTER_BYTES, _PACKETS
    target = rule.target
    if isinstance(target, Extension):
        exprs.append(_xt("target", target))
    elif target in VERDICT_CODES:
        exprs.append(verdict(VERDICT_CODES[target]))
    elif target in chains:
        exprs.append(verdict(NFT_JUMP, target))
    else:
        raise Unsupported(f"jump to {target}")
    return b"".join(exprs)


def batch(tables: tuple[FreshTable, ...], seq: int) -> tuple[bytes, int]:
    """(the batch, the sequence number of its last change message, the one the kernel acknowledges) for
    `tables`: one transaction for all of them."""
    if not tables:
        raise Unsupported("no table")
    return frame(changes(tables), FAMILIES[tables[0].family], seq)


def changes(tables: tuple[FreshTable, ...]) -> list[Change]:
    """The change messages creating `tables` (all of one family), in iptables-nft's order."""
    if not tables:
        raise Unsupported("no table")
    family = FAMILIES[tables[0].family]
    out: list[Change] = []

    def change(msg_type: int, flags: int, body: bytes) -> None:
        out.append((msg_type, flags, body))

    for table in tables:
        base = BASE_CHAINS.get(table.name)
        if base is None or FAMILIES[table.family] != family:
            raise Unsupported(f"table {table.name}")
        change(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, string(1, table.name))  # NFTA_TABLE_NAME
        for chain in table.chains:  # as iptables-nft: user chains first, built-in ones where first used
            change(NFT_MSG_NEWCHAIN, NLM_F_CREATE, string(1, table.name) + string(3, chain))
        for chain in dict.fromkeys(r.chain for r in table.rules if r.chain in BUILTIN_CHAINS):
            if chain not in base:
                raise Unsupported(f"{table.name} has no chain {chain}")
            hook, priority, chain_type = base[chain]
            # NFTA_CHAIN_TABLE, _NAME, _HOOK{HOOKNUM, PRIORITY}, _POLICY, _TYPE
            change(NFT_MSG_NEWCHAIN, NLM_F_CREATE, string(1, table.name) + string(3, chain)
                   + nest(4, u32(1, hook), u32(2, priority)) + u32(5, NF_ACCEPT) + string(7, chain_type))
        for rule in table.rules:
            # NFTA_RULE_TABLE, _CHAIN, _EXPRESSIONS, _COMPAT{PROTO, FLAGS}
            exprs = rule_expressions(rule, table.family, table.chains)
            compat = nest(5, u32(1, rule.proto), u32(2, 0))
            body = string(1, table.name) + string(2, rule.chain) + nest(4, exprs) + compat
            change(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body)
    return out
