"""The restore text for a new pod netns (a sidecar ADD, an ambient enrolment), read back into rule
records (pure).

`cni.rules.transition.fresh_text` writes a pod's rules for `iptables-restore --noflush` as
`*table`, `-N chain`, `-I BUILTIN <n> rule`, `-A chain rule`, `COMMIT`, every rule in iptables-save's
canonical form (`cni.rules.rule_text`). The agent can put such a text into the kernel itself (legacy:
`node_agent/backends/iptables/xt_fresh_write`, nft: `nft_fresh_write`), and so can the plugin on
iptables-nft (`cni.kernel.nft_fresh`); this module reads it into `XtRule` records with the data each
match and target holds in the kernel (the agent's `xt_blob` and `cni.rules.nft_compat_batch` lay them
out), without `ipaddress`, `socket` or `typing` (the plugin imports it), and
declines — `Unsupported`, the caller starts `iptables-restore` as before — anything outside the small
grammar the REDIRECT-mode sidecar rules and the ambient rules use: `-s`, `[!] -d`, `-i`, `[!] -o`,
`-p tcp|udp`, `-m tcp|udp [!] --dport N`, `-m owner [!] --uid-owner|--gid-owner N`,
`-m mark|connmark [!] --mark V[/M]`, `-m comment --comment TEXT`, `-j REDIRECT --to-ports N`,
`-j CONNMARK --set-xmark V/M | --restore-mark --nfmask M --ctmask M`, `-j RETURN|ACCEPT|DROP` and jumps
to chains the text creates; any number of tables, each its own block.
"""

from __future__ import annotations

import struct

from cni.contract.record import Record
from cni.rules.networks import network
from cni.rules.rule_text import arguments

BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")  # by netfilter hook number
VERDICTS = {"ACCEPT": -2, "DROP": -1, "RETURN": -5}  # -NF_ACCEPT-1, -NF_DROP-1, XT_RETURN (-NF_REPEAT-1)
PROTOCOLS = {"tcp": 6, "udp": 17}  # IPPROTO_TCP, IPPROTO_UDP
COMMENT_LEN = 256  # struct xt_comment_info
OWNER_UID, OWNER_GID = 1, 2  # XT_OWNER_UID, XT_OWNER_GID
PORT_INV_DST = 0x02  # XT_TCP_INV_DSTPT == XT_UDP_INV_DSTPT
CONNMARK_SET, CONNMARK_RESTORE = 0, 2  # XT_CONNMARK_SET, XT_CONNMARK_RESTORE
NAT_PROTO_SPECIFIED = 0x02  # NF_NAT_RANGE_PROTO_SPECIFIED
IFNAMSIZ = 16


class Unsupported(ValueError):
    """The text holds something this reader does not lay out itself (iptables-restore takes it)."""


class Extension(Record):
    """A match or a non-standard target: kernel name, revision, data (unpadded)."""

    __slots__ = ("data", "name", "revision")
    name: str
    revision: int
    data: bytes

    def __init__(self, name: str, revision: int, data: bytes) -> None:
        self._init(name=name, revision=revision, data=data)


class Address(Record):
    __slots__ = ("address", "mask")
    address: bytes  # network byte order, already masked
    mask: bytes

    def __init__(self, address: bytes, mask: bytes) -> None:
        self._init(address=address, mask=mask)


class XtRule(Record):
    __slots__ = ("chain", "dst", "in_if", "matches", "not_dst", "not_out_if", "out_if", "proto", "src", "target")
    chain: str
    src: Address | None
    dst: Address | None
    not_dst: bool
    in_if: str | None
    out_if: str | None
    not_out_if: bool
    proto: int  # 0: any
    matches: tuple[Extension, ...]
    target: Extension | str  # a standard verdict (ACCEPT/DROP/RETURN) or chain name, else the extension

    def __init__(self, chain: str, src: Address | None, dst: Address | None, not_dst: bool, in_if: str | None,
                 out_if: str | None, not_out_if: bool, proto: int, matches: tuple[Extension, ...],
                 target: Extension | str) -> None:
        self._init(chain=chain, src=src, dst=dst, not_dst=not_dst, in_if=in_if, out_if=out_if,
                   not_out_if=not_out_if, proto=proto, matches=matches, target=target)


class FreshTable(Record):
    __slots__ = ("chains", "family", "name", "rules")
    family: int
    name: str
    chains: tuple[str, ...]  # user chains the text creates, in its order
    rules: tuple[XtRule, ...]  # per chain in the order the kernel keeps them

    def __init__(self, family: int, name: str, chains: tuple[str, ...], rules: tuple[XtRule, ...]) -> None:
        self._init(family=family, name=name, chains=chains, rules=rules)


