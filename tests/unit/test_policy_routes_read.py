"""The in-process policy-routing reader (pure part): dump requests and the parsing of rule/route replies."""

from __future__ import annotations

import struct

import pytest
from node_agent.kernel import policy_routes_read as pr

from cni.rules.tproxy_routes import AMBIENT, TPROXY

HDR = struct.Struct("=BBBBBBBBI")


def attr(kind: int, value: int) -> bytes:
    return struct.pack("=HHI", 8, kind, value)


def message(msg_type: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), msg_type, 0, seq, 0) + payload


def rule_payload(prio: int, mark: int, mask: int, table: int, *, action: int = 1, extra: bytes = b"") -> bytes:
    head = HDR.pack(2, 0, 0, 0, table if table < 256 else 252, 0, 0, action, 0)
    return (
        head
        + attr(pr.FRA_PRIORITY, prio)
        + attr(pr.FRA_FWMARK, mark)
        + attr(pr.FRA_FWMASK, mask)
        + (attr(pr.FRA_TABLE, table) + extra)
    )


def route_payload(table: int, rtype: int, dst_len: int, oif: int) -> bytes:
    return HDR.pack(2, dst_len, 0, 0, table, 0, 254, rtype, 0) + attr(pr.RTA_TABLE, table) + attr(pr.RTA_OIF, oif)


def test_dump_request() -> None:
    req = pr.dump_request(pr.RTM_GETRULE, 10, 7)
    assert struct.unpack_from("=IHHII", req) == (28, 34, 0x301, 7, 0)
    assert req[16] == 10 and len(req) == 28
    by_table = pr.dump_request(pr.RTM_GETROUTE, 2, 8, table=100)  # the kernel filters (strict checking)
    assert struct.unpack_from("=IHHII", by_table) == (36, 26, 0x301, 8, 0)
    assert HDR.unpack_from(by_table, 16)[4] == 100
    assert struct.unpack_from("=HHI", by_table, 28) == (8, pr.RTA_TABLE, 100)
    assert HDR.unpack_from(pr.dump_request(pr.RTM_GETROUTE, 2, 8, table=1000), 16)[4] == 0  # the attribute says it


def test_rules_and_routes_parse_and_judge() -> None:
    data = (
        message(pr.RTM_NEWRULE, 3, rule_payload(32764, 0x111, 0xFFF, 100))
        + message(pr.RTM_NEWRULE, 3, rule_payload(32766, 0, 0, 254))
        + message(pr.RTM_NEWRULE, 9, rule_payload(1, 1, 1, 1))  # another request's answer
    )
    payloads, done = pr.parse_dump(data, 3, pr.RTM_NEWRULE)
    assert not done and len(payloads) == 2
    rules = [pr.parse_rule(p) for p in payloads]
    assert rules[0] == pr.Rule(32764, 0x111, 0xFFF, 100, True)
    routes = [pr.parse_route(route_payload(100, pr.RTN_LOCAL, 0, 1))]
    assert pr.routing_problems(4, rules, routes, 1, AMBIENT) == []
    assert pr.routing_problems(4, rules, [], 1, AMBIENT) == [
        "IPv4 policy routing: route 'local default dev lo' in table 100 is missing"
    ]
    # a narrowed (iif) or inverted-action rule is not ours; nor is a route on another device
    narrowed = pr.parse_rule(rule_payload(32764, 0x111, 0xFFF, 100, extra=struct.pack("=HH4s", 7, 3, b"lo\0\0")))
    assert not narrowed.plain
    assert pr.routing_problems(6, [narrowed], [pr.parse_route(route_payload(100, pr.RTN_LOCAL, 0, 2))], 1, AMBIENT) == [
        "IPv6 policy routing: ip rule 'pref 32764 fwmark 0x111/0xfff lookup 100' is missing",
        "IPv6 policy routing: route 'local default dev lo' in table 100 is missing",
    ]
    # TPROXY's rule has no mask (the kernel reports 0xffffffff)
    tp = pr.parse_rule(rule_payload(32765, 0x539, 0xFFFFFFFF, 133))
    tp_route = pr.parse_route(route_payload(133, pr.RTN_LOCAL, 0, 1))
    assert pr.routing_problems(4, [tp], [tp_route], 1, TPROXY) == []


def test_done_and_errors() -> None:
    done = message(3, 5, struct.pack("=i", 0))
    assert pr.parse_dump(done, 5, pr.RTM_NEWRULE) == ([], True)
    with pytest.raises(pr.PolicyRoutesReadError, match="Operation not permitted"):
        pr.parse_dump(message(2, 5, struct.pack("=i", -1)), 5, pr.RTM_NEWRULE)
    with pytest.raises(pr.PolicyRoutesReadError):
        pr.parse_dump(struct.pack("=IHHII", 400, 24, 0, 5, 0), 5, pr.RTM_NEWROUTE)
