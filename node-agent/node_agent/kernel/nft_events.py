"""Change notifications of one network namespace: what the drift check reads there, announced.

- nf_tables: a netlink socket subscribed to NFNLGRP_NFTABLES. Every nf_tables commit in a netns (native
  nftables and iptables-nft alike, whatever the table) is announced to that netns' listeners: one message
  per object changed (table, chain, rule, set...) and a closing NFT_MSG_NEWGEN carrying the new ruleset
  generation. Reads (`nft list`, iptables-nft-save) announce nothing.
- routing: a NETLINK_ROUTE socket subscribed to the IPv4/IPv6 rule, route and address groups: the policy
  routing of ambient and TPROXY pods and `::6` on `lo` (which no nf_tables message covers).

A socket belongs to the netns it was created in, for good: `subscribe` creates both on a pooled thread
that enters the pod netns and comes back (node_agent.kernel.netns_runner), and the caller's threads never
move. The sockets are non-blocking; `drain` reads what is queued and tells whether anything was
announced. A receive buffer overrun (ENOBUFS: more announced than the socket held) counts as a change.
Parsing is pure (`changes_in`) and unit-tested.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from cni.kernel.netns import NetnsThreadTimeout
from cni.netlink import netlink_parse
from cni.netlink.nft_messages import NFNL_SUBSYS_NFTABLES
from node_agent.kernel.fd_limit import moved_high
from node_agent.kernel.netns_runner import run_in_netns

NFNLGRP_NFTABLES = 7
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1
NFGENMSG_SIZE = 4  # nfgenmsg: family, version, res_id
RCVBUF = 256 * 1024  # an overrun is harmless (a change all the same) but costs a full check
# RTNLGRP_IPV4_IFADDR 5, IPV4_ROUTE 7, IPV4_RULE 8, IPV6_IFADDR 9, IPV6_ROUTE 11, IPV6_RULE 19
ROUTE_GROUPS = sum(1 << (group - 1) for group in (5, 7, 8, 9, 11, 19))


class NftEventsError(Exception):
    """The subscription could not be made (the caller polls this pod instead)."""


@dataclass(frozen=True)
class Changes:
    """What one read held: nf_tables messages and the last generation announced (None: no NEWGEN)."""

    messages: int
    generation: int | None


def changes_in(data: bytes) -> Changes:
    """The nf_tables announcements in one read (other subsystems' messages are not counted). Raises
    netlink_parse.NetlinkParseError for a truncated message."""
    count, generation = 0, None
    for msg_type, _seq, payload in netlink_parse.messages(data):
        if msg_type >> 8 != NFNL_SUBSYS_NFTABLES:
            continue
        count += 1
        if msg_type & 0xFF == NFT_MSG_NEWGEN:
            for attr_type, value in netlink_parse.attributes(payload[NFGENMSG_SIZE:]):
                if attr_type == NFTA_GEN_ID and len(value) >= 4:
                    generation = int.from_bytes(value[:4], "big")
    return Changes(count, generation)


def _open(proto: int, groups: int) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        s.bind((0, groups))
    except BaseException:
        s.close()
        raise
    return moved_high(s)  # one or two per watched pod: kept off the descriptors select() can take


def _open_here(routing: bool) -> tuple[socket.socket, ...]:
    nft = _open(netlink_parse.NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1))
    if not routing:
        return (nft,)
    try:
        return nft, _open(socket.NETLINK_ROUTE, ROUTE_GROUPS)
    except BaseException:
        nft.close()
        raise


def subscribe(netns_path: str, routing: bool = True, timeout: float = 2.0) -> tuple[socket.socket, ...]:
    """Non-blocking sockets receiving the nf_tables (and, `routing`, the routing) announcements of the netns
    at netns_path."""
    try:
        return run_in_netns(netns_path, lambda: _open_here(routing), timeout=timeout)
    except NetnsThreadTimeout:
        raise NftEventsError(f"no answer from {netns_path} within {timeout:.0f}s") from None
    except Exception as exc:  # cannot enter the netns, or no nfnetlink
        raise NftEventsError(f"cannot subscribe to changes in {netns_path}: {exc}") from exc


def _routing(sock: socket.socket) -> bool:
    return getattr(sock, "family", None) == socket.AF_NETLINK and getattr(sock, "proto", None) == socket.NETLINK_ROUTE


def drain(sock: socket.socket) -> bool:
    """Read everything queued; True when any change was announced (or some were lost)."""
    changed = False
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return changed
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # announcements were dropped: something changed
                changed = True
                continue
            raise
        if not data:
            return changed
        if _routing(sock):
            changed = True  # only the groups that matter are subscribed: any message is a change
            continue
        try:
            changed = changed or changes_in(data).messages > 0
        except netlink_parse.NetlinkParseError:
            changed = True