def read_fresh(text: str, family: int) -> tuple[FreshTable, ...]:
    """The tables of a fresh restore text, in its order; Unsupported for anything else."""
    if family not in (4, 6):
        raise Unsupported(f"address family {family!r}")
    tables: list[FreshTable] = []
    lines: list[str] | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if lines is not None:
                raise Unsupported("a table inside a table")
            if line[1:] in (t.name for t in tables):
                raise Unsupported(f"table {line[1:]} twice")
            lines = [line[1:]]
        elif lines is None:
            raise Unsupported(f"line outside a table: {line!r}")
        elif line == "COMMIT":
            tables.append(_table(lines[0], lines[1:], family))
            lines = None
        else:
            lines.append(line)
    if lines is not None or not tables:
        raise Unsupported("no committed table")
    return tuple(tables)


def _table(name: str, lines: list[str], family: int) -> FreshTable:
    chains: list[str] = []
    per_chain: dict[str, list[XtRule]] = {}
    for line in lines:
        args = arguments(line)
        if args[0] == "-N" and len(args) == 2:
            if args[1] in chains or args[1] in BUILTIN_CHAINS:
                raise Unsupported(f"chain {args[1]} declared twice")
            chains.append(args[1])
            per_chain[args[1]] = []
        elif args[0] == "-A" and len(args) > 2:
            per_chain.setdefault(args[1], []).append(_rule(args[1], args[2:], family))
        elif args[0] == "-I" and len(args) > 3 and args[2].isascii() and args[2].isdigit():
            where = per_chain.setdefault(args[1], [])
            position = int(args[2])
            if not 1 <= position <= len(where) + 1:
                raise Unsupported(f"-I {args[1]} {position} past the chain's end")
            where.insert(position - 1, _rule(args[1], args[3:], family))
        else:
            raise Unsupported(f"line {line!r}")
    for chain, chain_rules in per_chain.items():
        if chain not in chains and chain not in BUILTIN_CHAINS:
            raise Unsupported(f"rules in chain {chain}, which the text does not create")
        for r in chain_rules:
            if isinstance(r.target, str) and r.target not in VERDICTS and r.target not in chains:
                raise Unsupported(f"jump to {r.target}, which the text does not create")
    ordered = tuple(r for chain in per_chain for r in per_chain[chain])
    return FreshTable(family=family, name=name, chains=tuple(chains), rules=ordered)


def _rule(chain: str, args: list[str], family: int) -> XtRule:
    fields: dict[str, object] = {"src": None, "dst": None, "not_dst": False, "in_if": None, "out_if": None,
                                 "not_out_if": False, "proto": 0}
    matches: list[Extension] = []
    target: Extension | str | None = None
    negate = False
    i = 0

    def value() -> str:
        if i + 1 >= len(args):
            raise Unsupported(f"{args[i]} without a value")
        return args[i + 1]

    while i < len(args):
        opt = args[i]
        if opt == "!":
            if negate:
                raise Unsupported("double negation")
            negate = True
            i += 1
            continue
        if opt == "-s" and not negate and fields["src"] is None:
            fields["src"] = _address(value(), family)
        elif opt == "-d" and fields["dst"] is None:
            fields["dst"], fields["not_dst"] = _address(value(), family), negate
        elif opt == "-i" and not negate and fields["in_if"] is None:
            fields["in_if"] = _interface(value())
        elif opt == "-o" and fields["out_if"] is None:
            fields["out_if"], fields["not_out_if"] = _interface(value()), negate
        elif opt == "-p" and not negate and fields["proto"] == 0 and value() in PROTOCOLS:
            fields["proto"] = PROTOCOLS[value()]
        elif opt == "-m" and not negate:
            i, match = _match(args, i + 1, int(fields["proto"]))  # type: ignore[call-overload]
            matches.append(match)
            continue
        elif opt == "-j" and not negate and target is None:
            i, target = _target(args, i + 1, family)
            continue
        else:
            raise Unsupported(f"option {'! ' if negate else ''}{opt}")
        negate = False
        i += 2
    if negate or target is None:
        raise Unsupported("a rule without a target")
    return XtRule(chain=chain, matches=tuple(matches), target=target, **fields)  # type: ignore[arg-type]


def _address(text: str, family: int) -> Address:
    if "/" not in text:
        raise Unsupported(f"address {text!r} for IPv{family}")
    try:
        return Address(*network(text, family, strict=False))
    except ValueError:
        raise Unsupported(f"address {text!r} for IPv{family}") from None


def _interface(name: str) -> str:
    if not 0 < len(name) < IFNAMSIZ or name.endswith("+") or not name.isascii():
        raise Unsupported(f"interface {name!r}")
    return name


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 0xFFFF:
        raise Unsupported(f"port {text!r}")
    return int(text)


def _id(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) >= 0xFFFFFFFF:
        raise Unsupported(f"owner id {text!r}")
    return int(text)


