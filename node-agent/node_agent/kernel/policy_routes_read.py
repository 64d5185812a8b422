"""Read a pod netns' policy routing in-process (rtnetlink rule and route dumps), for drift checks that must
not spawn anything: is the `Routing` (cni.rules.tproxy_routes) of each family in place?

A pooled thread enters the netns (node_agent.kernel.netns_runner: setns moves only that thread),
opens a NETLINK_ROUTE socket there and dumps the family's rules and routes. Request building and reply
parsing are pure and unit-tested; the problem texts are the same as `tproxy_routes.check_problems`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cni.kernel.netns import NetnsThreadTimeout
from cni.netlink import netlink_parse
from node_agent.kernel.netns_runner import run_in_netns

RTM_NEWROUTE, RTM_GETROUTE, RTM_NEWRULE, RTM_GETRULE = 24, 26, 32, 34
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTN_LOCAL = 2
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
# selectors that would narrow a rule (dst, src, iif, tun_id, l3mdev, oif, uid range, ip proto, ports)
FRA_SELECTORS = frozenset({1, 2, 3, 12, 17, 19, 20, 22, 23, 24})
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
_HDR = struct.Struct("=BBBBBBBBI")  # fib_rule_hdr and rtmsg have the same layout (12 bytes)
_U32 = struct.Struct("=I")


class Routing(Protocol):
    """What is read for (cni.rules.tproxy_routes.Routing: TPROXY, AMBIENT)."""

    @property
    def pref(self) -> int: ...
    @property
    def mark(self) -> int: ...
    @property
    def mask(self) -> int | None: ...
    @property
    def table(self) -> int: ...
    @property
    def fwmark(self) -> str: ...


class PolicyRoutesReadError(Exception):
    """The rules or routes could not be read (the caller falls back to `ip`)."""


@dataclass(frozen=True)
class Rule:
    priority: int
    mark: int
    mask: int
    table: int
    plain: bool  # action "lookup", no inversion, no other selector


@dataclass(frozen=True)
class Route:
    table: int
    rtype: int
    dst_len: int
    oif: int


def dump_request(msg_type: int, family: int, seq: int, table: int | None = None) -> bytes:
    """A rule or route dump request; `table` (routes, on a socket with NETLINK_GET_STRICT_CHK): only the
    routes of that table come back."""
    body = _HDR.pack(family, 0, 0, 0, table if table is not None and table < 256 else 0, 0, 0, 0, 0)
    if table is not None:
        body += struct.pack("=HHI", 8, RTA_TABLE, table)
    hdr = netlink_parse.NLMSGHDR
    return hdr.pack(hdr.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _u32(value: bytes) -> int:
    return int(_U32.unpack_from(value)[0]) if len(value) >= 4 else 0


def parse_rule(payload: bytes) -> Rule:
    _fam, dst_len, src_len, _tos, table, _r1, _r2, action, flags = _HDR.unpack_from(payload)
    attrs = dict(netlink_parse.attributes(payload[_HDR.size :]))
    plain = (
        action == FR_ACT_TO_TBL
        and not flags & FIB_RULE_INVERT
        and dst_len == 0
        and src_len == 0
        and not FRA_SELECTORS & set(attrs)
    )
    return Rule(
        priority=_u32(attrs.get(FRA_PRIORITY, b"")),
        mark=_u32(attrs.get(FRA_FWMARK, b"")),
        mask=_u32(attrs[FRA_FWMASK]) if FRA_FWMASK in attrs else 0xFFFFFFFF,
        table=_u32(attrs[FRA_TABLE]) if FRA_TABLE in attrs else table,
        plain=plain,
    )


def parse_route(payload: bytes) -> Route:
    _fam, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = _HDR.unpack_from(payload)
    attrs = dict(netlink_parse.attributes(payload[_HDR.size :]))
    return Route(
        table=_u32(attrs[RTA_TABLE]) if RTA_TABLE in attrs else table,
        rtype=rtype,
        dst_len=dst_len,
        oif=_u32(attrs.get(RTA_OIF, b"")),
    )


def parse_dump(data: bytes, seq: int, want: int) -> tuple[list[bytes], bool]:
    """(payloads of the `want` messages answering `seq`, whether NLMSG_DONE was seen) of one read."""
    try:
        answers, done = netlink_parse.dump_answers(data, seq)
    except (netlink_parse.NetlinkAnswerError, netlink_parse.NetlinkParseError) as exc:
        raise PolicyRoutesReadError(str(exc)) from None
    return [payload for msg_type, payload in answers if msg_type == want and len(payload) >= _HDR.size], done


def routing_problems(family: int, rules: Iterable[Rule], routes: Iterable[Route], lo: int, r: Routing) -> list[str]:
    """What is missing of `r` in one family (same texts as tproxy_routes.check_problems)."""
    mask = 0xFFFFFFFF if r.mask is None else r.mask
    rule_ok = any(x.plain and (x.priority, x.mark, x.mask, x.table) == (r.pref, r.mark, mask, r.table) for x in rules)
    route_ok = any((x.table, x.rtype, x.dst_len, x.oif) == (r.table, RTN_LOCAL, 0, lo) for x in routes)
    problems: list[str] = []
    if not rule_ok:
        problems.append(
            f"IPv{family} policy routing: ip rule 'pref {r.pref} fwmark {r.fwmark} lookup {r.table}' is missing"
        )
    if not route_ok:
        problems.append(f"IPv{family} policy routing: route 'local default dev lo' in table {r.table} is missing")
    return problems


def _dump(s: socket.socket, msg_type: int, want: int, family: int, seq: int, table: int | None = None) -> list[bytes]:
    s.send(dump_request(msg_type, family, seq, table))
    out: list[bytes] = []
    while True:
        got, done = parse_dump(s.recv(1 << 16), seq, want)
        out += got
        if done:
            return out


def check_here(families: Iterable[int], routing: Routing, timeout: float = 2.0) -> list[str]:
    """Problems with `routing` in the calling thread's netns (the caller has entered it)."""
    lo = socket.if_nametoindex("lo")
    problems: list[str] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
        s.settimeout(timeout)
        s.bind((0, 0))
        table = None
        try:  # the kernel filters the route dump by table (Linux >= 4.20): ours only, not every local route
            s.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            table = routing.table
        except OSError:
            pass
        for seq, family in enumerate(families, 1):
            af = socket.AF_INET6 if family == 6 else socket.AF_INET
            rules = [parse_rule(p) for p in _dump(s, RTM_GETRULE, RTM_NEWRULE, af, seq * 2)]
            routes = [parse_route(p) for p in _dump(s, RTM_GETROUTE, RTM_NEWROUTE, af, seq * 2 + 1, table)]
            problems += routing_problems(family, rules, routes, lo, routing)
    return problems


def check_routing(netns_path: str, families: Iterable[int], routing: Routing, timeout: float = 2.0) -> list[str]:
    """Problems with `routing` in the netns at netns_path, per family; PolicyRoutesReadError if unreadable."""
    fams = tuple(families)
    try:
        return run_in_netns(netns_path, lambda: check_here(fams, routing, timeout), timeout=timeout + 1.0)
    except NetnsThreadTimeout:
        raise PolicyRoutesReadError(f"no answer from {netns_path} within {timeout:.0f}s") from None
    except PolicyRoutesReadError:
        raise
    except Exception as exc:  # the thread's error (cannot enter, netlink failed)
        raise PolicyRoutesReadError(str(exc)) from exc
