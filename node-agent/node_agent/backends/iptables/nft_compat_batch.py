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

import socket
import struct

from node_agent.backends.iptables.xt_fresh_rules import (
    BUILTIN_CHAINS,
    Address,
    Extension,
    FreshTable,
    Unsupported,
    XtRule,
)
from node_agent.kernel import netlink_parse

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE = 0, 3, 6
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x200, 0x400, 0x800
NLA_F_NESTED = 0x8000
FAMILIES = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
# Built-in chains per table: hook number, priority (NF_IP_PRI_NAT_DST / _SRC, NF_IP_PRI_MANGLE), chain type
BASE_CHAINS = {
    "nat": {"PREROUTING": (0, -100, "nat"), "INPUT": (1, 100, "nat"), "OUTPUT": (3, -100, "nat"),
            "POSTROUTING": (4, 100, "nat")},
    "mangle": {"PREROUTING": (0, -150, "filter"), "INPUT": (1, -150, "filter"), "FORWARD": (2, -150, "filter"),
               "OUTPUT": (3, -150, "route"), "POSTROUTING": (4, -150, "filter")},
}
NF_ACCEPT = 1
VERDICT_CODES = {"ACCEPT": NF_ACCEPT, "DROP": 0, "RETURN": -5}  # NF_ACCEPT, NF_DROP, NFT_RETURN
NFT_JUMP = -3
META_MARK, META_IIFNAME, META_OIFNAME, META_L4PROTO = 3, 6, 7, 16
BASE_NETWORK, BASE_TRANSPORT = 1, 2
CMP_EQ, CMP_NEQ = 0, 1
REG_VERDICT, REG_1 = 0, 1
ADDRESS_OFFSETS = {4: (12, 16), 6: (8, 24)}  # source, destination in the IPv4 / IPv6 header