def _match(args: list[str], i: int, proto: int) -> tuple[int, Extension]:
    """(index after the match's options, the match) for `-m NAME ...` starting at args[i] (NAME)."""
    name = args[i] if i < len(args) else ""
    opts = args[i + 1 :]
    negate = bool(opts) and opts[0] == "!"
    body = opts[1:] if negate else opts
    if name in PROTOCOLS and PROTOCOLS[name] == proto and len(body) >= 2 and body[0] == "--dport":
        port = _port(body[1])
        inv = PORT_INV_DST if negate else 0
        if name == "tcp":  # struct xt_tcp: spts[2], dpts[2], option, flg_mask, flg_cmp, invflags
            data = struct.pack("=HHHHBBBB", 0, 0xFFFF, port, port, 0, 0, 0, inv)
        else:  # struct xt_udp: spts[2], dpts[2], invflags
            data = struct.pack("=HHHHB", 0, 0xFFFF, port, port, inv)
        return i + 3 + negate, Extension(name, 0, data)
    if name in ("mark", "connmark") and len(body) >= 2 and body[0] == "--mark":
        mark, mask = _mark(body[1])  # xt_mark_mtinfo1 / xt_connmark_mtinfo1: mark, mask, invert (revision 1)
        return i + 3 + negate, Extension(name, 1, struct.pack("=IIB", mark, mask, 1 if negate else 0))
    if name == "owner" and len(body) >= 2 and body[0] in ("--uid-owner", "--gid-owner"):
        ident = _id(body[1])
        flag = OWNER_UID if body[0] == "--uid-owner" else OWNER_GID
        uid = ident if flag == OWNER_UID else 0
        gid = ident if flag == OWNER_GID else 0
        # struct xt_owner_match_info: uid_min, uid_max, gid_min, gid_max, match, invert (revision 1)
        data = struct.pack("=IIIIBB", uid, uid, gid, gid, flag, flag if negate else 0)
        return i + 3 + negate, Extension("owner", 1, data)
    if name == "comment" and not negate and len(body) >= 2 and body[0] == "--comment":
        raw = body[1].encode()
        if len(raw) >= COMMENT_LEN or b"\0" in raw:
            raise Unsupported("comment too long")
        return i + 3, Extension("comment", 0, raw.ljust(COMMENT_LEN, b"\0"))
    raise Unsupported(f"match -m {name} {' '.join(opts[:3])}")


def _target(args: list[str], i: int, family: int) -> tuple[int, Extension | str]:
    name = args[i] if i < len(args) else ""
    if name == "REDIRECT":
        if args[i + 1 : i + 2] != ["--to-ports"] or len(args) < i + 3:
            raise Unsupported("REDIRECT without --to-ports")
        port = struct.pack("!H", _port(args[i + 2]))
        if family == 4:  # nf_nat_ipv4_multi_range_compat: rangesize, {flags, min_ip, max_ip, min, max}
            data = struct.pack("=II4s4s2s2s", 1, NAT_PROTO_SPECIFIED, bytes(4), bytes(4), port, port)
        else:  # struct nf_nat_range: flags, min_addr, max_addr, min_proto, max_proto
            data = struct.pack("=I16s16s2s2s", NAT_PROTO_SPECIFIED, bytes(16), bytes(16), port, port)
        return i + 3, Extension("REDIRECT", 0, data)
    if name == "CONNMARK":
        return _connmark(args, i + 1)
    # a verdict or a jump (read_fresh checks that the chain is one the text creates)
    if not name.isidentifier() or i + 1 != len(args):
        raise Unsupported(f"target {' '.join(args[i:])!r}")
    return i + 1, name


def _u32(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise Unsupported(f"value {text!r}") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise Unsupported(f"value {text!r}")
    return value


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return _u32(value), _u32(mask) if mask else 0xFFFFFFFF


def _connmark(args: list[str], i: int) -> tuple[int, Extension]:
    """`-j CONNMARK --set-xmark V/M` or `--restore-mark --nfmask M --ctmask M` (the whole rest of the rule):
    struct xt_connmark_tginfo2 (revision 2): ctmark, ctmask, nfmask, shift_dir, shift_bits, mode."""
    opts = args[i:]
    if len(opts) == 2 and opts[0] == "--set-xmark":
        mark, mask = _mark(opts[1])
        data = struct.pack("=IIIBBB", mark, mask, 0xFFFFFFFF, 0, 0, CONNMARK_SET)  # nfmask as iptables sets it
    elif len(opts) == 5 and opts[0] == "--restore-mark" and opts[1] == "--nfmask" and opts[3] == "--ctmask":
        data = struct.pack("=IIIBBB", 0, _u32(opts[4]), _u32(opts[2]), 0, 0, CONNMARK_RESTORE)
    else:
        raise Unsupported(f"target CONNMARK {' '.join(opts)}")
    return len(args), Extension("CONNMARK", 2, data)
