"""nf_tables netlink messages and expressions, encoded (pure): the pieces a batch is made of.

Used by the writers that build a whole transaction themselves instead of asking a tool, the plugin's
and the agent's: the iptables-nft one (`cni.rules.nft_compat_batch`) and the native nftables one
(`cni.rules.nft_batch`). Attribute numbers are those of <linux/netfilter/nf_tables.h>.

A batch is BATCH_BEGIN, the change messages, BATCH_END (`frame`); the kernel applies it as one
transaction. Only the last change message asks for an acknowledgement: the kernel reports a failed
message (and a failed commit, on the batch's first message) anyway, so one answer means "all applied"
(`cni.kernel.nft_commit.commit_here` reads it). Stdlib only (`struct`): the CNI plugin imports it.
"""

from __future__ import annotations

import struct

from cni.netlink import netlink_parse

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Sequence

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_BATCH_GENID = 1  # the batch-begin message's attribute: the generation the batch was made for
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE = 0, 2, 3, 6
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x200, 0x400, 0x800
NLA_F_NESTED = 0x8000
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
NF_ACCEPT, NF_DROP = 1, 0
NFT_RETURN, NFT_JUMP, NFT_GOTO = -5, -3, -4
META_MARK, META_IIFNAME, META_OIFNAME, META_SKUID, META_SKGID, META_NFPROTO, META_L4PROTO = 3, 6, 7, 10, 11, 15, 16
BASE_NETWORK, BASE_TRANSPORT = 1, 2
CMP_EQ, CMP_NEQ = 0, 1
REG_VERDICT, REG_1 = 0, 1
ADDRESS_OFFSETS = {4: (12, 16), 6: (8, 24)}  # source, destination in the IPv4 / IPv6 header

# one change message: (message type, NLM_F_* flags, body)
Change = tuple[int, int, bytes]


_ATTR_HEAD = netlink_parse.NLATTR.pack
_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")  # by length % 4: to the next multiple of 4


def attr(kind: int, value: bytes) -> bytes:
    size = len(value)
    return _ATTR_HEAD(4 + size, kind) + value + _PADDING[size & 3]


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def string(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!i" if value < 0 else "!I", value))


def expr(name: str, *data: bytes) -> bytes:
    return nest(1, string(1, name), nest(2, *data))  # NFTA_LIST_ELEM: NFTA_EXPR_NAME, NFTA_EXPR_DATA


def meta(key: int) -> bytes:
    return expr("meta", u32(1, REG_1), u32(2, key))  # NFTA_META_DREG, NFTA_META_KEY


def cmp(op: int, value: bytes) -> bytes:
    return expr("cmp", u32(1, REG_1), u32(2, op), nest(3, attr(1, value)))  # SREG, OP, DATA{VALUE}


def payload(base: int, offset: int, length: int) -> bytes:
    return expr("payload", u32(1, REG_1), u32(2, base), u32(3, offset), u32(4, length))


def bitwise(mask: bytes, xor: bytes | None = None) -> bytes:  # SREG, DREG, LEN, MASK{VALUE}, XOR{VALUE}
    return expr("bitwise", u32(1, REG_1), u32(2, REG_1), u32(3, len(mask)), nest(4, attr(1, mask)),
                nest(5, attr(1, xor if xor is not None else bytes(len(mask)))))


def verdict(code: int, chain: str | None = None) -> bytes:
    body = u32(1, code) + (string(2, chain) if chain is not None else b"")
    return expr("immediate", u32(1, REG_VERDICT), nest(2, nest(2, body)))  # DREG, DATA{VERDICT{..}}


def address(family: int, which: int, address: bytes, mask: bytes, negate: bool) -> list[bytes]:
    """An address match as nft and iptables-nft write it: the payload load of the bytes a byte-aligned
    prefix covers and their comparison, or, for a prefix ending inside a byte, the whole address through
    a bitwise mask. which: 0 source, 1 destination. ValueError for a zero-length prefix."""
    whole = next((i for i, b in enumerate(mask) if b != 0xFF), len(mask))  # leading all-ones bytes
    partial = any(mask[whole:])
    if not partial and whole == 0:
        raise ValueError("a zero-length prefix")
    length = len(mask) if partial else whole
    out = [payload(BASE_NETWORK, ADDRESS_OFFSETS[family][which], length)]
    if partial:
        out.append(bitwise(mask))
    out.append(cmp(CMP_NEQ if negate else CMP_EQ, address[:length]))
    return out


def message(msg_type: int, family: int, flags: int, seq: int, body: bytes, res_id: int = 0) -> bytes:
    data = struct.pack("=BB", family, 0) + struct.pack("!H", res_id) + body  # nfgenmsg (res_id big-endian)
    hdr = netlink_parse.NLMSGHDR
    return hdr.pack(hdr.size + len(data), msg_type, NLM_F_REQUEST | flags, seq, 0) + data


def frame(changes: Sequence[Change], family: int, seq: int) -> tuple[bytes, int]:
    """(the batch of `changes` in `family`, the sequence number of its last change message: the one asking
    for the acknowledgement)."""
    return frame_families([(family, c) for c in changes], seq)


def frame_families(changes: Sequence[tuple[int, Change]], seq: int, genid: int = 0) -> tuple[bytes, int]:
    """`frame` for changes of several families (family, change): still one transaction. `genid` (not 0):
    the ruleset generation the batch was made for; the kernel refuses it (ERESTART, nothing applied) when
    the netns' generation is another one by the time it takes the batch (checked under its commit lock)."""
    kind, last = NFNL_SUBSYS_NFTABLES << 8, seq + len(changes)
    begin = u32(NFNL_BATCH_GENID, genid) if genid else b""
    out = [message(NFNL_MSG_BATCH_BEGIN, 0, 0, seq, begin, res_id=NFNL_SUBSYS_NFTABLES)]
    out.extend(message(kind | msg_type, family, flags | (NLM_F_ACK if n == last else 0), n, body)
               for n, (family, (msg_type, flags, body)) in enumerate(changes, seq + 1))
    out.append(message(NFNL_MSG_BATCH_END, 0, 0, last + 1, b"", res_id=NFNL_SUBSYS_NFTABLES))
    return b"".join(out), last


def delete_tables(tables: Sequence[tuple[int, str]], seq: int = 1, genid: int = 0) -> tuple[bytes, int]:
    """One transaction deleting these tables, (NFPROTO_* family, name) each (NFT_MSG_DELTABLE by name);
    `frame_families`' pair (`genid`: as there)."""
    changes = [(family, (NFT_MSG_DELTABLE, 0, string(1, name))) for family, name in tables]
    return frame_families(changes, seq, genid)
