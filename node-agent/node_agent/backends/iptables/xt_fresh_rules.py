"""The restore text of an ADD into a new pod netns, read back into rule records (pure).

`cni.rules.transition.fresh_text` writes a sidecar pod's rules for `iptables-restore --noflush` as
`*table`, `-N chain`, `-I BUILTIN <n> rule`, `-A chain rule`, `COMMIT`, every rule in iptables-save's
canonical form (`cni.rules.rule_text`). The agent can put such a text into the kernel itself
(legacy: `xt_fresh_write`, nft: `nft_fresh_write`); this module reads it into `XtRule` records with the
data each match and target holds in the kernel (`xt_blob` and `nft_compat_batch` lay them out), and
declines — `Unsupported`, the caller starts `iptables-restore` as before — anything outside the small
grammar the REDIRECT-mode sidecar rules use: `-s`, `[!] -d`, `-i`, `[!] -o`, `-p tcp`,
`-m tcp [!] --dport N`, `-m owner [!] --uid-owner|--gid-owner N`, `-m comment --comment TEXT`,
`-j REDIRECT --to-ports N`, `-j RETURN|ACCEPT|DROP` and jumps to chains the text creates. One table per
text (a text naming two tables is two kernel transactions: declined).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

from cni.rules.rule_text import arguments

BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")  # by netfilter hook number
VERDICTS = {"ACCEPT": -2, "DROP": -1, "RETURN": -5}  # -NF_ACCEPT-1, -NF_DROP-1, XT_RETURN (-NF_REPEAT-1)
PROTOCOLS = {"tcp": socket.IPPROTO_TCP}
COMMENT_LEN = 256  # struct xt_comment_info
OWNER_UID, OWNER_GID = 1, 2  # XT_OWNER_UID, XT_OWNER_GID
PORT_INV_DST = 0x02  # XT_TCP_INV_DSTPT
NAT_PROTO_SPECIFIED = 0x02  # NF_NAT_RANGE_PROTO_SPECIFIED
IFNAMSIZ = 16


class Unsupported(ValueError):
    """The text holds something this reader does not lay out itself (iptables-restore takes it)."""


class Extension(NamedTuple):
    """A match or a non-standard target: kernel name, revision, data (unpadded)."""

    name: str
    revision: int
    data: bytes


class Address(NamedTuple):
    address: bytes  # network byte order, already masked
    mask: bytes


class XtRule(NamedTuple):
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


class FreshTable(NamedTuple):
    family: int
    name: str
    chains: tuple[str, ...]  # user chains the text creates, in its order
    rules: tuple[XtRule, ...]  # per chain in the order the kernel keeps them


def read_fresh(text: str, family: int) -> FreshTable:
    """The one table of a fresh restore text; Unsupported for anything else."""
    if family not in (4, 6):
        raise Unsupported(f"address family {family!r}")
    table: str | None = None
    committed = False
    chains: list[str] = []
    per_chain: dict[str, list[XtRule]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if committed:
            raise Unsupported("more than one table")
        if line.startswith("*"):
            if table is not None:
                raise Unsupported("a table inside a table")
            table = line[1:]
            continue
        if table is None:
            raise Unsupported(f"line outside a table: {line!r}")
        if line == "COMMIT":
            committed = True
            continue
        args = arguments(line)
        if args[0] == "-N" and len(args) == 2:
            if args[1] in chains or args[1] in BUILTIN_CHAINS:
                raise Unsupported(f"chain {args[1]} declared twice")
            chains.append(args[1])
            per_chain[args[1]] = []
        elif args[0] == "-A" and len(args) > 2:
            per_chain.setdefault(args[1], []).append(_rule(args[1], args[2:], family))
        elif args[0] == "-I" and len(args) > 3 and args[2].isdigit():
            where = per_chain.setdefault(args[1], [])
            position = int(args[2])
            if not 1 <= position <= len(where) + 1:
                raise Unsupported(f"-I {args[1]} {position} past the chain's end")
            where.insert(position - 1, _rule(args[1], args[3:], family))
        else:
            raise Unsupported(f"line {line!r}")
    if table is None or not committed:
        raise Unsupported("no committed table")
    for chain, chain_rules in per_chain.items():
        if chain not in chains and chain not in BUILTIN_CHAINS:
            raise Unsupported(f"rules in chain {chain}, which the text does not create")
        for r in chain_rules:
            if isinstance(r.target, str) and r.target not in VERDICTS and r.target not in chains:
                raise Unsupported(f"jump to {r.target}, which the text does not create")
    ordered = tuple(r for chain in per_chain for r in per_chain[chain])
    return FreshTable(family=family, name=table, chains=tuple(chains), rules=ordered)


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
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise Unsupported(f"address {text!r}") from None
    if net.version != family or "/" not in text:
        raise Unsupported(f"address {text!r} for IPv{family}")
    return Address(net.network_address.packed, net.netmask.packed)


def _interface(name: str) -> str:
    if not 0 < len(name) < IFNAMSIZ or name.endswith("+") or not name.isascii():
        raise Unsupported(f"interface {name!r}")
    return name


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 0xFFFF:
        raise Unsupported(f"port {text!r}")
    return int(text)


def _id(text: str) -> int:
    if not text.isdigit() or int(text) >= 0xFFFFFFFF:
        raise Unsupported(f"owner id {text!r}")
    return int(text)


def _match(args: list[str], i: int, proto: int) -> tuple[int, Extension]:
    """(index after the match's options, the match) for `-m NAME ...` starting at args[i] (NAME)."""
    name = args[i] if i < len(args) else ""
    opts = args[i + 1 :]
    negate = bool(opts) and opts[0] == "!"
    body = opts[1:] if negate else opts
    if name == "tcp" and proto == PROTOCOLS["tcp"] and len(body) >= 2 and body[0] == "--dport":
        port = _port(body[1])
        # struct xt_tcp: spts[2], dpts[2], option, flg_mask, flg_cmp, invflags
        data = struct.pack("=HHHHBBBB", 0, 0xFFFF, port, port, 0, 0, 0, PORT_INV_DST if negate else 0)
        return i + 3 + negate, Extension(name, 0, data)
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
    # a verdict or a jump (read_fresh checks that the chain is one the text creates)
    if not name.isidentifier() or i + 1 != len(args):
        raise Unsupported(f"target {' '.join(args[i:])!r}")
    return i + 1, name
