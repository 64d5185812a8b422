"""The in-process policy-routing writer (pure part): the rtnetlink requests and the acknowledgement."""

from __future__ import annotations

import errno
import struct

from node_agent.kernel import policy_routes_read as pr
from node_agent.kernel import policy_routes_write as prw

from cni.kernel.loopback_address import LOOPBACK_INDEX
from cni.netlink import netlink_parse
from cni.rules.tproxy_routes import AMBIENT, TPROXY

NLMSGHDR = struct.Struct("=IHHII")


def header(request: bytes) -> tuple[int, int, int, int, int]:
    return NLMSGHDR.unpack_from(request)


def test_rule_requests_read_back_as_the_routing() -> None:
    add = prw.rule_request(True, 6, AMBIENT, 5)
    length, msg_type, flags, seq, _ = header(add)
    assert (length, msg_type, seq) == (len(add), prw.RTM_NEWRULE, 5)
    assert flags == prw.NLM_F_REQUEST | prw.NLM_F_ACK | prw.NLM_F_CREATE | prw.NLM_F_EXCL
    assert add[16] == 10  # AF_INET6
    rule = pr.parse_rule(add[16:])
    assert (rule.priority, rule.mark, rule.mask, rule.table, rule.plain) == (32764, 0x111, 0xFFF, 100, True)
    delete = prw.rule_request(False, 4, TPROXY, 6)
    assert header(delete)[1:3] == (prw.RTM_DELRULE, prw.NLM_F_REQUEST | prw.NLM_F_ACK)
    rule = pr.parse_rule(delete[16:])  # no mask sent: the kernel's full mask
    assert (rule.priority, rule.mark, rule.mask, rule.table) == (TPROXY.pref, TPROXY.mark, 0xFFFFFFFF, TPROXY.table)
    assert pr.FRA_FWMASK not in dict(netlink_parse.attributes(delete[16 + 12 :]))


def test_route_requests_read_back_as_local_default_on_lo() -> None:
    add = prw.route_request(True, 4, AMBIENT, 9)
    assert header(add)[1:4] == (prw.RTM_NEWROUTE, prw.NLM_F_REQUEST | prw.NLM_F_ACK | prw.NLM_F_CREATE
                                | prw.NLM_F_EXCL, 9)
    route = pr.parse_route(add[16:])
    assert (route.table, route.rtype, route.dst_len, route.oif) == (100, pr.RTN_LOCAL, 0, LOOPBACK_INDEX)
    assert add[16 + 5 : 16 + 7] == bytes([prw.RTPROT_BOOT, prw.RT_SCOPE_HOST])
    assert header(prw.route_request(False, 6, AMBIENT, 1))[1] == prw.RTM_DELROUTE


def test_ack_errno() -> None:
    def ack(seq: int, err: int) -> bytes:
        payload = struct.pack("=i", -err) + b"\0" * 16
        return NLMSGHDR.pack(16 + len(payload), 2, 0, seq, 0) + payload

    assert prw.ack_errno(ack(3, 0), 3) == 0
    assert prw.ack_errno(ack(3, errno.EEXIST), 3) == errno.EEXIST
    assert prw.ack_errno(ack(4, errno.EEXIST), 3) is None  # another request's answer
    assert prw.ack_errno(NLMSGHDR.pack(400, 2, 0, 3, 0), 3) == errno.EPROTO  # runs past the read


def test_entry_descriptions() -> None:
    assert prw.Entry("rule", 4).describe(AMBIENT) == "IPv4 rule 'pref 32764 fwmark 0x111/0xfff lookup 100'"
    assert prw.Entry("route", 6).describe(TPROXY) == "IPv6 route 'local default dev lo table 133'"
