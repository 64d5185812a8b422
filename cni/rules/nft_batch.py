"""The nf_tables batch libnftables sends to create our table in a netns that has none, built here (pure).

`nft_text.create_text(table)` handed to libnftables costs ~0.6-0.8 ms for a sidecar pod's table, of
which the kernel's part is ~0.25 ms: the rest is parsing, a cache fetch (six netlink dumps) and a
user-name lookup per `meta skuid`; the plugin's `nft -f` process costs it milliseconds more. Both the
agent's ADD and the plugin's standalone ADD of a sidecar pod wait for it, so the same transaction is built
here from the table's canonical rule text and sent as it is (the agent: `backends/nftables/fresh_write`;
the plugin: `cni.kernel.nft_fresh`).

What is laid out is what the REDIRECT-mode sidecar tables use, encoded as libnftables 1.1 encodes it
in an `inet` table: `meta l4proto|nfproto|skuid|skgid [!=] v`, `iifname|oifname [!=] "name"` (the name
padded to IFNAMSIZ), `ip|ip6 saddr|daddr [!=] address[/prefix]` (the bytes a byte-aligned prefix covers, else
the whole address through a bitwise mask), `tcp|udp sport|dport [!=] port`, the verdicts `accept`,
`drop`, `return`, `jump`, `goto`, `redirect to :port`, and the comment (rule user data); and what the
ambient tables add: `meta|ct mark & MASK ==|!= VALUE`, `meta mark set ct mark` and `ct mark set ct mark &
MASK | VALUE` (marks in host byte order, as registers hold them). A match on a
header adds the dependency libnftables adds (`meta nfproto` before an address, `meta l4proto` before a
port) unless the rule established it already. Anything else raises `Unsupported` and the text goes to
libnftables (or `nft -f`) as before. The kernel test compares the rules the kernel holds afterwards
expression for expression with those libnftables writes from the same text, for every sidecar scenario.

The batch: BATCH_BEGIN, the table with NLM_F_EXCL (a table of that name already there fails the whole
batch with EEXIST, changing nothing: the caller then lists and replaces it the usual way), the chains,
the rules in order, BATCH_END; one acknowledgement (`cni.netlink.nft_messages`). Stdlib only and cheap
to import (no `re`, `ipaddress` or `functools`: the CNI plugin imports it).
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
    META_NFPROTO,
    META_OIFNAME,
    META_SKGID,
    META_SKUID,
    NF_ACCEPT,
    NF_DROP,
    NFPROTO_INET,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_GOTO,
    NFT_JUMP,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    NFT_RETURN,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    REG_1,
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
from cni.rules.networks import network
from cni.rules.nft_text import TABLE_FAMILY

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from cni.rules.nft_text import NftTable

HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
CHAIN_TYPES = ("filter", "nat", "route")
L4PROTOS = {"tcp": 6, "udp": 17}
NFPROTOS = {"ipv4": NFPROTO_IPV4, "ipv6": NFPROTO_IPV6}
ADDRESS_FAMILIES = {"ip": (4, NFPROTO_IPV4), "ip6": (6, NFPROTO_IPV6)}
PORT_OFFSETS = {"sport": 0, "dport": 2}
IFNAMSIZ = 16
COMMENT_MAX = 128  # NFTNL_UDATA_COMMENT_MAXLEN, the terminating NUL included
UDATA_RULE_COMMENT = 0
VERDICTS = {"accept": NF_ACCEPT, "drop": NF_DROP, "return": NFT_RETURN}
NF_NAT_RANGE_PROTO_SPECIFIED = 2
CT_MARK = 3  # NFT_CT_MARK
META_SET_KEY, META_SET_SREG = 2, 3  # NFTA_META_KEY, NFTA_META_SREG
CT_DREG, CT_KEY, CT_SREG = 1, 2, 4  # NFTA_CT_*


class Unsupported(ValueError):
    """Something this builder does not lay out: libnftables writes it."""


class _Rule:
    """The expressions of one rule, with the protocol context its matches established."""

    def __init__(self) -> None:
        self.exprs: list[bytes] = []
        self.nfproto: int | None = None
        self.l4proto: int | None = None
        self.comment: str | None = None
        self.final = False

    def add(self, *parts: bytes) -> None:
        if self.final:
            raise Unsupported("a match after the rule's verdict")
        self.exprs.extend(parts)

    def need_nfproto(self, nfproto: int) -> None:
        if self.nfproto is None:
            self.add(meta(META_NFPROTO), cmp(CMP_EQ, bytes((nfproto,))))
            self.nfproto = nfproto
        elif self.nfproto != nfproto:
            raise Unsupported("matches of two address families in one rule")

    def need_l4proto(self, l4proto: int) -> None:
        if self.l4proto is None:
            self.add(meta(META_L4PROTO), cmp(CMP_EQ, bytes((l4proto,))))
            self.l4proto = l4proto
        elif self.l4proto != l4proto:
            raise Unsupported("matches of two transport protocols in one rule")


def tokens(text: str) -> list[str]:
    """The words of a rule: a double-quoted string (spaces kept) or a run of non-space characters (what
    the regular expression `"[^"]*"|\\S+` finds, without importing `re`)."""
    out: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos].isspace():
            pos += 1
            continue
        if text[pos] == '"':
            close = text.find('"', pos + 1)
            if close >= 0:
                out.append(text[pos : close + 1])
                pos = close + 1
                continue
        start = pos
        while pos < end and not text[pos].isspace():
            pos += 1
        out.append(text[start:pos])
    return out


def _negated(words: list[str]) -> bool:
    if words and words[0] == "!=":
        words.pop(0)
        return True
    return False


def _take(words: list[str], what: str) -> str:
    if not words:
        raise Unsupported(f"{what} missing")
    return words.pop(0)


def _number(text: str, bits: int, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) >= 1 << bits:
        raise Unsupported(f"{what} {text!r}")
    return int(text)


def _quoted(text: str, what: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise Unsupported(f"{what} {text!r} not quoted")
    return text[1:-1]


def _meta(rule: _Rule, words: list[str]) -> None:
    key = _take(words, "meta key")
    negate = _negated(words)
    value = _take(words, f"meta {key} value")
    op = CMP_NEQ if negate else CMP_EQ
    if (key == "l4proto" and rule.l4proto is not None) or (key == "nfproto" and rule.nfproto is not None):
        raise Unsupported(f"meta {key} after the rule established it")  # nft may fold it: not laid out
    if key == "l4proto" and value in L4PROTOS:
        rule.add(meta(META_L4PROTO), cmp(op, bytes((L4PROTOS[value],))))
        if not negate:
            rule.l4proto = L4PROTOS[value]
    elif key == "nfproto" and value in NFPROTOS:
        rule.add(meta(META_NFPROTO), cmp(op, bytes((NFPROTOS[value],))))
        if not negate:
            rule.nfproto = NFPROTOS[value]
    elif key in ("skuid", "skgid"):
        ident = _number(value, 32, f"meta {key}")
        rule.add(meta(META_SKUID if key == "skuid" else META_SKGID), cmp(op, struct.pack("=I", ident)))
    else:
        raise Unsupported(f"meta {key} {value}")


def _hex32(text: str, what: str) -> bytes:
    """A 32-bit `0x...` value as a register holds a mark: host byte order."""
    digits = text[2:]
    if not text.startswith("0x") or not 0 < len(digits) <= 8 or any(c not in "0123456789abcdef" for c in digits):
        raise Unsupported(f"{what} {text!r}")
    return struct.pack("=I", int(digits, 16))


def _load_mark(source: str) -> bytes:
    """`meta mark` or `ct mark` into register 1."""
    return meta(META_MARK) if source == "meta" else expr("ct", u32(CT_DREG, REG_1), u32(CT_KEY, CT_MARK))


def _mark(rule: _Rule, source: str, words: list[str]) -> None:
    """`meta|ct mark & MASK ==|!= VALUE` (a match); `meta mark set ct mark` and `ct mark set ct mark & MASK |
    VALUE` (statements: the mark loaded, masked and set, in register 1)."""
    if (key := _take(words, f"{source} key")) != "mark":
        raise Unsupported(f"{source} {key}")
    word = _take(words, f"{source} mark operation")
    if word == "&":
        mask = _hex32(_take(words, "mark mask"), "mark mask")
        op = _take(words, "mark comparison")
        if op not in ("==", "!="):
            raise Unsupported(f"mark comparison {op!r}")
        value = _hex32(_take(words, "mark value"), "mark value")
        rule.add(_load_mark(source), bitwise(mask), cmp(CMP_EQ if op == "==" else CMP_NEQ, value))
        return
    if word != "set" or words[:2] != ["ct", "mark"]:
        raise Unsupported(f"{source} mark {word} {' '.join(words[:2])}")
    del words[:2]
    parts = [_load_mark("ct")]
    if words[:1] == ["&"]:  # (mark & MASK) | VALUE, as nft sends it: mark & (MASK & ~VALUE) ^ VALUE
        words.pop(0)
        mask = _hex32(_take(words, "mark mask"), "mark mask")
        if _take(words, "mark |") != "|":
            raise Unsupported("a mark mask without | VALUE")
        value = _hex32(_take(words, "mark value"), "mark value")
        parts.append(bitwise(bytes(m & ~v & 0xFF for m, v in zip(mask, value, strict=True)), value))
    if source == "meta":
        parts.append(expr("meta", u32(META_SET_KEY, META_MARK), u32(META_SET_SREG, REG_1)))
    else:
        parts.append(expr("ct", u32(CT_KEY, CT_MARK), u32(CT_SREG, REG_1)))
    rule.add(*parts)


def _interface(rule: _Rule, key: str, words: list[str]) -> None:
    negate = _negated(words)
    name = _quoted(_take(words, key), key)
    if not name or len(name) >= IFNAMSIZ or any(c in name for c in '*\\"'):
        raise Unsupported(f"{key} {name!r}")
    rule.add(meta(META_IIFNAME if key == "iifname" else META_OIFNAME),
             cmp(CMP_NEQ if negate else CMP_EQ, name.encode().ljust(IFNAMSIZ, b"\0")))


def _address(rule: _Rule, proto: str, words: list[str]) -> None:
    which = _take(words, f"{proto} field")
    if which not in ("saddr", "daddr"):
        raise Unsupported(f"{proto} {which}")
    negate = _negated(words)
    text = _take(words, f"{proto} {which} value")
    family, nfproto = ADDRESS_FAMILIES[proto]
    try:
        packed, mask = network(text, family)
    except ValueError as exc:
        raise Unsupported(f"{proto} {which} {text!r}") from exc
    if not any(mask):
        raise Unsupported(f"{proto} {which} {text!r}")
    rule.need_nfproto(nfproto)
    rule.add(*address(family, int(which == "daddr"), packed, mask, negate))


def _port(rule: _Rule, proto: str, words: list[str]) -> None:
    which = _take(words, f"{proto} field")
    if which not in PORT_OFFSETS:
        raise Unsupported(f"{proto} {which}")
    negate = _negated(words)
    port = _number(_take(words, f"{proto} {which} value"), 16, f"{proto} {which}")
    rule.need_l4proto(L4PROTOS[proto])
    rule.add(payload(BASE_TRANSPORT, PORT_OFFSETS[which], 2), cmp(CMP_NEQ if negate else CMP_EQ,
                                                                   struct.pack("!H", port)))


def _redirect(rule: _Rule, words: list[str]) -> None:
    if _take(words, "redirect target") != "to":
        raise Unsupported("a redirect without a port")
    target = _take(words, "redirect port")
    if not target.startswith(":"):
        raise Unsupported(f"redirect to {target}")
    port = _number(target[1:], 16, "redirect port")
    # the port in register 1, the range's lower end (NFTA_REDIR_REG_PROTO_MIN), and its flag
    rule.add(expr("immediate", u32(1, REG_1), nest(2, attr(1, struct.pack("!H", port)))),
             expr("redir", u32(1, REG_1), u32(3, NF_NAT_RANGE_PROTO_SPECIFIED)))
    rule.final = True


def _verdict(rule: _Rule, word: str, words: list[str], chains: frozenset[str]) -> None:
    if word in VERDICTS:
        rule.add(verdict(VERDICTS[word]))
    else:
        target = _take(words, f"{word} target")
        if target not in chains:
            raise Unsupported(f"{word} to {target}, not a chain of the table")
        rule.add(verdict(NFT_JUMP if word == "jump" else NFT_GOTO, target))
    rule.final = True


def rule_body(text: str, chains: frozenset[str]) -> tuple[bytes, bytes | None]:
    """(NFTA_RULE_EXPRESSIONS' content, NFTA_RULE_USERDATA or None) of one rule in canonical text."""
    words = tokens(text)
    rule = _Rule()
    while words:
        word = words.pop(0)
        if rule.comment is not None:
            raise Unsupported("something after the comment")
        if word == "ct" or (word == "meta" and words[:1] == ["mark"]):
            _mark(rule, word, words)
        elif word == "meta":
            _meta(rule, words)
        elif word in ("iifname", "oifname"):
            _interface(rule, word, words)
        elif word in ADDRESS_FAMILIES:
            _address(rule, word, words)
        elif word in L4PROTOS:
            _port(rule, word, words)
        elif word == "redirect":
            _redirect(rule, words)
        elif word in VERDICTS or word in ("jump", "goto"):
            _verdict(rule, word, words, chains)
        elif word == "comment":
            rule.comment = _quoted(_take(words, "comment"), "comment")
        else:
            raise Unsupported(f"{word!r} in {text!r}")
    if not rule.exprs:
        raise Unsupported(f"an empty rule {text!r}")
    userdata = None
    if rule.comment is not None:
        data = rule.comment.encode() + b"\0"
        if len(data) > COMMENT_MAX:
            raise Unsupported("a comment longer than nft takes")
        userdata = bytes((UDATA_RULE_COMMENT, len(data))) + data
    return b"".join(rule.exprs), userdata


def _chain_hook(hook: str) -> bytes:
    """NFTA_CHAIN_HOOK, _POLICY (accept) and _TYPE of `type <t> hook <h> priority <p>`."""
    words = hook.split()
    if len(words) != 6 or words[0] != "type" or words[2] != "hook" or words[4] != "priority":
        raise Unsupported(f"chain {hook!r}")
    kind, name, prio = words[1], words[3], words[5]
    if kind not in CHAIN_TYPES or name not in HOOKS:
        raise Unsupported(f"chain {hook!r}")
    if prio in PRIORITIES:
        priority = PRIORITIES[prio]
    elif prio.lstrip("-").isdigit():
        priority = int(prio)
    else:
        raise Unsupported(f"chain priority {prio!r}")
    return nest(4, u32(1, HOOKS[name]), u32(2, priority)) + u32(5, NF_ACCEPT) + string(7, kind)


def batch(table: NftTable, seq: int = 1) -> tuple[bytes, int]:
    """(the batch creating `table`, the sequence number the kernel acknowledges); Unsupported when a part
    of it is not laid out here."""
    if TABLE_FAMILY != "inet":
        raise Unsupported(f"table family {TABLE_FAMILY}")
    name = string(1, table.name)
    changes: list[Change] = [(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, name + u32(2, 0))]  # NAME, FLAGS
    chains = frozenset(c.name for c in table.chains)
    for chain in table.chains:  # NFTA_CHAIN_TABLE, _NAME (+ the hook of a base chain)
        hook = _chain_hook(chain.hook) if chain.hook is not None else b""
        changes.append((NFT_MSG_NEWCHAIN, NLM_F_CREATE, name + string(3, chain.name) + hook))
    for chain in table.chains:
        for text in chain.rules:  # NFTA_RULE_TABLE, _CHAIN, _EXPRESSIONS, _USERDATA
            exprs, userdata = rule_body(text, chains)
            body = name + string(2, chain.name) + nest(4, exprs) + (attr(7, userdata) if userdata else b"")
            changes.append((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body))
    return frame(changes, NFPROTO_INET, seq)
