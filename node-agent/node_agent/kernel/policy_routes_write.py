"""Add and delete a pod netns' policy routing in-process over rtnetlink (what `ip rule add|del` and
`ip route add|del local default dev lo table T` do), so the agent's nftables backend starts no process.

The caller has entered the pod netns (`cni.kernel.netns.entered`): the NETLINK_ROUTE socket is made in
the calling thread's netns. Per family one rule and one route of a `Routing` (cni.rules.tproxy_routes):

    rule:  pref PREF  from all  fwmark MARK[/MASK]  lookup TABLE
    route: local default dev lo  table TABLE

Adds carry NLM_F_CREATE|NLM_F_EXCL: an entry that is already there answers EEXIST, which is success
(the exact entry exists) and is not reported as created, so a rollback (`delete`) takes back only what
this call made. Deletes treat ENOENT/ESRCH as success. Request building and the error mapping are pure
and unit-tested; the kernel tests compare the result with what `ip` prints.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cni.kernel.loopback_address import LOOPBACK_INDEX
from cni.netlink import netlink_parse
from node_agent.kernel.policy_routes_read import Routing

RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
FR_ACT_TO_TBL = 1
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
RTA_OIF, RTA_TABLE = 4, 15
RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, RT_TABLE_UNSPEC = 3, 254, 2, 0
_HDR = struct.Struct("=BBBBBBBBI")  # fib_rule_hdr and rtmsg (12 bytes)
_ATTR_U32 = struct.Struct("=HHI")
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_EXISTS = frozenset({errno.EEXIST})
_ABSENT = frozenset({errno.ENOENT, errno.ESRCH})


@dataclass(frozen=True)
class Entry:
    """One rule or route of one family (what a rollback deletes)."""

    kind: str  # "rule" | "route"
    family: int

    def describe(self, routing: Routing) -> str:
        if self.kind == "rule":
            return f"IPv{self.family} rule 'pref {routing.pref} fwmark {routing.fwmark} lookup {routing.table}'"
        return f"IPv{self.family} route 'local default dev lo table {routing.table}'"


def _u32(attr_type: int, value: int) -> bytes:
    return _ATTR_U32.pack(_ATTR_U32.size, attr_type, value)


def request(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    """An rtnetlink request that asks for an acknowledgement (pure)."""
    hdr = netlink_parse.NLMSGHDR
    return hdr.pack(hdr.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0) + body


def rule_request(add: bool, family: int, routing: Routing, seq: int) -> bytes:
    """RTM_NEWRULE (create, exclusive) or RTM_DELRULE for `routing`'s rule in `family` (pure)."""
    table = routing.table if routing.table < 256 else RT_TABLE_UNSPEC
    body = _HDR.pack(_AF[family], 0, 0, 0, table, 0, 0, FR_ACT_TO_TBL, 0)
    body += _u32(FRA_PRIORITY, routing.pref) + _u32(FRA_FWMARK, routing.mark) + _u32(FRA_TABLE, routing.table)
    if routing.mask is not None:
        body += _u32(FRA_FWMASK, routing.mask)
    if add:
        return request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, seq, body)
    return request(RTM_DELRULE, 0, seq, body)


def route_request(add: bool, family: int, routing: Routing, seq: int) -> bytes:
    """RTM_NEWROUTE (create, exclusive) or RTM_DELROUTE for `local default dev lo table T` (pure)."""
    table = routing.table if routing.table < 256 else RT_TABLE_UNSPEC
    body = _HDR.pack(_AF[family], 0, 0, 0, table, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, 0)
    body += _u32(RTA_TABLE, routing.table) + _u32(RTA_OIF, LOOPBACK_INDEX)
    if add:
        return request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq, body)
    return request(RTM_DELROUTE, 0, seq, body)


def ack_errno(data: bytes, seq: int) -> int | None:
    """The errno of the acknowledgement of request `seq` (0: done), None when the read holds none (pure)."""
    try:
        for msg_type, msg_seq, payload in netlink_parse.messages(data):
            if msg_seq == seq and msg_type == netlink_parse.NLMSG_ERROR:
                return netlink_parse.error_code(payload)
    except netlink_parse.NetlinkParseError:
        return errno.EPROTO
    return None


def ask(sock: socket.socket, message: bytes, seq: int) -> int:
    """Send one request (made with `request`) and wait for its acknowledgement: its errno (0: done)."""
    sock.send(message)
    while True:
        err = ack_errno(sock.recv(65536), seq)
        if err is not None:
            return err


def _entries(families: Iterable[int]) -> list[Entry]:
    return [Entry(kind, f) for f in families for kind in ("rule", "route")]


def _request(entry: Entry, add: bool, routing: Routing, seq: int) -> bytes:
    build = rule_request if entry.kind == "rule" else route_request
    return build(add, entry.family, routing, seq)


def _run(entries: list[Entry], add: bool, routing: Routing, timeout: float) -> tuple[list[Entry], OSError | None]:
    """Send each entry's request in order; (entries changed, the first unexpected error or None)."""
    fine = _EXISTS if add else _ABSENT
    changed: list[Entry] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        for seq, entry in enumerate(entries, 1):
            err = ask(sock, _request(entry, add, routing, seq), seq)
            if err == 0:
                changed.append(entry)
            elif err not in fine:
                verb = "adding" if add else "deleting"
                return changed, OSError(err, f"{verb} {entry.describe(routing)}: {os.strerror(err)}")
    return changed, None


def add_here(families: Iterable[int], routing: Routing, timeout: float = 2.0) -> list[Entry]:
    """`routing` in every family of the calling thread's netns, all or none: the entries this call created
    (for `delete_here` as a rollback). OSError when the kernel refuses one (what was created is deleted)."""
    created, error = _run(_entries(families), True, routing, timeout)
    if error is not None:
        if created:
            _run(list(reversed(created)), False, routing, timeout)
        raise error
    return created


def delete_here(entries: list[Entry], routing: Routing, timeout: float = 2.0) -> None:
    """Delete these entries (absent ones are fine); OSError on any other refusal."""
    _, error = _run(entries, False, routing, timeout)
    if error is not None:
        raise error


def remove_here(families: Iterable[int], routing: Routing, timeout: float = 2.0) -> None:
    """Delete `routing`'s rule and route of these families (absent ones are fine); OSError otherwise."""
    delete_here(_entries(families), routing, timeout)