def _attr(kind: int, value: bytes) -> bytes:
    head = netlink_parse.NLATTR.pack(netlink_parse.NLATTR.size + len(value), kind)
    return head + value + bytes(netlink_parse.align4(len(value)) - len(value))


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _str(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!i" if value < 0 else "!I", value))


def _expr(name: str, *data: bytes) -> bytes:
    return _nest(1, _str(1, name), _nest(2, *data))  # NFTA_LIST_ELEM: NFTA_EXPR_NAME, NFTA_EXPR_DATA


def _meta(key: int) -> bytes:
    return _expr("meta", _u32(1, REG_1), _u32(2, key))  # NFTA_META_DREG, NFTA_META_KEY


def _cmp(op: int, value: bytes) -> bytes:
    return _expr("cmp", _u32(1, REG_1), _u32(2, op), _nest(3, _attr(1, value)))  # SREG, OP, DATA{VALUE}


def _payload(base: int, offset: int, length: int) -> bytes:
    return _expr("payload", _u32(1, REG_1), _u32(2, base), _u32(3, offset), _u32(4, length))


def _bitwise(mask: bytes) -> bytes:  # SREG, DREG, LEN, MASK{VALUE}, XOR{VALUE}
    return _expr("bitwise", _u32(1, REG_1), _u32(2, REG_1), _u32(3, len(mask)), _nest(4, _attr(1, mask)),
                 _nest(5, _attr(1, bytes(len(mask)))))


def _xt(kind: str, ext: Extension) -> bytes:
    size = (len(ext.data) + 7) & ~7  # the data as x_tables pads it
    return _expr(kind, _str(1, ext.name), _u32(2, ext.revision), _attr(3, ext.data.ljust(size, b"\0")))


def _verdict(code: int, chain: str | None = None) -> bytes:
    verdict = _u32(1, code) + (_str(2, chain) if chain is not None else b"")
    return _expr("immediate", _u32(1, REG_VERDICT), _nest(2, _nest(2, verdict)))  # DREG, DATA{VERDICT{..}}


def _address(family: int, which: int, addr: Address, negate: bool) -> list[bytes]:
    mask = addr.mask
    whole = next((i for i, b in enumerate(mask) if b != 0xFF), len(mask))  # leading all-ones bytes
    partial = any(mask[whole:])
    if not partial and whole == 0:
        raise Unsupported("a zero-length prefix")
    length = len(mask) if partial else whole
    out = [_payload(BASE_NETWORK, ADDRESS_OFFSETS[family][which], length)]
    if partial:
        out.append(_bitwise(mask))
    out.append(_cmp(CMP_NEQ if negate else CMP_EQ, addr.address[:length]))
    return out


def rule_expressions(rule: XtRule, family: int, chains: tuple[str, ...]) -> bytes:
    exprs: list[bytes] = []
    if rule.in_if is not None:
        exprs += [_meta(META_IIFNAME), _cmp(CMP_EQ, rule.in_if.encode() + b"\0")]
    if rule.out_if is not None:
        exprs += [_meta(META_OIFNAME), _cmp(CMP_NEQ if rule.not_out_if else CMP_EQ, rule.out_if.encode() + b"\0")]
    if rule.proto:
        exprs += [_meta(META_L4PROTO), _cmp(CMP_EQ, bytes((rule.proto,)))]
    if rule.src is not None:
        exprs += _address(family, 0, rule.src, False)
    if rule.dst is not None:
        exprs += _address(family, 1, rule.dst, rule.not_dst)
    for m in rule.matches:
        if m.name in ("tcp", "udp"):  # xt_tcp / xt_udp: dpts[0] at offset 4, invflags at 11 / 8
            (port,) = struct.unpack_from("=H", m.data, 4)
            negate = m.data[11 if m.name == "tcp" else 8]
            exprs += [_payload(BASE_TRANSPORT, 2, 2), _cmp(CMP_NEQ if negate else CMP_EQ, struct.pack("!H", port))]
        elif m.name == "mark":  # xt_mark_mtinfo1: mark, mask, invert
            mark, mask, negate = struct.unpack("=IIB", m.data)
            if mask == 0xFFFFFFFF:
                raise Unsupported("a mark match without a mask")
            exprs += [_meta(META_MARK), _bitwise(struct.pack("=I", mask)),
                      _cmp(CMP_NEQ if negate else CMP_EQ, struct.pack("=I", mark))]
        else:
            exprs.append(_xt("match", m))
    exprs.append(_expr("counter", _attr(1, bytes(8)), _attr(2, bytes(8))))  # NFTA_COUNTER_BYTES, _PACKETS
    target = rule.target
    if isinstance(target, Extension):
        exprs.append(_xt("target", target))
    elif target in VERDICT_CODES:
        exprs.append(_verdict(VERDICT_CODES[target]))
    elif target in chains:
        exprs.append(_verdict(NFT_JUMP, target))
    else:
        raise Unsupported(f"jump to {target}")
    return b"".join(exprs)


def _message(msg_type: int, family: int, flags: int, seq: int, body: bytes, res_id: int = 0) -> bytes:
    payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body  # nfgenmsg
    hdr = netlink_parse.NLMSGHDR
    return hdr.pack(hdr.size + len(payload), msg_type, NLM_F_REQUEST | flags, seq, 0) + payload


def batch(tables: tuple[FreshTable, ...], seq: int) -> tuple[bytes, int]:
    """(the batch, the sequence number of its last change message, the one the kernel acknowledges) for
    `tables`: one transaction for all of them."""
    if not tables:
        raise Unsupported("no table")
    family = FAMILIES[tables[0].family]
    changes: list[tuple[int, int, bytes]] = []

    def change(msg_type: int, flags: int, body: bytes) -> None:
        changes.append((msg_type, flags, body))

    for table in tables:
        base = BASE_CHAINS.get(table.name)
        if base is None or FAMILIES[table.family] != family:
            raise Unsupported(f"table {table.name}")
        change(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, _str(1, table.name))  # NFTA_TABLE_NAME
        for chain in table.chains:  # as iptables-nft: user chains first, built-in ones where first used
            change(NFT_MSG_NEWCHAIN, NLM_F_CREATE, _str(1, table.name) + _str(3, chain))
        for chain in dict.fromkeys(r.chain for r in table.rules if r.chain in BUILTIN_CHAINS):
            if chain not in base:
                raise Unsupported(f"{table.name} has no chain {chain}")
            hook, priority, chain_type = base[chain]
            # NFTA_CHAIN_TABLE, _NAME, _HOOK{HOOKNUM, PRIORITY}, _POLICY, _TYPE
            change(NFT_MSG_NEWCHAIN, NLM_F_CREATE, _str(1, table.name) + _str(3, chain)
                   + _nest(4, _u32(1, hook), _u32(2, priority)) + _u32(5, NF_ACCEPT) + _str(7, chain_type))
        for rule in table.rules:
            # NFTA_RULE_TABLE, _CHAIN, _EXPRESSIONS, _COMPAT{PROTO, FLAGS}
            exprs = rule_expressions(rule, table.family, table.chains)
            compat = _nest(5, _u32(1, rule.proto), _u32(2, 0))
            body = _str(1, table.name) + _str(2, rule.chain) + _nest(4, exprs) + compat
            change(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body)
    kind, last = NFNL_SUBSYS_NFTABLES << 8, seq + len(changes)
    out = [_message(NFNL_MSG_BATCH_BEGIN, 0, 0, seq, b"", res_id=NFNL_SUBSYS_NFTABLES)]
    out.extend(_message(kind | msg_type, family, flags | (NLM_F_ACK if n == last else 0), n, body)
               for n, (msg_type, flags, body) in enumerate(changes, seq + 1))
    out.append(_message(NFNL_MSG_BATCH_END, 0, 0, last + 1, b"", res_id=NFNL_SUBSYS_NFTABLES))
    return b"".join(out), last
